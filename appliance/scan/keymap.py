"""Keyboard layouts for keyboard-wedge scanners, and the pure decoder from key events to scans.

A wedge scanner "types" each code as key presses. evdev reports key *positions* (`KEY_Q` is
the key left of W, whatever is printed on it), so turning them back into characters needs the
layout the scanner was set up to type for. On a French AZERTY layout the top row types
`&é"'(-è_çà` and the digits need Shift: a scanner set to AZERTY presses Shift+KEY_1 for "1".
`[scanner] keymap` must name the same layout as the scanner's own keyboard-country setting.

This module imports nothing from python-evdev: key codes are the kernel's stable numbers from
linux/input-event-codes.h (tests check them against `evdev.ecodes`), and events are read only
through their `type`, `code`, `value`, `sec` and `usec` attributes, so `evdev.InputEvent`s or
anything shaped like them can be fed.

Adding a layout:
  1. Write a `Layout` below. `keys` maps a key position (the `KEY_` name without `KEY_`, i.e. the
     key's place on a US keyboard: "Q", "SEMICOLON", "102ND" for the extra ISO key) to a string
     of two characters, unshifted then shifted, or to a tuple `(unshifted, shifted)` where
     either may be None. `altgr` maps a position to the character typed with AltGr (right Alt).
     `keypad_decimal` is what the keypad's decimal key types with Num Lock on.
  2. Leave out dead keys (accents waiting for the next key) and anything else that does not
     type one character by itself: a position with no character in the table makes the scan
     defective when pressed, it is never skipped silently.
  3. Register it in `LAYOUTS` under the name used in `[scanner] keymap` (lowercase, like the
     xkb layout name), and add a row to tests/test_keymap.py that types a code on it.
  tests/test_keymap_xkb.py checks every table against the system's xkb data (libxkbcommon);
  run it after any change.

Caps Lock shifts only keys whose shifted character is the upper case of the unshifted one
(letters, and ä/ö/ü on "de"); Shift with Caps Lock types the lower case, as on Linux.
Layouts are plain data; the decoder is `KeyDecoder`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.errors import ConfigError
from appliance.scan import Scan

if TYPE_CHECKING:
    from appliance.config import ScannerConfig

# --- kernel key codes (linux/input-event-codes.h; a stable ABI) -------------------------------

EV_SYN, EV_KEY = 0x00, 0x01
SYN_REPORT, SYN_DROPPED = 0, 3

#: Key position name (without "KEY_") -> kernel key code, for the keys a scanner may press.
KEY: dict[str, int] = {
    "ESC": 1, "1": 2, "2": 3, "3": 4, "4": 5, "5": 6, "6": 7, "7": 8, "8": 9, "9": 10, "0": 11,
    "MINUS": 12, "EQUAL": 13, "BACKSPACE": 14, "TAB": 15,
    "Q": 16, "W": 17, "E": 18, "R": 19, "T": 20, "Y": 21, "U": 22, "I": 23, "O": 24, "P": 25,
    "LEFTBRACE": 26, "RIGHTBRACE": 27, "ENTER": 28, "LEFTCTRL": 29,
    "A": 30, "S": 31, "D": 32, "F": 33, "G": 34, "H": 35, "J": 36, "K": 37, "L": 38,
    "SEMICOLON": 39, "APOSTROPHE": 40, "GRAVE": 41, "LEFTSHIFT": 42, "BACKSLASH": 43,
    "Z": 44, "X": 45, "C": 46, "V": 47, "B": 48, "N": 49, "M": 50,
    "COMMA": 51, "DOT": 52, "SLASH": 53, "RIGHTSHIFT": 54, "KPASTERISK": 55, "LEFTALT": 56,
    "SPACE": 57, "CAPSLOCK": 58, "NUMLOCK": 69, "SCROLLLOCK": 70,
    "KP7": 71, "KP8": 72, "KP9": 73, "KPMINUS": 74, "KP4": 75, "KP5": 76, "KP6": 77,
    "KPPLUS": 78, "KP1": 79, "KP2": 80, "KP3": 81, "KP0": 82, "KPDOT": 83, "102ND": 86,
    "KPENTER": 96, "RIGHTCTRL": 97, "KPSLASH": 98, "RIGHTALT": 100, "KPEQUAL": 117,
    "KPCOMMA": 121, "LEFTMETA": 125, "RIGHTMETA": 126,
}
_NAME = {code: name for name, code in KEY.items()}

_SHIFT = frozenset({KEY["LEFTSHIFT"], KEY["RIGHTSHIFT"]})
_ALTGR = KEY["RIGHTALT"]
# Held, these make the next key a shortcut rather than a character.
_COMMAND_MODS = frozenset({KEY["LEFTCTRL"], KEY["RIGHTCTRL"], KEY["LEFTALT"], KEY["LEFTMETA"], KEY["RIGHTMETA"]})
_MODIFIERS = _SHIFT | _COMMAND_MODS | {_ALTGR}
_ENTER_KEYS = frozenset({KEY["ENTER"], KEY["KPENTER"]})
_IGNORED = frozenset({KEY["SCROLLLOCK"]})

# Keypad keys that type a digit only with Num Lock on (off: Home, End, arrows... = navigation).
_KEYPAD_NUMLOCK = {KEY[f"KP{d}"]: str(d) for d in range(10)}
# Keypad keys that type the same with Num Lock on or off.
_KEYPAD_FIXED = {KEY["KPSLASH"]: "/", KEY["KPASTERISK"]: "*", KEY["KPMINUS"]: "-", KEY["KPPLUS"]: "+",
                 KEY["KPEQUAL"]: "=", KEY["KPCOMMA"]: ","}


def key_name(code: int) -> str:
    """"KEY_A" for 30; "key 240" for a code this module has no name for."""
    name = _NAME.get(code)
    return f"KEY_{name}" if name else f"key {code}"


# --- layouts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One keyboard layout as data. See the module docstring for how to write one.

    The compiled tables (`base`, `shifted`, `with_altgr`: key code -> character, and `caps`:
    key codes Caps Lock shifts) are derived at construction; an unknown position name or a
    malformed entry raises ValueError then, i.e. at import.
    """

    name: str
    keys: Mapping[str, str | tuple[str | None, str | None]]
    altgr: Mapping[str, str] = field(default_factory=dict)
    keypad_decimal: str = "."
    base: dict[int, str] = field(init=False, repr=False, compare=False)
    shifted: dict[int, str] = field(init=False, repr=False, compare=False)
    with_altgr: dict[int, str] = field(init=False, repr=False, compare=False)
    caps: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base: dict[int, str] = {}
        shifted: dict[int, str] = {}
        for pos, chars in {**self.keys, "SPACE": "  ", "TAB": ("\t", None)}.items():  # Shift+Tab: ISO_Left_Tab
            code = self._code(pos)
            if isinstance(chars, str):
                if len(chars) != 2:
                    raise ValueError(f"layout {self.name}: {pos} must have 2 characters, got {chars!r}")
                chars = (chars[0], chars[1])
            for table, char in zip((base, shifted), chars):
                if char is not None:
                    table[code] = char
        with_altgr = {self._code(pos): char for pos, char in self.altgr.items()}
        caps = frozenset(c for c, ch in base.items() if shifted.get(c) == ch.upper() != ch)
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "shifted", shifted)
        object.__setattr__(self, "with_altgr", with_altgr)
        object.__setattr__(self, "caps", caps)

    def _code(self, pos: str) -> int:
        if pos not in KEY or KEY[pos] in _MODIFIERS | _ENTER_KEYS:
            raise ValueError(f"layout {self.name}: {pos!r} is not a character key position")
        return KEY[pos]


def _letters(positions: str, letters: str) -> dict[str, str]:
    """Letter keys: position names (one letter each, US places) -> the letter they type."""
    return {pos: ch + ch.upper() for pos, ch in zip(positions, letters, strict=True)}


_AZ = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

US = Layout("us", keys={
    **_letters(_AZ, _AZ.lower()),
    "GRAVE": "`~", "1": "1!", "2": "2@", "3": "3#", "4": "4$", "5": "5%", "6": "6^", "7": "7&",
    "8": "8*", "9": "9(", "0": "0)", "MINUS": "-_", "EQUAL": "=+",
    "LEFTBRACE": "[{", "RIGHTBRACE": "]}", "BACKSLASH": "\\|", "SEMICOLON": ";:", "APOSTROPHE": "'\"",
    "COMMA": ",<", "DOT": ".>", "SLASH": "/?", "102ND": "<>",
})

# German QWERTZ (xkb "de"): Y and Z swapped; ^ (GRAVE) and the acute key (EQUAL) are dead keys.
DE = Layout("de", keys={
    **_letters(_AZ, "abcdefghijklmnopqrstuvwxzy"),
    "GRAVE": (None, "°"), "1": "1!", "2": '2"', "3": "3§", "4": "4$", "5": "5%", "6": "6&", "7": "7/",
    "8": "8(", "9": "9)", "0": "0=", "MINUS": "ß?",
    "LEFTBRACE": "üÜ", "RIGHTBRACE": "+*", "SEMICOLON": "öÖ", "APOSTROPHE": "äÄ", "BACKSLASH": "#'",
    "102ND": "<>", "COMMA": ",;", "DOT": ".:", "SLASH": "-_",
}, altgr={
    "Q": "@", "E": "€", "M": "µ", "2": "²", "3": "³", "7": "{", "8": "[", "9": "]", "0": "}",
    "MINUS": "\\", "RIGHTBRACE": "~", "102ND": "|",
}, keypad_decimal=",")

# French AZERTY (xkb "fr" / Windows French): digits need Shift; A/Q, Z/W swapped, M right of L;
# ^ (LEFTBRACE) is a dead key.
FR = Layout("fr", keys={
    **_letters(_AZ.replace("M", ""), "qbcdefghijklnoparstuvzxyw"),
    "M": ",?", "SEMICOLON": "mM",
    "GRAVE": "²~", "1": "&1", "2": "é2", "3": '"3', "4": "'4", "5": "(5", "6": "-6", "7": "è7",
    "8": "_8", "9": "ç9", "0": "à0", "MINUS": ")°", "EQUAL": "=+",
    "RIGHTBRACE": "$£", "APOSTROPHE": "ù%", "BACKSLASH": "*µ", "102ND": "<>",
    "COMMA": ";.", "DOT": ":/", "SLASH": "!§",
}, altgr={
    "2": "~", "3": "#", "4": "{", "5": "[", "6": "|", "7": "`", "8": "\\", "9": "^", "0": "@",
    "MINUS": "]", "EQUAL": "}", "E": "€",
})

#: `[scanner] keymap` name -> layout.
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (US, DE, FR)}


def get_layout(name: str) -> Layout:
    """The layout called `name`. Raises ConfigError (a ValueError) naming `scanner.keymap`."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ConfigError("scanner.keymap", f"unknown keyboard layout {name!r} (known: {', '.join(sorted(LAYOUTS))})") from None


def terminator_char(terminator: str) -> str | None:
    """The character that ends a scan besides Enter, for a validated `[scanner] terminator`.

    A wedge turns CR, LF and CRLF into an Enter key press, so those (and "ENTER") add nothing:
    None. "TAB" -> "\\t"; "0xNN" -> that character ("0x0d"/"0x0a" -> None: Enter again).
    Raises ConfigError naming `scanner.terminator` for anything else.
    """
    t = terminator.upper()
    if t in ("ENTER", "CR", "LF", "CRLF"):
        return None
    if t == "TAB":
        return "\t"
    if len(t) == 4 and t.startswith("0X"):
        try:
            char = chr(int(t[2:], 16))
        except ValueError:
            pass
        else:
            return None if char in "\r\n" else char
    raise ConfigError("scanner.terminator", f"must be CR, LF, CRLF, TAB, ENTER or one byte as 0xNN, got {terminator!r}")


# --- decoder ---------------------------------------------------------------------------------

#: A code longer than this is delivered only as a defect (no scannable payment code comes close).
MAX_CODE = 1024

#: After a code is reported defective, keys arriving with gaps shorter than this many times the
#: inter-character timeout still belong to it and are swallowed, up to its terminator.
QUIET_FACTOR = 5


class KeyDecoder:
    """Turns a keyboard-wedge scanner's key events into `Scan`s. Pure: no device, no clock, no I/O.

    Feed every event read from the device with `feed(event, now)`, and call `expire(now)` when
    nothing arrives until `deadline`; both return the scans completed by that call, in order.
    `now` is monotonic seconds (it becomes `Scan.at` and times out an unterminated code); the gap
    between two characters of one code is measured with the events' own kernel timestamps
    (`sec`, `usec`), so a reader that falls behind does not mistake queued keys for slow ones.

    Rules, in the order they apply:
      * Key releases and auto-repeats (value 0 and 2) type nothing; they only release modifiers.
      * Shift (left/right) and AltGr (right Alt) are held; Caps Lock and Num Lock toggle on press.
        Caps Lock shifts letters only. Num Lock starts on (the Pi is headless: only the scanner
        itself can toggle it); with it off, keypad digits and the keypad decimal are navigation
        keys and make the code defective (dropping them would pass on a shortened code).
      * Enter and keypad Enter always end a code; so does the terminator character (Tab for
        "TAB", the byte for "0xNN"). An end key with nothing before it is ignored (CRLF wedges
        may press Enter twice).
      * A key that types nothing in the layout (dead key, F-key, Ctrl/left Alt/Meta shortcut,
        keypad digit with Num Lock off) makes the code defective.
      * A gap between characters longer than `inter_char_timeout_ms`, no terminator within that
        time after the last character (`expire`), more than MAX_CODE characters, or the kernel
        reporting SYN_DROPPED make the code defective; on SYN_DROPPED every event up to the next
        SYN_REPORT is ignored and held modifiers are forgotten.
      * A defective code is reported once, at once, as `Scan("", source, now, defect)`. The rest
        of it is swallowed up to its terminator or until the keys have been quiet for
        QUIET_FACTOR x the timeout, so the tail of a damaged code is never delivered as a code of
        its own, and a stray key press does not glue onto the next scan.

    The defect text never contains scanned characters (codes are bearer tokens).
    """

    def __init__(self, keymap: str = "us", terminator: str = "ENTER", inter_char_timeout_ms: int = 100, *,
                 source: str = "evdev", numlock: bool = True):
        """Raises ConfigError (a ValueError) naming `scanner.keymap` / `scanner.terminator` /
        `scanner.inter_char_timeout_ms` for a value it cannot use."""
        self.layout = get_layout(keymap)
        self._end_char = terminator_char(terminator)
        if inter_char_timeout_ms <= 0:
            raise ConfigError("scanner.inter_char_timeout_ms", "must be greater than zero")
        self._timeout_ms = inter_char_timeout_ms
        self._timeout = inter_char_timeout_ms / 1000
        self._quiet = QUIET_FACTOR * self._timeout
        #: Written into every Scan; the adapter sets it to "evdev:<device path>".
        self.source = source
        self._numlock_at_start = numlock
        self.numlock = numlock
        self.capslock = False
        self._held: set[int] = set()  # modifier keys currently down
        self._buf: list[str] = []
        self._last_t = 0.0  # kernel time of the last key of the current code (chars, end keys)
        self._last_now = 0.0  # monotonic time it was fed
        self._broken = False  # inside a code already reported defective
        self._syncing = False  # after SYN_DROPPED, until SYN_REPORT

    @classmethod
    def from_config(cls, cfg: ScannerConfig, source: str = "evdev") -> KeyDecoder:
        """A decoder for a ScannerConfig's keymap, terminator and inter_char_timeout_ms."""
        return cls(cfg.keymap, cfg.terminator, cfg.inter_char_timeout_ms, source=source)

    @property
    def deadline(self) -> float | None:
        """Monotonic time at which the code being typed expires, or None when none is pending."""
        return self._last_now + self._timeout if self._buf else None

    @property
    def pending(self) -> int:
        """Number of characters of the code being typed (0 between codes)."""
        return len(self._buf)

    def feed(self, event, now: float) -> list[Scan]:
        """Take one input event read at monotonic time `now`; return the scans it completes."""
        if event.type == EV_SYN:
            if event.code == SYN_DROPPED:
                self._syncing = True
                self._held.clear()
                return self._defect("the kernel dropped input events (SYN_DROPPED)", now, _time(event))
            if event.code == SYN_REPORT:
                self._syncing = False
            return []
        if self._syncing or event.type != EV_KEY or event.value == 2:
            return []
        code = event.code
        if code in _MODIFIERS:
            (self._held.add if event.value else self._held.discard)(code)
            return []
        if event.value != 1 or code in _IGNORED:
            return []
        if code == KEY["CAPSLOCK"]:
            self.capslock = not self.capslock
            return []
        if code == KEY["NUMLOCK"]:
            self.numlock = not self.numlock
            return []
        t = _time(event)
        char, problem = self._char(code)
        if code in _ENTER_KEYS or (char is not None and char == self._end_char):
            return self._end(now, t)
        return self._key(char, problem, now, t)

    def expire(self, now: float) -> list[Scan]:
        """Report the code being typed as defective if `deadline` has passed by `now`."""
        if self._buf and now - self._last_now > self._timeout:
            return self._defect(f"no terminator within {self._timeout_ms} ms of the last character", now, self._last_t)
        return []

    def abandon(self, now: float, reason: str) -> list[Scan]:
        """Forget everything, lock states included (the device went away and may come back
        as a new keyboard): a code being typed becomes a defect with `reason`."""
        out = self._defect(reason, now, self._last_t) if self._buf else []
        self._held.clear()
        self.numlock, self.capslock = self._numlock_at_start, False
        self._broken = self._syncing = False
        return out

    # -- internals --

    def _char(self, code: int) -> tuple[str | None, str | None]:
        """(character, None) or (None, why this key types nothing)."""
        held = self._held
        if held & _COMMAND_MODS:
            mods = "+".join(key_name(m) for m in sorted(held & _COMMAND_MODS))
            return None, f"{mods}+{key_name(code)} is a shortcut, not a character"
        if code in _KEYPAD_NUMLOCK or code == KEY["KPDOT"]:
            if not self.numlock:
                return None, f"keypad key {key_name(code)} with Num Lock off types no character"
            return _KEYPAD_NUMLOCK.get(code, self.layout.keypad_decimal), None
        if code in _KEYPAD_FIXED:
            return _KEYPAD_FIXED[code], None
        layout = self.layout
        if _ALTGR in held:
            char = layout.with_altgr.get(code)
            return (char, None) if char else (None, f"AltGr+{key_name(code)} types nothing in layout {layout.name}")
        shift = bool(held & _SHIFT) != (self.capslock and code in layout.caps)
        char = (layout.shifted if shift else layout.base).get(code)
        if char is None:
            what = f"Shift+{key_name(code)}" if shift else key_name(code)
            return None, f"{what} types nothing in layout {layout.name}"
        return char, None

    def _key(self, char: str | None, problem: str | None, now: float, t: float) -> list[Scan]:
        out: list[Scan] = []
        if self._buf and t - self._last_t > self._timeout:
            out += self._defect(f"{round((t - self._last_t) * 1000)} ms between characters "
                                f"(limit {self._timeout_ms} ms)", now, self._last_t)
        if self._broken:
            if t - self._last_t <= self._quiet:  # still the damaged code: swallow
                self._last_t, self._last_now = t, now
                return out
            self._broken = False
        if problem is not None:
            return out + self._defect(problem, now, t)
        self._buf.append(char)
        self._last_t, self._last_now = t, now
        if len(self._buf) > MAX_CODE:
            out += self._defect(f"longer than {MAX_CODE} characters", now, t)
        return out

    def _end(self, now: float, t: float) -> list[Scan]:
        if self._buf:
            if t - self._last_t > self._timeout:
                out = self._defect(f"{round((t - self._last_t) * 1000)} ms before the terminator "
                                   f"(limit {self._timeout_ms} ms)", now, t)
                self._broken = False
                return out
            text = "".join(self._buf)
            self._buf.clear()
            return [Scan(text, self.source, now)]
        self._broken = False  # the end of a damaged code, or a lone Enter: nothing to deliver
        return []

    def _defect(self, reason: str, now: float, t: float) -> list[Scan]:
        n = len(self._buf)
        self._buf.clear()
        self._broken = True
        self._last_t, self._last_now = t, now
        where = f" after {n} characters" if n else ""
        return [Scan("", self.source, now, defect=f"scan discarded{where}: {reason}")]


def _time(event) -> float:
    """The kernel's timestamp of an event, in seconds."""
    return event.sec + event.usec / 1_000_000

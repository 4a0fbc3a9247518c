"""Keyboard-wedge decoding: layouts and the KeyDecoder, fed recorded evdev.InputEvent sequences.

Sequences are written as key tokens, the way a wedge scanner presses them, and expanded into
the events the kernel reports for each press or release: MSC_SCAN, EV_KEY, SYN_REPORT, all
with the same timestamp. Key codes come from evdev.ecodes, not from the module under test.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from evdev import InputEvent, ecodes

from appliance.config import ScannerConfig
from appliance.errors import ConfigError
from appliance.scan import Scan
from appliance.scan.keymap import KEY, LAYOUTS, MAX_CODE, KeyDecoder, Layout, get_layout, terminator_char

DT = 0.004  # seconds between key events: a fast wedge scanner
T0 = 1000.0
CODE = "134567890123456789"  # 18 digits, a WeChat-shaped payment code


def events(spec: str, t0: float = T0, dt: float = DT) -> list[tuple[float, InputEvent]]:
    """(time, event) pairs for a token string.

    NAME     press and release KEY_NAME       +NAME / -NAME   press / release only
    ~NAME    auto-repeat (value 2)            @0.150          the next key event comes 150 ms after the last
    DROP     EV_SYN SYN_DROPPED               SYN             a bare SYN_REPORT
    """
    out: list[tuple[float, InputEvent]] = []
    t = t0

    def emit(etype: int, code: int, value: int) -> None:
        sec = int(t)
        out.append((t, InputEvent(sec, round((t - sec) * 1_000_000), etype, code, value)))

    def key(name: str, value: int) -> None:
        nonlocal t
        code = ecodes.ecodes[f"KEY_{name}"]
        emit(ecodes.EV_MSC, ecodes.MSC_SCAN, 0x70000 + code)
        emit(ecodes.EV_KEY, code, value)
        emit(ecodes.EV_SYN, ecodes.SYN_REPORT, 0)
        t += dt

    for token in spec.split():
        if token.startswith("@"):
            t += float(token[1:]) - dt
        elif token == "DROP":
            emit(ecodes.EV_SYN, ecodes.SYN_DROPPED, 0)
        elif token == "SYN":
            emit(ecodes.EV_SYN, ecodes.SYN_REPORT, 0)
        elif token[0] in "+-~":
            key(token[1:], {"+": 1, "-": 0, "~": 2}[token[0]])
        else:
            key(token, 1)
            key(token, 0)
    return out


def digits(text: str) -> str:
    return " ".join(text)


@dataclass(frozen=True)
class Defect:
    """Expected defective scan whose reason contains `words`."""

    words: str


def decode(spec: str, expire_after: float | None = None, **kw) -> list[str | Defect]:
    """Feed a spec; optionally call expire() `expire_after` seconds after the last event."""
    d = KeyDecoder(**kw)
    scans: list[Scan] = []
    now = T0
    for now, event in events(spec):
        scans += d.feed(event, now)
    if expire_after is not None:
        scans += d.expire(now + expire_after)
    return [s.text if s.defect is None else s for s in scans]


def check(got: list, expected: list) -> None:
    assert len(got) == len(expected), got
    for g, e in zip(got, expected):
        if isinstance(e, Defect):
            assert isinstance(g, Scan) and g.text == "" and e.words in g.defect, g
        else:
            assert g == e


ORD_US = "+LEFTSHIFT O R D SEMICOLON A -LEFTSHIFT 1 2 +RIGHTSHIFT SEMICOLON -RIGHTSHIFT 1 2 DOT 3 4 ENTER"


# --- layouts and plain decoding --------------------------------------------------------------


def test_ok__key_codes_are_the_kernels():
    assert KEY == {name: ecodes.ecodes[f"KEY_{name}"] for name in KEY}


@pytest.mark.parametrize("spec, expected", [
    ("1 2 3 ENTER", ["123"]),
    (digits(CODE) + " ENTER", [CODE]),
    (digits(CODE) + " ENTER " + digits("2876543210987654") + " ENTER", [CODE, "2876543210987654"]),
    (ORD_US, ["ORD:A12:12.34"]),
    ("+LEFTSHIFT C M D SEMICOLON C A N C E L -LEFTSHIFT ENTER", ["CMD:CANCEL"]),
    ("+RIGHTSHIFT a -RIGHTSHIFT b ENTER".upper(), ["Ab"]),
    ("+LEFTSHIFT 1 MINUS EQUAL SLASH -LEFTSHIFT 1 MINUS EQUAL SLASH SPACE ENTER", ["!_+?1-=/ "]),
    # repeats (value 2) and stray releases type nothing
    ("+1 ~1 ~1 -1 2 -3 ENTER", ["12"]),
    ("+LEFTSHIFT ~LEFTSHIFT A ~A -A -LEFTSHIFT A ENTER", ["Aa"]),
    # Caps Lock toggles, shifts letters only; Shift under Caps Lock types lower case
    ("CAPSLOCK O R D SEMICOLON 1 CAPSLOCK O ENTER", ["ORD;1o"]),
    ("CAPSLOCK +LEFTSHIFT A 1 -LEFTSHIFT B ENTER", ["a!B"]),
    # keypad: Num Lock starts on; operators type with it on or off
    ("KP1 KP2 KPDOT KP3 KPENTER", ["12.3"]),
    ("KP0 KPSLASH KPASTERISK KPMINUS KPPLUS KP9 ENTER", ["0/*-+9"]),
    ("NUMLOCK KPMINUS KPPLUS KPENTER", ["-+"]),
    ("NUMLOCK NUMLOCK KP4 KP2 KPENTER", ["42"]),
    # Enter with nothing before it (CRLF wedges press it twice) is ignored
    ("ENTER 1 2 ENTER ENTER KPENTER", ["12"]),
    # Tab is a character unless it is the terminator
    ("1 TAB 2 ENTER", ["1\t2"]),
    # non-key events in between change nothing
    ("SYN 1 SYN SYN 2 ENTER", ["12"]),
])
def test_ok__us(spec, expected):
    check(decode(spec), expected)


@pytest.mark.parametrize("terminator, spec, expected", [
    ("TAB", "1 2 TAB 3 4 TAB", ["12", "34"]),
    ("TAB", "1 2 ENTER 3 4 KPENTER", ["12", "34"]),  # Enter always ends a code
    ("CR", "1 2 ENTER", ["12"]),
    ("LF", "1 2 KPENTER", ["12"]),
    ("CRLF", "1 2 ENTER ENTER 3 ENTER ENTER", ["12", "3"]),
    ("0x0d", "1 2 ENTER", ["12"]),
    ("0x23", "1 2 +LEFTSHIFT 3 -LEFTSHIFT 4 ENTER", ["12", "4"]),  # '#' ends a code
    ("ENTER", "1 2 +LEFTSHIFT 3 -LEFTSHIFT ENTER", ["12#"]),
])
def test_ok__terminators(terminator, spec, expected):
    check(decode(spec, terminator=terminator), expected)


@pytest.mark.parametrize("value, expected", [
    ("ENTER", None), ("CR", None), ("LF", None), ("CRLF", None), ("TAB", "\t"), ("0x09", "\t"),
    ("0x0a", None), ("0x03", "\x03"), ("0x23", "#"),
])
def test_ok__terminator_char(value, expected):
    assert terminator_char(value) == expected


@pytest.mark.parametrize("keymap, spec, expected", [
    # German QWERTZ: Y/Z swapped, ':' is Shift+'.', '@' is AltGr+Q, keypad decimal is ','
    ("de", "+LEFTSHIFT O R D DOT A -LEFTSHIFT 1 2 +LEFTSHIFT DOT -LEFTSHIFT 1 2 DOT 3 4 ENTER", ["ORD:A12:12.34"]),
    ("de", "Y Z +LEFTSHIFT Y -LEFTSHIFT SLASH +LEFTSHIFT SLASH 7 0 -LEFTSHIFT ENTER", ["zyZ-_/="]),
    ("de", "+RIGHTALT Q 8 9 MINUS -RIGHTALT SEMICOLON APOSTROPHE LEFTBRACE MINUS ENTER", ["@[]\\öäüß"]),
    ("de", "CAPSLOCK SEMICOLON Y 1 ENTER", ["ÖZ1"]),
    ("de", "KP1 KPDOT KP5 KPENTER", ["1,5"]),
    # French AZERTY: the top row types &é"'(-è_çà; digits need Shift
    ("fr", "+LEFTSHIFT 1 2 3 4 5 6 7 8 9 0 -LEFTSHIFT ENTER", ["1234567890"]),
    ("fr", "1 2 3 4 5 6 7 8 9 0 ENTER", ["&é\"'(-è_çà"]),
    ("fr", "+LEFTSHIFT O R D -LEFTSHIFT DOT +LEFTSHIFT Q 1 2 -LEFTSHIFT DOT "
           "+LEFTSHIFT 1 2 COMMA 3 4 -LEFTSHIFT ENTER", ["ORD:A12:12.34"]),
    ("fr", "Q W A Z SEMICOLON M ENTER", ["azqwm,"]),
    ("fr", "+RIGHTALT 0 3 8 -RIGHTALT ENTER", ["@#\\"]),
    ("fr", "CAPSLOCK Q 1 APOSTROPHE ENTER", ["A&ù"]),  # Caps Lock leaves the digit row alone
    ("fr", "KP1 KP2 KPENTER", ["12"]),  # the keypad types digits on every layout
    ("us", "+LEFTSHIFT 1 2 3 -LEFTSHIFT ENTER", ["!@#"]),
])
def test_ok__layouts(keymap, spec, expected):
    check(decode(spec, keymap=keymap), expected)


def test_ok__every_layout_types_digits_and_enter():
    for name in LAYOUTS:
        layout = get_layout(name)
        typed = {layout.base.get(KEY[d]) for d in "1234567890"} | {layout.shifted.get(KEY[d]) for d in "1234567890"}
        assert set("1234567890") <= typed, name


def test_ok__scan_carries_source_and_time():
    d = KeyDecoder(source="evdev:/dev/scanner")
    scans = [s for now, ev in events("4 2 ENTER") for s in d.feed(ev, now)]
    assert scans == [Scan("42", "evdev:/dev/scanner", at=scans[0].at)]
    assert scans[0].at == pytest.approx(T0 + 4 * DT)


def test_ok__from_config():
    d = KeyDecoder.from_config(ScannerConfig(keymap="fr", terminator="TAB", inter_char_timeout_ms=50))
    assert d.layout.name == "fr"
    check([s.text for now, ev in events("+LEFTSHIFT 4 -LEFTSHIFT TAB") for s in d.feed(ev, now)], ["4"])


# --- damaged input ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw, spec, expected", [
    # Num Lock off: keypad digits are navigation keys, the code is damaged, not shortened
    ({}, "NUMLOCK KP1 KP2 KPENTER", [Defect("Num Lock off")]),
    ({}, "NUMLOCK 1 KPDOT 2 ENTER", [Defect("Num Lock off")]),
    ({"numlock": False}, "KP1 KP2 KPENTER @0.6 NUMLOCK KP1 KP2 KPENTER", [Defect("Num Lock off"), "12"]),
    # keys that type nothing on the layout
    ({}, "1 F1 2 ENTER", [Defect("key 59 types nothing in layout us")]),
    ({}, "1 +LEFTCTRL J -LEFTCTRL 2 ENTER", [Defect("shortcut")]),
    ({}, "1 +RIGHTALT Q -RIGHTALT ENTER", [Defect("AltGr+KEY_Q types nothing in layout us")]),
    ({"keymap": "de"}, "1 EQUAL 2 ENTER", [Defect("KEY_EQUAL types nothing in layout de")]),  # dead key
    ({"keymap": "fr"}, "1 LEFTBRACE 2 ENTER", [Defect("layout fr")]),
    ({}, "1 BACKSPACE 2 ENTER", [Defect("KEY_BACKSPACE")]),
    # after the defect the rest of that code is swallowed; the next one is clean
    ({}, "1 F1 2 ENTER 3 4 ENTER", [Defect("key"), "34"]),
    # the kernel dropped events: the code is discarded, events up to SYN_REPORT ignored
    ({}, "1 2 3 DROP 4 5 SYN 6 7 ENTER 9 8 ENTER", [Defect("dropped input events"), "98"]),
    ({}, "1 2 ENTER DROP SYN @0.6 3 4 ENTER", ["12", Defect("dropped"), "34"]),
    ({}, "+LEFTSHIFT 1 DROP SYN ENTER 1 ENTER", [Defect("dropped"), "1"]),  # held Shift forgotten
    # characters too slow: discarded with the tail of the code, the next scan is clean
    ({}, "1 2 @0.150 3 4 ENTER 5 6 ENTER", [Defect("154 ms between characters (limit 100 ms)"), "56"]),
    ({"inter_char_timeout_ms": 200}, "1 2 @0.150 3 4 ENTER", ["1234"]),
    ({}, "1 2 @0.150 ENTER", [Defect("before the terminator")]),
    # a stray key press, then a real scan after a quiet moment: the stray key does not glue on
    ({}, "7 @0.600 1 2 ENTER", [Defect("between characters"), "12"]),
    ({}, digits("1" * (MAX_CODE + 5)) + " ENTER 2 ENTER", [Defect(f"longer than {MAX_CODE}"), "2"]),
])
def test_fail__damaged_codes(kw, spec, expected):
    check(decode(spec, **kw), expected)


@pytest.mark.parametrize("after, expected", [
    (0.050, []),
    (0.090, []),  # measured from the last event, the release of "3"
    (0.150, [Defect("no terminator within 100 ms")]),
])
def test_fail__missing_terminator_expires(after, expected):
    check(decode("1 2 3", expire_after=after), expected)


def test_fail__expired_code_does_not_glue_onto_the_next():
    d = KeyDecoder()
    scans: list[Scan] = []
    for now, ev in events("5 5"):
        scans += d.feed(ev, now)
    assert d.deadline == pytest.approx(T0 + 2 * DT + 0.100)
    scans += d.expire(T0 + 0.5)
    assert d.deadline is None
    for now, ev in events(digits(CODE) + " ENTER", t0=T0 + 2.0):
        scans += d.feed(ev, now)
    check([s if s.defect else s.text for s in scans], [Defect("after 2 characters: no terminator"), CODE])


def test_fail__defects_never_contain_the_code():
    got = decode(digits(CODE) + " @0.2 1 ENTER " + digits(CODE) + " DROP SYN " + digits(CODE), expire_after=1)
    assert got and all(isinstance(s, Scan) and s.defect and CODE[:8] not in s.defect for s in got)


def test_fail__abandon_turns_a_pending_code_into_a_defect():
    d = KeyDecoder()
    for now, ev in events("1 2 +LEFTSHIFT"):
        d.feed(ev, now)
    [scan] = d.abandon(T0 + 1, "the scanner went away")
    assert scan.defect == "scan discarded after 2 characters: the scanner went away"
    assert d.abandon(T0 + 2, "again") == []
    check([s.text for now, ev in events("1 ENTER", t0=T0 + 3) for s in d.feed(ev, now)], ["1"])  # Shift released


@pytest.mark.parametrize("kw, key", [
    ({"keymap": "azerty"}, "scanner.keymap"),
    ({"keymap": "US"}, "scanner.keymap"),
    ({"terminator": "ETX"}, "scanner.terminator"),
    ({"inter_char_timeout_ms": 0}, "scanner.inter_char_timeout_ms"),
])
def test_fail__bad_settings(kw, key):
    with pytest.raises(ValueError, match=key) as info:
        KeyDecoder(**kw)
    assert isinstance(info.value, ConfigError) and info.value.key == key


@pytest.mark.parametrize("keys, words", [
    ({"NOPE": "ab"}, "'NOPE' is not a character key position"),
    ({"LEFTSHIFT": "ab"}, "not a character key position"),
    ({"A": "abc"}, "must have 2 characters"),
])
def test_fail__malformed_layout(keys, words):
    with pytest.raises(ValueError, match=words):
        Layout("xx", keys=keys)


# --- throughput ------------------------------------------------------------------------------


def test_ok__fifty_codes_back_to_back():
    codes = [f"{n:02d}{CODE[2:]}" for n in range(50)]
    spec = " ".join(digits(c) + " ENTER" for c in codes)
    d = KeyDecoder()
    scans = [s for _, ev in events(spec, dt=0.0) for s in d.feed(ev, T0)]
    assert [s.text for s in scans] == codes
    assert all(s.defect is None for s in scans)


def test_ok__abandon_resets_the_lock_keys():
    d = KeyDecoder()
    for now, ev in events("NUMLOCK CAPSLOCK"):
        d.feed(ev, now)
    assert (d.numlock, d.capslock) == (False, True)
    assert d.abandon(T0 + 1, "unplugged") == []
    check([s.text for now, ev in events("KP1 A KPENTER", t0=T0 + 2) for s in d.feed(ev, now)], ["1a"])


# --- property: whatever a layout can type, the decoder reads back exactly ----------------------

from hypothesis import given, strategies as st  # noqa: E402


def _typing_plan(layout: Layout) -> dict[str, str]:
    """character -> key tokens that type it on `layout` (plain, Shift or AltGr)."""
    name = {code: n for n, code in KEY.items()}
    plan: dict[str, str] = {}
    for table, wrap in ((layout.with_altgr, "+RIGHTALT {} -RIGHTALT"), (layout.shifted, "+LEFTSHIFT {} -LEFTSHIFT"),
                        (layout.base, "{}")):
        for code, char in table.items():
            if char.isprintable() and char != " ":
                plan[char] = wrap.format(name[code])
    return plan


@pytest.mark.parametrize("keymap", sorted(LAYOUTS))
def test_property_every_typable_text_decodes_exactly(keymap):
    plan = _typing_plan(LAYOUTS[keymap])

    @given(st.text(alphabet=sorted(plan), min_size=1, max_size=60))
    def check(text):
        decoder = KeyDecoder(keymap)
        got = []
        for t, ev in events(" ".join(plan[c] for c in text) + " ENTER"):
            got += decoder.feed(ev, t)
        assert [(s.text, s.defect) for s in got] == [(text, None)]

    check()

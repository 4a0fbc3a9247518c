"""Cross-check the hand-written layout tables against the system's xkb data (libxkbcommon).

The tables in appliance/scan/keymap.py are what the appliance uses at run time (no X, no
libxkbcommon on the Pi); this test proves they agree with xkb-data's `us`, `de` and `fr`
layouts for every character key at the base, Shift and AltGr levels.
"""

import ctypes
import ctypes.util
from pathlib import Path

import pytest

from appliance.scan.keymap import KEY, LAYOUTS

_LIB = ctypes.util.find_library("xkbcommon")
pytestmark = pytest.mark.skipif(
    _LIB is None or not Path("/usr/share/X11/xkb/symbols/fr").exists(),
    reason="libxkbcommon or xkb-data is not installed (Debian: libxkbcommon0 xkb-data)")

EVDEV_TO_XKB = 8
SHIFT, ALTGR = KEY["LEFTSHIFT"], KEY["RIGHTALT"]


class _Names(ctypes.Structure):
    _fields_ = [(f, ctypes.c_char_p) for f in ("rules", "model", "layout", "variant", "options")]


class Xkb:
    def __init__(self, layout: str):
        lib = ctypes.CDLL(_LIB)
        for fn, res, args in [
            ("xkb_context_new", ctypes.c_void_p, [ctypes.c_int]),
            ("xkb_keymap_new_from_names", ctypes.c_void_p, [ctypes.c_void_p, ctypes.POINTER(_Names), ctypes.c_int]),
            ("xkb_state_new", ctypes.c_void_p, [ctypes.c_void_p]),
            ("xkb_state_update_key", ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]),
            ("xkb_state_key_get_utf32", ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_uint32]),
            ("xkb_state_unref", None, [ctypes.c_void_p]),
            ("xkb_keymap_unref", None, [ctypes.c_void_p]),
            ("xkb_context_unref", None, [ctypes.c_void_p]),
        ]:
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
        self.lib = lib
        self.ctx = lib.xkb_context_new(0)
        names = _Names(b"evdev", b"pc105", layout.encode(), b"", b"")
        self.keymap = lib.xkb_keymap_new_from_names(self.ctx, ctypes.byref(names), 0)
        assert self.keymap, f"xkb could not compile layout {layout}"

    def char(self, code: int, *mods: int) -> str | None:
        state = self.lib.xkb_state_new(self.keymap)
        for m in mods:
            self.lib.xkb_state_update_key(state, m + EVDEV_TO_XKB, 1)
        cp = self.lib.xkb_state_key_get_utf32(state, code + EVDEV_TO_XKB)
        self.lib.xkb_state_unref(state)
        return chr(cp) if cp else None

    def close(self):
        self.lib.xkb_keymap_unref(self.keymap)
        self.lib.xkb_context_unref(self.ctx)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_agrees_with_xkb(name):
    layout, xkb = LAYOUTS[name], Xkb(name)
    try:
        diffs = []
        for pos, code in KEY.items():
            if code not in layout.base and code not in layout.shifted and code not in layout.with_altgr:
                continue
            for level, table, mods in (("base", layout.base, ()), ("shift", layout.shifted, (SHIFT,)),
                                       ("altgr", layout.with_altgr, (ALTGR,))):
                if level == "altgr" and not layout.with_altgr:
                    continue
                ours, theirs = table.get(code), xkb.char(code, *mods)
                if level == "altgr" and ours is None:
                    continue  # the tables list only the AltGr characters a scanner may need
                if ours != theirs:
                    diffs.append(f"{pos} {level}: ours {ours!r}, xkb {theirs!r}")
        assert not diffs, f"layout {name} differs from xkb-data:\n" + "\n".join(diffs)
    finally:
        xkb.close()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_keypad_decimal_agrees_with_xkb(name):
    xkb = Xkb(name)
    try:
        # pressing Num Lock once locks it in xkb's state, as the decoder assumes at start
        assert xkb.char(KEY["KPDOT"], KEY["NUMLOCK"]) == LAYOUTS[name].keypad_decimal
    finally:
        xkb.close()

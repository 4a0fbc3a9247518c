"""evdev scanner adapter: device selection, grab, unplug/replug and the read loop.

Two tiers. The kernel tier types on a virtual keyboard made with /dev/uinput and reads it back
through the real python-evdev device (marked integration; skipped where /dev/uinput is absent).
The default tier injects `open_device` with `FakeDevice`: real `evdev.InputEvent`s queued behind
one end of a pipe, so the adapter's select() loop runs unchanged; it stands in for a kernel
device this machine cannot create.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from evdev import InputEvent, ecodes

from appliance.config import ScannerConfig
from appliance.errors import ConfigError, DeviceError
from appliance.scan import Scan, make_scanner
from appliance.scan.evdev import EvdevScanner, list_input_devices, open_input_device
from appliance.scan.keymap import EV_KEY, EV_SYN, KEY, SYN_DROPPED

CODE = "134567890123456789"  # 18 digits, a WeChat-shaped payment code
ORDER = "ORD:A12:12.34"
UINPUT = "/dev/uinput"

_US = {**{d: ("KEY_" + d, False) for d in "0123456789"},
       **{c: ("KEY_" + c, True) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
       ":": ("KEY_SEMICOLON", True), ".": ("KEY_DOT", False), "\n": ("KEY_ENTER", False)}
KEYBOARD_KEYS = sorted({ecodes.ecodes[name] for name, _ in _US.values()} | {ecodes.KEY_LEFTSHIFT})
MOUSE_KEYS = [ecodes.BTN_LEFT, ecodes.BTN_RIGHT]
CONSUMER_KEYS = [ecodes.KEY_VOLUMEUP, ecodes.KEY_VOLUMEDOWN, ecodes.KEY_ENTER]  # a scanner's 2nd node


def keystrokes(text: str) -> list[tuple[int, int]]:
    """(key code, value) presses and releases a US-layout wedge sends for `text`."""
    out: list[tuple[int, int]] = []
    for ch in text:
        name, shift = _US[ch]
        code = ecodes.ecodes[name]
        if shift:
            out.append((ecodes.KEY_LEFTSHIFT, 1))
        out += [(code, 1), (code, 0)]
        if shift:
            out.append((ecodes.KEY_LEFTSHIFT, 0))
    return out


def typed(text: str) -> list[InputEvent]:
    """The events the kernel reports for `text`, stamped now, each key followed by SYN_REPORT."""
    t = time.time()
    sec, usec = int(t), int((t % 1) * 1_000_000)
    out = []
    for code, value in keystrokes(text):
        out += [InputEvent(sec, usec, ecodes.EV_KEY, code, value), InputEvent(sec, usec, ecodes.EV_SYN, ecodes.SYN_REPORT, 0)]
    return out


class FakeDevice:
    """An honest stand-in for an evdev.InputDevice: `fd` is a pipe select() waits on, `read()`
    returns queued InputEvents or raises BlockingIOError / OSError(ENODEV) like the kernel."""

    def __init__(self, path: str, name: str = "Symbol Bar Code Scanner", vid_pid: str = "05e0:1200",
                 keys: list[int] = KEYBOARD_KEYS, busy: bool = False):
        self.path, self.name, self.phys = path, name, "usb-3f980000.usb-1.3/input0"
        vendor, product = (int(x, 16) for x in vid_pid.split(":"))
        self.info = SimpleNamespace(vendor=vendor, product=product, bustype=3, version=0x110)
        self._keys, self._busy = keys, busy
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._events: list[InputEvent] = []
        self._lock = threading.Lock()
        self.gone = self.grabbed = self.closed = False
        self.read_error: OSError | None = None

    @property
    def fd(self) -> int:
        return -1 if self.closed else self._r

    def capabilities(self) -> dict[int, list[int]]:
        return {ecodes.EV_SYN: [0], ecodes.EV_KEY: list(self._keys)}

    def grab(self) -> None:
        if self._busy or self.grabbed:
            raise OSError(errno.EBUSY, "Device or resource busy")
        self.grabbed = True

    def ungrab(self) -> None:
        if not self.grabbed:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.grabbed = False

    def read(self) -> list[InputEvent]:
        with self._lock:
            try:
                os.read(self._r, 65536)
            except BlockingIOError:
                pass
            if self.gone:
                raise OSError(errno.ENODEV, "No such device")
            if self.read_error:
                raise self.read_error
            if not self._events:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            out, self._events = self._events, []
            return out

    def push(self, events: list[InputEvent]) -> None:
        with self._lock:
            self._events += events
            os.write(self._w, b".")

    def unplug(self, error: OSError | None = None) -> None:
        with self._lock:
            if error is None:
                self.gone = True
            else:
                self.read_error = error
            os.write(self._w, b".")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)


class Opener:
    """open_device for the adapter: hands out the queued outcomes (device, device factory or
    exception) in order, then repeats the last one; records every path opened and every device
    handed out."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.last = None
        self.paths: list[str] = []
        self.devices: list[FakeDevice] = []
        self.lock = threading.Lock()

    def push(self, *outcomes) -> None:
        with self.lock:
            self.outcomes += outcomes

    def __call__(self, path: str) -> FakeDevice:
        with self.lock:
            self.paths.append(path)
            if self.outcomes:
                self.last = self.outcomes.pop(0)
            outcome = self.last
        if isinstance(outcome, BaseException):
            raise outcome
        dev = outcome(path) if callable(outcome) else outcome
        self.devices.append(dev)
        return dev


class Rig:
    """A started scanner with its scans and faults collected."""

    def __init__(self, cfg: ScannerConfig, opener, **kw):
        self.scanner = EvdevScanner(cfg, open_device=opener, **kw)
        self.scans: queue.Queue[Scan] = queue.Queue()
        self.faults: list[str | None] = []
        self.scanner.start(self.scans.put, self.faults.append)

    def scan(self, timeout: float = 3.0) -> Scan:
        return self.scans.get(timeout=timeout)

    def close(self) -> None:
        self.scanner.close()


@pytest.fixture
def rigs():
    made: list[Rig] = []

    def make(cfg, opener, **kw) -> Rig:
        made.append(Rig(cfg, opener, **kw))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


def wait_for(condition, timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def scanner_cfg(**kw) -> ScannerConfig:
    kw.setdefault("device", "/dev/scanner")
    return ScannerConfig(kind="evdev", **kw)


# --- reading one configured device -----------------------------------------------------------


def test_ok__scans_from_a_grabbed_device(rigs):
    dev = FakeDevice("/dev/scanner")
    rig = rigs(scanner_cfg(), Opener(dev))
    wait_for(lambda: rig.scanner.is_open)
    assert dev.grabbed
    dev.push(typed(ORDER + "\n"))
    dev.push(typed(CODE[:5]))
    dev.push(typed(CODE[5:] + "\n"))
    assert [rig.scan().text, rig.scan().text] == [ORDER, CODE]
    rig.close()
    assert not dev.grabbed and dev.closed
    rig.close()  # twice is fine
    assert rig.faults == [] and rig.scans.empty()


def test_ok__source_names_the_device(rigs):
    dev = FakeDevice("/dev/input/by-id/usb-Symbol_Bar_Code_Scanner-event-kbd")
    rig = rigs(scanner_cfg(device=dev.path), Opener(dev))
    wait_for(lambda: rig.scanner.is_open)
    dev.push(typed("42\n"))
    assert rig.scan() == Scan("42", "evdev:" + dev.path, at=pytest.approx(time.monotonic(), abs=3))


def test_ok__fifty_codes_back_to_back_through_the_adapter(rigs):
    dev = FakeDevice("/dev/scanner")
    rig = rigs(scanner_cfg(), Opener(dev))
    wait_for(lambda: rig.scanner.is_open)
    codes = [f"{n:02d}{CODE[2:]}" for n in range(50)]
    burst = [ev for c in codes for ev in typed(c + "\n")]
    dev.push(burst[:1000])
    dev.push(burst[1000:])
    got = [rig.scan() for _ in codes]
    assert [s.text for s in got] == codes and all(s.defect is None for s in got)
    time.sleep(0.2)
    assert rig.scans.empty()


def test_fail__unterminated_code_expires_without_more_input(rigs, caplog):
    dev = FakeDevice("/dev/scanner")
    rig = rigs(scanner_cfg(inter_char_timeout_ms=50), Opener(dev))
    wait_for(lambda: rig.scanner.is_open)
    dev.push(typed("12"))
    scan = rig.scan(timeout=1.0)  # nothing more arrives: the loop must wake up by itself
    assert scan.text == "" and "no terminator within 50 ms" in scan.defect
    assert [r.levelname for r in caplog.records if "scan discarded" in r.getMessage()] == ["WARNING"]
    time.sleep(0.3)  # quiet: the next scan starts clean
    dev.push(typed(CODE + "\n"))
    assert rig.scan().text == CODE


def test_fail__dropped_events_through_the_adapter(rigs):
    dev = FakeDevice("/dev/scanner")
    rig = rigs(scanner_cfg(), Opener(dev))
    wait_for(lambda: rig.scanner.is_open)
    head = typed(CODE[:6])
    drop = InputEvent(head[-1].sec, head[-1].usec, ecodes.EV_SYN, ecodes.SYN_DROPPED, 0)
    dev.push(head + [drop] + typed(CODE[9:] + "\n") + typed("77\n"))
    first, second = rig.scan(), rig.scan()
    assert first.text == "" and "dropped" in first.defect
    assert second.text == "77"


def test_ok__a_failing_scan_handler_does_not_stop_the_reader(caplog):
    dev = FakeDevice("/dev/scanner")
    scanner = EvdevScanner(scanner_cfg(), open_device=Opener(dev))
    got: list[str] = []

    def on_scan(scan: Scan) -> None:
        got.append(scan.text)
        if scan.text == "1":
            raise RuntimeError("till bug")

    scanner.start(on_scan)
    try:
        wait_for(lambda: scanner.is_open)
        dev.push(typed("1\n2\n"))
        wait_for(lambda: len(got) == 2)
    finally:
        scanner.close()
    assert got == ["1", "2"] and "the scan handler failed" in caplog.text


def test_ok__logs_never_show_a_whole_code(rigs, caplog):
    caplog.set_level(logging.DEBUG, logger="appliance")
    dev = FakeDevice("/dev/scanner")
    rig = rigs(scanner_cfg(), Opener(dev))
    wait_for(lambda: rig.scanner.is_open)
    dev.push(typed(CODE + "\n"))
    assert rig.scan().text == CODE
    dev.unplug()
    wait_for(lambda: rig.faults)
    assert "1345**********6789" in caplog.text and CODE not in caplog.text


# --- close -----------------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["open", "missing"])
def test_ok__close_returns_within_a_second(outcome):
    dev = FakeDevice("/dev/scanner")
    opener = Opener(dev if outcome == "open" else FileNotFoundError(errno.ENOENT, "No such file or directory"))
    scanner = EvdevScanner(scanner_cfg(), open_device=opener)  # default 1 s retry interval
    scanner.start(lambda scan: None)
    wait_for(lambda: opener.paths)
    time.sleep(0.05)
    started = time.monotonic()
    scanner.close()
    assert time.monotonic() - started < 1.0
    assert scanner._thread is None
    if outcome == "open":
        assert dev.closed and not dev.grabbed


# --- unplug and replug -----------------------------------------------------------------------


def test_fail__unplug_reported_once_and_recovery_once(rigs, caplog):
    caplog.set_level(logging.INFO, logger="appliance")
    first, second = FakeDevice("/dev/scanner"), FakeDevice("/dev/scanner")
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory")
    opener = Opener(first)
    rig = rigs(scanner_cfg(), opener, retry_interval_s=0.01)
    wait_for(lambda: rig.scanner.is_open)
    opener.push(missing, missing, missing, missing, missing, missing, second)
    dev_events = typed(CODE[:7])
    first.push(dev_events)
    wait_for(lambda: first._events == [])
    first.unplug()
    damaged = rig.scan()
    assert damaged.text == "" and "after 7 characters: the scanner went away" in damaged.defect
    wait_for(lambda: second.grabbed)
    wait_for(lambda: len(rig.faults) == 2)  # the recovery is reported just after the grab (a race under load)
    assert rig.faults == ["scanner unplugged: /dev/scanner", None]
    assert first.closed and not first.grabbed
    assert len(opener.paths) >= 8  # it did retry, quietly
    lines = [r.getMessage() for r in caplog.records if r.name == "appliance.scan.evdev"]
    assert sum("unplugged" in m for m in lines) == 1
    assert sum("scanner back" in m for m in lines) == 1
    assert not any("not found" in m for m in lines)  # retries leave no trace at INFO
    second.push(typed(CODE + "\n"))
    assert rig.scan().text == CODE


def test_fail__missing_at_start_then_plugged_in(rigs, caplog):
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory")
    dev = FakeDevice("/dev/scanner")
    rig = rigs(scanner_cfg(), Opener(missing, missing, missing, dev), retry_interval_s=0.01)
    wait_for(lambda: dev.grabbed)
    assert rig.faults == ["scanner not found: /dev/scanner", None]
    assert caplog.text.count("scanner not found") == 1


def test_fail__read_error_reopens_the_device(rigs):
    first, second = FakeDevice("/dev/scanner"), FakeDevice("/dev/scanner")
    rig = rigs(scanner_cfg(), Opener(first, second), retry_interval_s=0.01)
    wait_for(lambda: first.grabbed)
    first.unplug(OSError(errno.EIO, "Input/output error"))
    wait_for(lambda: second.grabbed)
    assert rig.faults == ["scanner read failed: /dev/scanner (Input/output error)", None]


@pytest.mark.parametrize("outcome, reason", [
    (PermissionError(errno.EACCES, "Permission denied"), "scanner not accessible: /dev/scanner (permission denied; the service user needs group input)"),
    (OSError(errno.EIO, "Input/output error"), "scanner cannot be opened: /dev/scanner (Input/output error)"),
    (lambda path: FakeDevice(path, busy=True), "scanner /dev/scanner is grabbed by another process"),
    (lambda path: FakeDevice(path, name="USB Optical Mouse", keys=MOUSE_KEYS), "not a keyboard, not grabbed: /dev/scanner (USB Optical Mouse)"),
    (DeviceError("python-evdev is not installed (No module named 'evdev')"),
     "python-evdev is not installed (No module named 'evdev')"),
])
def test_fail__cannot_use_the_device(rigs, outcome, reason):
    opener = Opener(outcome)
    rig = rigs(scanner_cfg(), opener, retry_interval_s=0.01)
    wait_for(lambda: len(opener.paths) >= 3)  # retried...
    assert rig.faults == [reason]  # ...but reported once
    assert not rig.scanner.is_open
    assert all(d.closed and not d.grabbed for d in opener.devices)


# --- auto-detection --------------------------------------------------------------------------

SCANNER = dict(name="Symbol Technologies, Inc, 2008 Symbol Bar Code Scanner", vid_pid="05e0:1200", keys=KEYBOARD_KEYS)
SCANNER_CC = dict(name="Symbol Technologies, Inc, 2008 Symbol Bar Code Scanner Consumer Control",
                  vid_pid="05e0:1200", keys=CONSUMER_KEYS)
KEYBOARD = dict(name="Logitech USB Keyboard", vid_pid="046d:c31c", keys=KEYBOARD_KEYS)
MOUSE = dict(name="Logitech USB Optical Mouse", vid_pid="046d:c077", keys=MOUSE_KEYS)
SCANNER_2 = dict(name="Honeywell Scanner", vid_pid="0c2e:0b61", keys=KEYBOARD_KEYS)
SCANNER_3 = dict(name="Honeywell Scanner", vid_pid="0c2e:0b61", keys=KEYBOARD_KEYS)


def input_dir(tmp_path, devices: dict[str, dict], by_id: dict[str, str] | None = None):
    """A fake /dev/input: empty eventN files and by-id symlinks; returns (dir, opener)."""
    root = tmp_path / "input"
    (root / "by-id").mkdir(parents=True)
    for node in devices:
        (root / node).touch()
    for link, node in (by_id or {}).items():
        (root / "by-id" / link).symlink_to(f"../{node}")
    real = {str(root / node): spec for node, spec in devices.items()}
    return str(root), Opener(lambda path: FakeDevice(path, **real[os.path.realpath(path)]))


@pytest.mark.parametrize("devices, match, chosen", [
    ({"event0": KEYBOARD, "event3": SCANNER, "event4": SCANNER_CC, "event7": MOUSE},
     dict(match_vid_pid="05e0:1200"), "by-id/usb-Symbol_Bar_Code_Scanner-event-kbd"),
    ({"event0": KEYBOARD, "event3": SCANNER, "event7": MOUSE},
     dict(match_name="bar code"), "by-id/usb-Symbol_Bar_Code_Scanner-event-kbd"),
    ({"event0": KEYBOARD, "event3": SCANNER, "event12": SCANNER_2},
     dict(match_name="scanner", match_vid_pid="0C2E:0B61"), "event12"),  # no by-id link: the node
])
def test_ok__auto_detect_grabs_the_one_match(tmp_path, rigs, devices, match, chosen):
    root, opener = input_dir(tmp_path, devices, {"usb-Symbol_Bar_Code_Scanner-event-kbd": "event3",
                                                 "usb-Logitech_USB_Keyboard-event-kbd": "event0"})
    rig = rigs(scanner_cfg(device="", **match), opener, input_dir=root)
    wait_for(lambda: rig.scanner.is_open)
    grabbed = [d for d in opener.devices if d.grabbed]
    assert [d.path for d in grabbed] == [os.path.join(root, chosen)]
    assert all(d.closed for d in opener.devices if d not in grabbed)  # the survey closed the others
    grabbed[0].push(typed(CODE + "\n"))
    scan = rig.scan()
    assert scan.text == CODE and scan.source == "evdev:" + os.path.join(root, chosen)
    assert rig.faults == []


@pytest.mark.parametrize("devices, match, reason", [
    ({"event0": KEYBOARD, "event7": MOUSE}, dict(match_vid_pid="05e0:1200"),
     "scanner not found: no keyboard device matches VID:PID 05e0:1200"),
    ({"event4": SCANNER_CC}, dict(match_vid_pid="05e0:1200"),  # same VID:PID but no digits: not a scanner
     "scanner not found: no keyboard device matches VID:PID 05e0:1200"),
    ({"event0": KEYBOARD, "event3": SCANNER}, dict(match_name="scanner", match_vid_pid="0c2e:0b61"),
     "scanner not found: no keyboard device matches name containing 'scanner' and VID:PID 0c2e:0b61"),
    ({"event5": SCANNER_2, "event6": SCANNER_3, "event0": KEYBOARD}, dict(match_name="Honeywell"),
     "scanner not chosen: 2 keyboard devices match name containing 'Honeywell' ({root}/event5, {root}/event6); "
     "set scanner.device to one of them"),
    ({}, dict(match_name="scanner"), "scanner not found: no keyboard device matches name containing 'scanner'"),
])
def test_fail__auto_detect_grabs_nothing_unless_exactly_one_matches(tmp_path, rigs, devices, match, reason):
    root, opener = input_dir(tmp_path, devices)
    rig = rigs(scanner_cfg(device="", **match), opener, input_dir=root, retry_interval_s=0.01)
    wait_for(lambda: rig.faults)
    time.sleep(0.05)
    assert rig.faults == [reason.format(root=root)]
    assert not any(d.grabbed for d in opener.devices)
    assert all(d.closed for d in opener.devices)


def test_ok__auto_detect_finds_a_scanner_plugged_in_later(tmp_path, rigs):
    root, opener = input_dir(tmp_path, {"event0": KEYBOARD, "event3": SCANNER})
    os.unlink(os.path.join(root, "event3"))
    rig = rigs(scanner_cfg(device="", match_vid_pid="05e0:1200"), opener, input_dir=root, retry_interval_s=0.01)
    wait_for(lambda: rig.faults)
    open(os.path.join(root, "event3"), "w").close()
    wait_for(lambda: rig.scanner.is_open)
    assert rig.faults == ["scanner not found: no keyboard device matches VID:PID 05e0:1200", None]


# --- list_input_devices ----------------------------------------------------------------------


def test_ok__list_input_devices(tmp_path):
    root, opener = input_dir(tmp_path, {"event10": SCANNER, "event2": KEYBOARD, "event3": MOUSE},
                             {"usb-Symbol_Bar_Code_Scanner-event-kbd": "event10"})
    got = list_input_devices(root, open_device=opener)
    assert got == [
        {"path": f"{root}/event2", "by_id": None, "name": KEYBOARD["name"], "vid_pid": "046d:c31c",
         "phys": "usb-3f980000.usb-1.3/input0", "is_keyboard": True},
        {"path": f"{root}/event3", "by_id": None, "name": MOUSE["name"], "vid_pid": "046d:c077",
         "phys": "usb-3f980000.usb-1.3/input0", "is_keyboard": False},
        {"path": f"{root}/event10", "by_id": f"{root}/by-id/usb-Symbol_Bar_Code_Scanner-event-kbd",
         "name": SCANNER["name"], "vid_pid": "05e0:1200", "phys": "usb-3f980000.usb-1.3/input0", "is_keyboard": True},
    ]
    assert all(d.closed and not d.grabbed for d in opener.devices)


def test_ok__list_input_devices_without_dev_input(tmp_path):
    assert list_input_devices(str(tmp_path / "no-such-dir")) == []
    assert list_input_devices() == [] or os.path.isdir("/dev/input")


def test_fail__list_input_devices_leaves_out_unreadable_ones(tmp_path, caplog):
    root, _ = input_dir(tmp_path, {"event0": KEYBOARD, "event1": SCANNER})
    ok = FakeDevice(f"{root}/event1", **SCANNER)
    opener = Opener(PermissionError(errno.EACCES, "Permission denied"), ok)
    got = list_input_devices(root, open_device=opener)
    assert [d["path"] for d in got] == [f"{root}/event1"]
    assert [r.getMessage() for r in caplog.records] == [
        "1 input devices could not be opened (Permission denied); run as root or join group input"]


# --- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw, key", [
    (dict(device="", match_name="", match_vid_pid=""), "scanner.device"),
    (dict(keymap="dvorak"), "scanner.keymap"),
])
def test_fail__configuration(kw, key):
    with pytest.raises(ConfigError, match=key) as info:
        make_scanner(scanner_cfg(**kw))
    assert info.value.key == key and isinstance(info.value, ValueError)


def test_ok__made_from_config_without_opening_anything():
    scanner = make_scanner(scanner_cfg(keymap="fr"))
    assert isinstance(scanner, EvdevScanner) and not scanner.is_open
    assert str(scanner) == "evdev scanner /dev/scanner"
    assert str(make_scanner(scanner_cfg(device="", match_vid_pid="05e0:1200"))) == "evdev scanner matching VID:PID 05e0:1200"


def test_fail__without_python_evdev(monkeypatch):
    monkeypatch.setitem(sys.modules, "evdev", None)  # `import evdev` now raises ImportError
    with pytest.raises(DeviceError, match="python-evdev is not installed"):
        open_input_device("/dev/scanner")


# --- the kernel: a virtual keyboard through /dev/uinput ---------------------------------------

needs_uinput = pytest.mark.skipif(
    not os.access(UINPUT, os.W_OK),
    reason=f"{UINPUT} is absent or not writable: no virtual keyboard to type on "
           "(load the uinput module and give this user write access to run it)")


def type_on(ui, text: str) -> None:
    for code, value in keystrokes(text):
        ui.write(ecodes.EV_KEY, code, value)
        ui.syn()


@pytest.mark.integration
@needs_uinput
def test_ok__uinput_keyboard_by_path_end_to_end():
    from evdev import InputDevice, UInput

    with UInput({ecodes.EV_KEY: KEYBOARD_KEYS}, name=f"appliance test scanner {os.getpid()}",
                vendor=0x05E0, product=0x1200) as ui:
        rig = Rig(scanner_cfg(device=ui.device.path), None)
        try:
            wait_for(lambda: rig.scanner.is_open, timeout=5)
            other = InputDevice(ui.device.path)
            try:
                with pytest.raises(OSError):  # the grab is exclusive
                    other.grab()
            finally:
                other.close()
            type_on(ui, ORDER + "\n")
            type_on(ui, CODE + "\n")
            got = [rig.scan(5), rig.scan(5)]
            assert [s.text for s in got] == [ORDER, CODE]
            assert {s.source for s in got} == {"evdev:" + ui.device.path}
        finally:
            rig.close()
        assert rig.faults == []


@pytest.mark.integration
@needs_uinput
def test_fail__uinput_keyboard_unplugged_and_replugged():
    from evdev import UInput

    name = f"appliance test scanner {os.getpid()}"
    caps = {ecodes.EV_KEY: KEYBOARD_KEYS}
    ui = UInput(caps, name=name)
    rig = Rig(scanner_cfg(device="", match_name=name), None, retry_interval_s=0.1)
    try:
        wait_for(lambda: rig.scanner.is_open, timeout=5)
        ui.close()  # unplug
        wait_for(lambda: rig.faults, timeout=5)
        ui = UInput(caps, name=name)  # plug back in, maybe under another eventN
        wait_for(lambda: len(rig.faults) == 2, timeout=5)
        assert rig.faults[0].startswith("scanner unplugged: ") and rig.faults[1] is None
        type_on(ui, CODE + "\n")
        assert rig.scan(5).text == CODE
    finally:
        rig.close()
        ui.close()


@pytest.mark.parametrize("etype,code,value,line", [
    (EV_KEY, KEY["1"], 1, "KEY_#"),
    (EV_KEY, KEY["KP7"], 1, "KEY_KP#"),
    (EV_KEY, KEY["A"], 1, "KEY_A"),
    (EV_KEY, KEY["LEFTSHIFT"], 1, "KEY_LEFTSHIFT"),
    (EV_KEY, KEY["1"], 0, None),
    (EV_KEY, KEY["1"], 2, None),
    (EV_SYN, SYN_DROPPED, 0, "SYN_DROPPED (kernel dropped events)"),
    (EV_SYN, 0, 0, None),
])
def test_trace_event_masks_digits(etype, code, value, line):
    from appliance.scan.evdev import trace_event

    assert trace_event(InputEvent(0, 0, etype, code, value)) == line

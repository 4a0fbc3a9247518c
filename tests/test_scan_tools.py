"""Technician's scanner tools: scan-test output is masked; the device listing always answers."""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import sys
import threading
import time
import types

import pytest

from appliance.classify import Classifier, load_rules
from appliance.config import ClassifyConfig, ScannerConfig
from appliance.errors import DeviceError
from appliance.scan import Scan, Scanner
from appliance.scan.serial import SerialScanner, trace_hex
from appliance.scan.tools import list_scanners, scan_test, scanner_for_test, serial_ports

CODE = "134567890123456789"


@pytest.fixture
def classifier() -> Classifier:
    c = ClassifyConfig()
    return Classifier(load_rules(), c.order_pattern, {c.cancel_card: "cancel"})


class ScriptedScanner(Scanner):
    """Delivers a fixed list of scans and faults, then calls `when_done` and waits to be stopped."""

    name = "scanner-scripted"

    def __init__(self, script, when_done=lambda: None, trace_lines: queue.Queue | None = None):
        super().__init__()
        self.script = script
        self.when_done = when_done
        self.trace_lines = trace_lines
        self.closed = False

    def __str__(self) -> str:
        return "scripted scanner"

    def _run(self) -> None:
        for item in self.script:
            if isinstance(item, Scan):
                if self.trace_lines is not None:
                    self.trace_lines.put(trace_hex(item.text.encode() + b"\r"))
                self._on_scan(item)
            else:
                self._on_fault(item)
        self.when_done()
        self._stop.wait()

    def close(self, timeout: float = 2.0) -> None:
        self.closed = True
        super().close(timeout)


SCRIPT = [
    Scan(CODE, "test"),
    Scan("ORD:A1:12.00", "test"),
    Scan("", "test", defect="bytes that are not UTF-8"),
    "scanner port lost: /dev/scanner: read failed",
    None,
    Scan("13456789", "test"),
]


def test_ok__scan_test_prints_masked_lines_until_stopped(classifier):
    stop, out = threading.Event(), io.StringIO()
    scanner = ScriptedScanner(SCRIPT, when_done=stop.set)
    assert scan_test(scanner, classifier, out=out, stop=stop) == 0
    text = out.getvalue()
    assert CODE not in text and "13456789" not in text
    lines = text.splitlines()
    assert lines[1] == "#1   1345**********6789  kind=payment  type=wechat"
    assert lines[2] == "#2   ORD:A1:12.00  kind=order  order=A1 amount=12.00"
    assert lines[3] == "#3   (unreadable)  defect: bytes that are not UTF-8"
    assert lines[4:6] == ["scanner fault: scanner port lost: /dev/scanner: read failed", "scanner back"]
    assert lines[6].startswith("#4   13****89  kind=unknown  reason: too short: 8 digits")
    assert lines[-1] == "Stopped after 4 scans (1 defect, 1 order, 1 payment, 1 unknown)."
    assert scanner.closed


def test_ok__trace_lines_are_printed_before_their_scan_and_mask_digits(classifier):
    stop, out, lines = threading.Event(), io.StringIO(), queue.Queue()
    scanner = ScriptedScanner(SCRIPT[:2], when_done=stop.set, trace_lines=lines)
    scan_test(scanner, classifier, out=out, trace=True, stop=stop, trace_lines=lines)
    text = out.getvalue()
    assert not re.search(r"\d{5}", text.replace("12.00", ""))  # no run of code digits anywhere
    printed = text.splitlines()
    assert printed[1] == "      trace rx 19 bytes: " + "## " * 18 + "0d"
    assert printed[2].startswith("#1   1345**********6789")
    assert printed[3].startswith("      trace rx 13 bytes: 4f 52 44 3a 41 ## 3a")
    assert printed[4].startswith("#2   ORD:A1:12.00")


def test_ok__trace_requested_without_a_trace_source_says_so(classifier):
    stop, out = threading.Event(), io.StringIO()
    scan_test(ScriptedScanner([], when_done=stop.set), classifier, out=out, trace=True, stop=stop)
    assert "no raw trace for this scanner kind" in out.getvalue()
    assert out.getvalue().splitlines()[-1] == "Stopped after 0 scans."


def test_ok__ctrl_c_ends_scan_test_with_exit_code_0(classifier):
    out = io.StringIO()
    scanner = ScriptedScanner(SCRIPT[:1], when_done=lambda: os.kill(os.getpid(), signal.SIGINT))
    # Python's own Ctrl-C handler, as in a terminal: a test run started in the background by a
    # non-interactive shell inherits SIGINT ignored, and the signal would then never arrive.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert scan_test(scanner, classifier, out=out) == 0
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "#1   1345**********6789" in out.getvalue()
    assert scanner.closed


def test_ok__scanner_for_test_gives_serial_a_trace_queue(tmp_path):
    cfg = ScannerConfig(kind="serial", device=str(tmp_path / "absent"))
    scanner, lines = scanner_for_test(cfg, trace=True)
    assert isinstance(scanner, SerialScanner) and isinstance(lines, queue.Queue)
    scanner, lines = scanner_for_test(cfg)
    assert isinstance(scanner, SerialScanner) and lines is None
    scanner, lines = scanner_for_test(ScannerConfig(kind="none"), trace=True)
    assert lines is None


def test_ok__list_scanners_prints_both_categories():
    out = io.StringIO()
    assert list_scanners(out=out) == 0
    text = out.getvalue()
    serial_part, _, input_part = text.partition("Input devices")
    assert serial_part.startswith("Serial / USB-CDC ports")
    assert re.search(r"^  (/dev/\S+|none found)", serial_part, re.M)
    assert re.search(r"^  (/dev/\S+|none found|evdev not available.*|cannot list input devices.*)$", input_part, re.M)


def test_ok__serial_ports_resolve_by_id_links(tmp_path, monkeypatch):
    import serial.tools.list_ports
    from serial.tools.list_ports_common import ListPortInfo

    tty = tmp_path / "ttyACM0"
    tty.touch()
    (tmp_path / "by-id").mkdir()
    link = tmp_path / "by-id" / "usb-Acme_Scanner_0001-if00"
    link.symlink_to(tty)
    info = ListPortInfo(str(tty), skip_link_detection=True)
    info.vid, info.pid, info.description = 0x05E0, 0x1200, "Acme Scanner"
    monkeypatch.setattr(serial.tools.list_ports, "comports", lambda: [info])
    assert serial_ports(by_id_dir=tmp_path / "by-id") == [
        {"device": str(tty), "by_id": str(link), "description": "Acme Scanner", "vid_pid": "05e0:1200"}]
    assert serial_ports(by_id_dir=tmp_path / "nowhere")[0]["by_id"] == ""


def test_ok__list_scanners_shows_input_devices_from_the_evdev_adapter(monkeypatch):
    fake = types.ModuleType("appliance.scan.evdev")
    fake.list_input_devices = lambda: [
        {"path": "/dev/input/event3", "by_id": "/dev/input/by-id/usb-Acme_Scanner-event-kbd",
         "name": "Acme Scanner", "vid_pid": "05e0:1200", "phys": "usb-0000:01:00.0-1.2/input0", "is_keyboard": True}]
    monkeypatch.setitem(sys.modules, "appliance.scan.evdev", fake)
    out = io.StringIO()
    list_scanners(out=out)
    assert ("  /dev/input/by-id/usb-Acme_Scanner-event-kbd -> /dev/input/event3  05e0:1200  'Acme Scanner'  "
            "keyboard  phys=usb-0000:01:00.0-1.2/input0") in out.getvalue().splitlines()
    fake.list_input_devices = lambda: []
    out = io.StringIO()
    list_scanners(out=out)
    assert out.getvalue().splitlines()[-1] == "  none found"


    def no_evdev():
        raise DeviceError("python-evdev is not installed")

    fake.list_input_devices = no_evdev
    out = io.StringIO()
    list_scanners(out=out)
    assert out.getvalue().splitlines()[-1] == "  evdev not available (python-evdev is not installed)"


def test_ok__scan_test_names_a_scanner_without_a_description(classifier):
    from appliance.scan import NoScanner

    stop, out = threading.Event(), io.StringIO()
    stop.set()
    assert scan_test(NoScanner(), classifier, out=out, stop=stop) == 0
    assert out.getvalue().startswith("Reading scans from scanner-none;")


def test_ok__evdev_trace_shows_key_names_with_digits_masked(classifier):
    from appliance.scan.evdev import EvdevScanner
    from test_scan_evdev import FakeDevice, Opener, typed

    device = FakeDevice("/dev/scanner")
    stop, out, lines = threading.Event(), io.StringIO(), queue.Queue()
    cfg = ScannerConfig(kind="evdev", device="/dev/scanner")
    scanner = EvdevScanner(cfg, open_device=Opener(device), on_trace=lines.put)
    runner = threading.Thread(target=scan_test, args=(scanner, classifier),
                              kwargs={"out": out, "trace": True, "stop": stop, "trace_lines": lines})
    runner.start()
    deadline = time.monotonic() + 5
    while not device.grabbed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    device.push(typed(CODE + "\n"))
    while "#1 " not in out.getvalue():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stop.set()
    runner.join(timeout=5)
    text = out.getvalue()
    assert CODE not in text and not re.search(r"\d{5}", text)
    assert text.count("trace KEY_#") == 18 and "trace KEY_ENTER" in text
    assert "#1   1345**********6789  kind=payment  type=wechat" in text

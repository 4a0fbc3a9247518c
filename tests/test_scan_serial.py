"""Serial scanner: the pure frame decoder in tables, the adapter end to end over a real pty pair."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import time

import pytest

from appliance.config import ScannerConfig
from appliance.scan import Scan, make_scanner
from appliance.errors import DeviceError
from appliance.scan.serial import (MAX_FRAME, Frame, FrameDecoder, SerialLink, SerialScanner, terminator_bytes,
                                    trace_hex)

CODE = "134567890123456789"  # 18 digits, a WeChat-shaped payment code


def decode(chunks: list[bytes], **kw) -> list[Frame]:
    d = FrameDecoder(**kw)
    return [f for c in chunks for f in d.feed(c)]


def ok(*texts: str) -> list[Frame]:
    return [Frame(t) for t in texts]


# --- decoder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("terminator, chunks, expected", [
    ("CR", [b"123\r456\r"], ok("123", "456")),
    ("LF", [b"123\n456\n"], ok("123", "456")),
    ("CRLF", [b"123\r\n456\r\n"], ok("123", "456")),
    ("TAB", [b"123\t456\t"], ok("123", "456")),
    ("0x03", [b"123\x03456\x03"], ok("123", "456")),
    ("ENTER", [b"1\r2\n3\r\n4\n\r"], ok("1", "2", "3", "4")),
    ("CR", [b"\r\r123\r"], ok("123")),  # blank frames are skipped
    ("CR", [b"123"], []),  # no terminator yet: nothing
    # terminators split across reads
    ("CRLF", [b"123\r", b"\n456\r", b"\n"], ok("123", "456")),
    ("CRLF", [b"12", b"3", b"\r", b"\n"], ok("123")),
    ("ENTER", [b"123\r", b"\n456\r", b"\n"], ok("123", "456")),
    ("CR", [bytes([b]) for b in b"123\r456\r"], ok("123", "456")),
    # a terminator other than the configured one is a control character, never silently eaten
    ("CR", [b"123\r\n456\r"], [Frame("123"), Frame("", "control character 0x0a in the scan")]),
    ("CRLF", [b"12\r3\r\n"], [Frame("", "control character 0x0d in the scan")]),
])
def test_ok__terminators(terminator, chunks, expected):
    assert decode(chunks, terminator=terminator) == expected


@pytest.mark.parametrize("value, expected", [
    ("ENTER", (b"\r", b"\n")), ("CR", (b"\r",)), ("CRLF", (b"\r\n",)), ("0x03", (b"\x03",)), ("0x0D", (b"\r",)),
])
def test_ok__terminator_bytes(value, expected):
    assert terminator_bytes(value) == expected


@pytest.mark.parametrize("kw, chunks, expected", [
    (dict(strip_aim=True), [b"]Q1" + CODE.encode() + b"\r"], ok(CODE)),
    (dict(strip_aim=True), [b"]C0ORD:A1:12.00\r"], ok("ORD:A1:12.00")),
    (dict(strip_aim=True), [b"]E", b"04006381333931\r"], ok("4006381333931")),
    (dict(strip_aim=True), [CODE.encode() + b"\r"], ok(CODE)),  # no identifier: passed unchanged
    (dict(strip_aim=False), [b"]Q1123\r"], ok("]Q1123")),
    (dict(strip_aim=True), [b"]Q1\r"], [Frame("", "nothing left after stripping prefix, AIM identifier and suffix")]),
    (dict(strip_prefix="S:", strip_suffix=":E"), [b"S:123:E\r"], ok("123")),
    (dict(strip_prefix="\x02", terminator="0x03"), [b"\x02123\x03"], ok("123")),  # STX ... ETX framing
    (dict(strip_prefix="S:", strip_aim=True), [b"S:]Q1123\r"], ok("123")),
    (dict(strip_prefix="S:"), [b"123\r"], [Frame("", "missing the configured prefix 'S:'")]),
    (dict(strip_suffix=":E"), [b"123:\r"], [Frame("", "missing the configured suffix ':E'")]),
])
def test_ok__stripping(kw, chunks, expected):
    kw.setdefault("terminator", "CR")
    assert decode(chunks, **kw) == expected


@pytest.mark.parametrize("chunks, defect", [
    ([b"12\xff34\r"], "bytes that are not UTF-8"),
    ([b"12\xe4", b"\r"], "bytes that are not UTF-8"),  # a cut multi-byte sequence
    ([b"12\x1d34\r"], "control character 0x1d in the scan"),  # GS1 group separator
    ([b"12\x0034\r"], "control character 0x00 in the scan"),
    ([b"12\x7f\r"], "control character 0x7f in the scan"),
    (["12\u200b34\r".encode()], "non-printing character U+200B in the scan"),
])
def test_fail__unreadable_frames_are_defects(chunks, defect):
    assert decode(chunks, terminator="CR") == [Frame("", defect)]


def test_fail__overlong_frame_is_one_defect_and_the_next_frame_is_clean():
    d = FrameDecoder("CRLF")
    frames = []
    for _ in range(3):
        frames += d.feed(b"7" * 2000)
    assert frames == [Frame("", f"longer than {MAX_FRAME} bytes without a terminator")]
    assert d.pending <= 1
    frames += d.feed(b"777\r")  # the rest of the overlong frame, its CRLF split across reads
    frames += d.feed(b"\n123\r\n")
    assert frames[1:] == ok("123")


def test_fail__overlong_frame_arriving_in_one_read():
    assert decode([b"7" * (MAX_FRAME + 1) + b"\r123\r"]) == [Frame("", f"longer than {MAX_FRAME} bytes"), Frame("123")]


def test_ok__discard_drops_the_partial_frame_so_it_is_never_glued_on():
    d = FrameDecoder("CR")
    assert d.feed(b"1234") == []
    assert d.pending == 4
    assert d.discard("cut") == Frame("", "cut")
    assert d.discard("cut") is None
    assert d.feed(b"5678\r") == ok("5678")


def test_ok__trace_masks_every_digit():
    assert trace_hex(b"]Q1" + CODE.encode() + b"\r") == "rx 22 bytes: 5d 51 " + "## " * 19 + "0d"


def test_fail__unknown_terminator():
    with pytest.raises(ValueError):
        FrameDecoder("ETX")


# --- adapter over a pty pair ------------------------------------------------------------------

TIMEOUT = 5.0


class Pty:
    """A pty pair standing in for a scan gun: write on `master`, the adapter reads `path`."""

    def __init__(self):
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)  # the adapter opens the slave by path, like a real port

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


class Running:
    """A started SerialScanner with its scans and faults collected in queues."""

    def __init__(self, device: str, **cfg):
        self.scans: queue.Queue[Scan] = queue.Queue()
        self.faults: queue.Queue[str | None] = queue.Queue()
        self.traces: list[bytes] = []
        cfg = ScannerConfig(kind="serial", device=device, **cfg)
        self.scanner = SerialScanner(cfg, on_trace=self.traces.append, retry_s=0.05)
        self.scanner.start(self.scans.put, self.faults.put)

    def wait_connected(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.scanner.is_connected:
            assert time.monotonic() < deadline, "the adapter never opened the port"
            time.sleep(0.01)

    def next(self) -> Scan:
        return self.scans.get(timeout=TIMEOUT)

    def texts(self, n: int) -> list[str]:
        return [self.next().text for _ in range(n)]


@pytest.fixture
def pty():
    p = Pty()
    yield p
    p.close()


@pytest.fixture
def running():
    started: list[Running] = []

    def start(device: str, **cfg) -> Running:
        r = Running(device, **cfg)
        started.append(r)
        return r

    yield start
    for r in started:
        r.scanner.close()


@pytest.mark.integration
@pytest.mark.parametrize("baudrate", [9600, 115200])
def test_ok__bytes_on_the_wire_become_scans(pty, running, baudrate):
    r = running(pty.path, baudrate=baudrate, terminator="CR", strip_aim=True)
    r.wait_connected()
    pty.write(b"]Q1" + CODE.encode() + b"\rORD:A1:12.00\r")
    first, second = r.next(), r.next()
    assert (first.text, first.defect, first.source) == (CODE, None, f"serial:{pty.path}")
    assert second.text == "ORD:A1:12.00"
    assert b"".join(r.traces) == b"]Q1" + CODE.encode() + b"\rORD:A1:12.00\r"
    assert r.faults.empty()


@pytest.mark.integration
def test_ok__terminator_split_across_writes(pty, running):
    r = running(pty.path, terminator="CRLF", inter_char_timeout_ms=5000)
    r.wait_connected()
    for part in (b"1234", b"5678\r", b"\n90", b"12\r", b"\n"):
        pty.write(part)
        time.sleep(0.03)  # separate reads on the adapter's side
    assert r.texts(2) == ["12345678", "9012"]
    assert r.scans.empty()


@pytest.mark.integration
def test_ok__fifty_codes_back_to_back_arrive_in_order(pty, running):
    r = running(pty.path, baudrate=9600, terminator="CR")
    r.wait_connected()
    codes = [f"13{i:016d}" for i in range(50)]
    pty.write(b"".join(c.encode() + b"\r" for c in codes))
    got = [r.next() for _ in range(50)]
    assert [s.text for s in got] == codes
    assert all(s.defect is None for s in got)
    time.sleep(0.1)
    assert r.scans.empty()


@pytest.mark.integration
def test_fail__frame_without_terminator_times_out_as_a_defect(pty, running):
    r = running(pty.path, terminator="CR", inter_char_timeout_ms=100)
    r.wait_connected()
    pty.write(b"1234\n")  # scanner sends LF, lane expects CR
    scan = r.next()
    assert scan.text == "" and scan.defect.startswith("incomplete scan: no terminator within 100 ms")
    pty.write(b"5678\r")
    assert r.next().text == "5678"


@pytest.mark.integration
def test_ok__port_lost_and_back(tmp_path, running, caplog):
    """Unplug mid-scan and replug, with the device found by a symlink like /dev/serial/by-id/..."""
    caplog.set_level(logging.DEBUG, logger="appliance.scan.serial")
    first, link = Pty(), tmp_path / "usb-Scanner-if00"
    link.symlink_to(first.path)
    r = running(str(link), terminator="CR", inter_char_timeout_ms=10_000)
    r.wait_connected()
    first.write(b"1111\r")
    assert r.next().text == "1111"

    first.write(b"2222")  # half a scan, then the cable is pulled
    deadline = time.monotonic() + TIMEOUT
    while b"".join(r.traces) != b"1111\r2222":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.close()
    cut = r.next()
    assert (cut.text, cut.defect) == ("", "scan cut off: the scanner port was lost mid-scan")
    assert r.faults.get(timeout=TIMEOUT).startswith("scanner port lost: ")
    link.unlink()  # udev removes the by-id link
    time.sleep(0.3)  # several retries while the device is away
    assert not r.scanner.is_connected

    second = Pty()
    try:
        link.symlink_to(second.path)  # plugged back in
        assert r.faults.get(timeout=TIMEOUT) is None
        r.wait_connected()
        second.write(b"3333\r")
        assert r.next().text == "3333"  # not "22223333"
        assert r.scans.empty() and r.faults.empty()
    finally:
        r.scanner.close()
        second.close()
    lost = [m for m in caplog.messages if m.startswith("Scanner port lost")]
    back = [m for m in caplog.messages if m.startswith("Scanner port back")]
    retries = [m for m in caplog.records if m.levelno > logging.DEBUG and "unavailable" in m.getMessage()]
    assert (len(lost), len(back), retries) == (1, 1, [])


@pytest.mark.integration
def test_ok__missing_port_at_start_is_one_fault_then_recovery(tmp_path, running):
    link = tmp_path / "scanner"
    r = running(str(link), terminator="CR")
    assert "does not exist" in r.faults.get(timeout=TIMEOUT)
    time.sleep(0.2)
    assert r.faults.empty()  # one fault per outage, not one per retry
    p = Pty()
    try:
        link.symlink_to(p.path)
        assert r.faults.get(timeout=TIMEOUT) is None
        r.wait_connected()
        p.write(b"42\r")
        assert r.next().text == "42"
    finally:
        r.scanner.close()
        p.close()


@pytest.mark.integration
def test_ok__close_is_prompt_and_idempotent(pty, running):
    r = running(pty.path)
    r.wait_connected()
    t0 = time.monotonic()
    r.scanner.close()
    r.scanner.close()
    assert time.monotonic() - t0 < 1.0
    assert not r.scanner.is_connected


@pytest.mark.integration
def test_fail__link_errors_are_device_errors(pty, tmp_path):
    first, second = SerialLink(pty.path), SerialLink(pty.path)
    first.open()
    try:
        with pytest.raises(DeviceError, match="in use by another program"):
            second.open()  # a scan-test while the service reads the port
        pty.close()
        with pytest.raises(DeviceError, match=pty.path):
            first.read()
    finally:
        first.close()
        first.close()
    with pytest.raises(DeviceError, match="does not exist"):
        SerialLink(str(tmp_path / "absent")).open()


def test_ok__made_by_config_without_opening_anything(tmp_path):
    cfg = ScannerConfig(kind="serial", device=str(tmp_path / "absent"))
    scanner = make_scanner(cfg)
    assert isinstance(scanner, SerialScanner) and not scanner.is_connected
    assert "absent" in str(scanner)
    scanner.close()  # never started: still fine
    default = SerialScanner(dataclasses.replace(cfg, device=""))
    assert default.device == "/dev/scanner"


# --- property: frames survive any split into reads ---------------------------------------------

from hypothesis import given, strategies as st  # noqa: E402

_PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=40)


@pytest.mark.parametrize("terminator,wire", [("CR", b"\r"), ("LF", b"\n"), ("CRLF", b"\r\n"), ("ENTER", b"\r\n"),
                                             ("TAB", b"\t"), ("0x03", b"\x03")])
def test_property_any_chunking_yields_the_same_frames(terminator, wire):
    @given(st.lists(_PRINTABLE, min_size=1, max_size=8), st.data())
    def check(texts, data):
        stream = b"".join(t.encode() + wire for t in texts)
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=10)))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)]) if stream[a:b]]
        assert decode(chunks, terminator=terminator) == ok(*texts)

    check()

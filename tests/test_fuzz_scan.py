"""Fuzzing the scan path: hostile bytes, lines and key events through the real adapters into a real till.

Invariants (see fuzzing.py): no exception escapes, nothing is charged that was not an inserted
order followed by a whole code, no full payment code in the logs, bounded memory. Where an adapter
has a simple reference (stdin lines, serial frames), what it delivers is also compared exactly
with the reference: a scan is always one whole line of the input, never a piece or a splice.

Sizes: hypothesis example counts are kept modest (this file runs in about 15 s); the
floods measured for memory are a few MiB each.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import re
import time

import pytest
from evdev import InputEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import service
from appliance.config import ScannerConfig, from_dict
from appliance.indicator import make_indicator
from appliance.scan import Scan
from appliance.scan.keymap import EV_KEY, EV_SYN, KEY, MAX_CODE, SYN_DROPPED, SYN_REPORT, KeyDecoder
from appliance.scan.evdev import trace_event
from appliance.scan.serial import MAX_FRAME, Frame, FrameDecoder, SerialScanner
from appliance.scan.stdin import MAX_LINE, StdinScanner
from conftest import WECHAT_PAID, WECHAT_PAID_2, WECHAT_PASSWORD_OK, WECHAT_SYSTEMERROR, lane_dict
from fuzzing import (FuzzLane, chunked, code_like, garbage_bytes, garbage_text, logs_discarded, peak_bytes)

FAST = settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WAIT_S = 10.0
#: Memory a flood of garbage may take above what was allocated before it, whatever its size.
FLOOD_BOUND = 512 * 1024


@pytest.fixture
def fuzz(lane, caplog):
    caplog.set_level(logging.DEBUG, logger="appliance")
    return FuzzLane(lane, caplog)


def _example_done(fuzz: FuzzLane) -> None:
    """Check the invariants and start the next example with an empty record (the lane is kept)."""
    fuzz.drain()
    fuzz.assert_nothing_charged()
    fuzz.check()
    fuzz.delivered.clear()
    fuzz.caplog.clear()


# --- the till itself -------------------------------------------------------------------------


def test_the_till_takes_any_scan_text(fuzz):
    text = st.one_of(garbage_text(), code_like(), st.builds(lambda c, n: c * n, garbage_text(3), st.integers(1, 70_000)))

    @FAST
    @given(st.lists(text, max_size=12))
    def run(texts):
        for t in texts:
            fuzz.deliver(Scan(t, "fuzz"))
        _example_done(fuzz)

    run()


def test_the_till_takes_defects_and_cards_in_any_order(fuzz):
    card = fuzz.lane.cfg.classify.cancel_card
    item = st.one_of(garbage_text().map(lambda t: Scan(t, "fuzz")), code_like().map(lambda t: Scan(t, "fuzz")),
                     st.just(Scan(card, "fuzz")), garbage_text().map(lambda d: Scan("", "fuzz", defect=d or "x")))

    @FAST
    @given(st.lists(item, max_size=12))
    def run(scans):
        for s in scans:
            fuzz.deliver(s)
        _example_done(fuzz)

    run()


INSERTED_CODES = [WECHAT_PAID, WECHAT_PAID_2, WECHAT_PASSWORD_OK, WECHAT_SYSTEMERROR, "286123456789012300"]


def test_only_inserted_orders_with_whole_codes_are_charged(tmp_path_factory, caplog):
    """Valid order tickets and codes among garbage: whatever the garbage, a payment is always an
    inserted order with a code that arrived whole, once; the ledger agrees."""
    caplog.set_level(logging.DEBUG, logger="appliance")
    order = st.builds(lambda n, fen: ("order", f"F{n}", f"{fen // 100}.{fen % 100:02d}"),
                      st.integers(1, 4), st.integers(1, 99_999))
    item = st.one_of(garbage_text().map(lambda t: ("text", t)), code_like().map(lambda t: ("text", t)), order,
                     st.sampled_from(INSERTED_CODES).map(lambda c: ("code", c)), st.just(("text", "CMD:CANCEL")))

    @settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(item, max_size=14))
    def run(items):
        cfg = from_dict(lane_dict(tmp_path_factory.mktemp("lane") / "state"))
        lane = service.build(cfg, indicator=make_indicator(cfg.indicator))
        fuzz = FuzzLane(lane, caplog)
        try:
            for kind, *args in items:
                text = {"order": fuzz.inserted_order, "code": fuzz.inserted_code}.get(kind, lambda t: t)(*args)
                fuzz.deliver(Scan(text, "fuzz"))
                fuzz.drain()
                lane.resolver.step()  # uncertain payments move on (their results reach the till)
            fuzz.drain()
            fuzz.check()
        finally:
            lane.close()
            caplog.clear()

    run()


# --- stdin: lines on a pipe ------------------------------------------------------------------


def stdin_reference(data: bytes) -> list[Scan]:
    """What the stdin scanner must deliver for `data` followed by end of input."""
    lines = data.split(b"\n")
    if not lines[-1]:
        lines.pop()
    out = []
    for line in lines:
        if len(line) > MAX_LINE:
            out.append(Scan("", "stdin", defect=f"line longer than {MAX_LINE} bytes"))
            continue
        try:
            out.append(Scan(line.removesuffix(b"\r").decode("utf-8"), "stdin"))
        except UnicodeDecodeError:
            out.append(Scan("", "stdin", defect="bytes that are not UTF-8"))
    return out


def read_stdin(data: bytes, caplog, on_scan=None) -> list[Scan]:
    """Everything a StdinScanner on a pipe delivers for `data`, read until it reports the end of
    input (or passed to `on_scan` instead of being kept)."""
    r, w = os.pipe()
    got: list[Scan] = []
    scanner = StdinScanner(fd=r)
    scanner.start(on_scan or got.append)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(w, view[:65536]):]
        os.close(w)
        deadline = time.monotonic() + WAIT_S
        while not any("stdin closed" in rec.getMessage() for rec in caplog.records):
            assert time.monotonic() < deadline, "the stdin scanner never reached the end of input"
            time.sleep(0.005)
    finally:
        scanner.close()
        os.close(r)
    return got


def _same(got: list[Scan], want: list[Scan]) -> None:
    assert [(s.text, s.defect, s.source) for s in got] == [(s.text, s.defect, s.source) for s in want]


def test_stdin_lines_are_delivered_whole_and_charge_nothing(fuzz):
    @SLOW
    @given(garbage_bytes())
    def run(data):
        fuzz.caplog.clear()
        got = read_stdin(data, fuzz.caplog)
        _same(got, stdin_reference(data))
        for scan in got:
            fuzz.deliver(scan)
        _example_done(fuzz)

    run()


@pytest.mark.parametrize("head", [2 * MAX_LINE, 3 * MAX_LINE])
@pytest.mark.parametrize("tail", [b"", b"\n", b"134567890123456700", b"\xff"])
def test_stdin_end_of_input_inside_an_overlong_line(fuzz, head, tail):
    """Found by fuzzing: input ending inside a line already reported too long delivered its tail
    (here a whole payment code) as a scan of its own."""
    data = b"9" * head + tail
    _same(read_stdin(data, fuzz.caplog), stdin_reference(data))


def test_stdin_tail_of_an_overlong_line_is_never_charged(fuzz):
    order = fuzz.inserted_order("F1", "1.00").encode() + b"\n"
    data = order + b"9" * (2 * MAX_LINE - len(order)) + WECHAT_PAID.encode()
    for scan in read_stdin(data, fuzz.caplog):
        fuzz.deliver(scan)
    fuzz.drain()
    fuzz.check()
    fuzz.assert_nothing_charged()


# --- serial: bytes through the frame decoder, and through a real pty pair --------------------


def serial_reference(data: bytes) -> list[Frame]:
    """What FrameDecoder("ENTER") must return for `data` (frames not yet terminated excepted,
    unless already too long)."""
    *segments, pending = re.split(rb"[\r\n]", data)
    out = []
    for raw in segments:
        if not raw:
            continue
        if len(raw) > MAX_FRAME:
            out.append(Frame("", "defect"))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.append(Frame("", "defect"))
            continue
        out.append(Frame(text) if text.isprintable() else Frame("", "defect"))
    if len(pending) > MAX_FRAME:
        out.append(Frame("", "defect"))
    return out


@FAST
@given(garbage_bytes(), st.lists(st.integers(0, 1 << 20), max_size=30))
def test_serial_frames_are_whole_segments_of_the_input(data, cuts):
    decoder = FrameDecoder("ENTER")
    frames = [f for chunk in chunked(data, cuts) for f in decoder.feed(chunk)]
    assert [(f.text, bool(f.defect)) for f in frames] == [(f.text, bool(f.defect)) for f in serial_reference(data)]
    assert decoder.pending <= MAX_FRAME


@FAST
@given(garbage_bytes(max_run=9000), st.lists(st.integers(0, 1 << 16), max_size=10),
       st.sampled_from(["CR", "LF", "CRLF", "TAB", "0x03", "0x00"]), st.booleans(),
       st.sampled_from(["", "S", "\x02"]), st.sampled_from(["", "E", "\x03\x04"]))
def test_serial_decoder_takes_any_bytes_under_any_framing(data, cuts, terminator, aim, prefix, suffix):
    decoder = FrameDecoder(terminator, strip_aim=aim, strip_prefix=prefix, strip_suffix=suffix)
    for chunk in chunked(data, cuts):
        for frame in decoder.feed(chunk):
            assert (frame.text == "") == bool(frame.defect)
            assert frame.text.isprintable() and len(frame.text.encode()) <= MAX_FRAME
        assert decoder.pending <= MAX_FRAME + 1
    decoder.discard("end")
    assert decoder.pending == 0


class PtyScanner:
    """A SerialScanner reading the slave side of a pty pair; the test writes the master side."""

    def __init__(self, on_scan) -> None:
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)
        cfg = ScannerConfig(kind="serial", device=self.path, inter_char_timeout_ms=60_000)
        self.scanner = SerialScanner(cfg, retry_s=0.05)
        self.scanner.start(on_scan)
        deadline = time.monotonic() + WAIT_S
        while not self.scanner.is_connected:
            assert time.monotonic() < deadline, "the serial scanner never opened the pty"
            time.sleep(0.01)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view[:4096]):]

    def close(self) -> None:
        self.scanner.close()
        os.close(self.master)


def test_serial_pty_garbage_into_the_till_charges_nothing(fuzz):
    """64 KiB lines, NULs, invalid UTF-8, stray CR/LF: through the kernel's tty layer, pyserial
    and the adapter's thread, into the till as the service wires it."""
    arrived: queue.Queue[Scan] = queue.Queue()

    def on_scan(scan: Scan) -> None:
        arrived.put(scan)
        fuzz.deliver(scan)

    port = PtyScanner(on_scan)
    counter = iter(range(1 << 30))
    try:
        @SLOW
        @given(garbage_bytes())
        def run(data):
            sentinel = f"END-{next(counter)}"
            port.write(data + b"\r" + sentinel.encode() + b"\r")
            deadline = time.monotonic() + WAIT_S
            while True:
                scan = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
                if scan.text == sentinel:
                    break
            frames = [f for f in serial_reference(data + b"\r") if f.text or f.defect]
            got = [s for s in fuzz.delivered if s.text != sentinel]
            assert [s.text for s in got] == [f.text for f in frames]
            _example_done(fuzz)

        run()
    finally:
        port.close()


# --- evdev: key-event floods through the adapter's decoder ------------------------------------

_NO_COLON_KEYS = [c for c in range(0, 260) if c != KEY["SEMICOLON"]]  # ':' is Shift+; on "us"


def _key_event() -> st.SearchStrategy[tuple[int, int, int, int]]:
    return st.one_of(
        st.tuples(st.integers(0, 150_000), st.just(EV_KEY), st.sampled_from(_NO_COLON_KEYS), st.sampled_from([0, 1, 1, 2])),
        st.tuples(st.integers(0, 2000), st.just(EV_SYN), st.sampled_from([SYN_REPORT, SYN_REPORT, SYN_DROPPED, 2]),
                  st.just(0)),
        st.tuples(st.integers(-2_000_000, 2_000_000), st.integers(0, 31), st.integers(0, 767), st.integers(-3, 3)),
    )


def _flood(seed: int, n: int) -> list[tuple[int, int, int, int]]:
    """`n` events from a seeded generator: a scanner typing fast (gaps of 0-30 ms), digits and
    Enter most of all, with modifiers, lock keys, releases, repeats and SYN reports among them."""
    rng = random.Random(seed)
    keys = [KEY[k] for k in "1234567890"] * 3 + [KEY["ENTER"]] * 2 + [
        KEY[k] for k in ("LEFTSHIFT", "RIGHTALT", "LEFTCTRL", "CAPSLOCK", "NUMLOCK", "KP5", "KPDOT", "TAB", "A", "Q")]
    out = []
    for _ in range(n):
        if rng.random() < 0.3:
            out.append((rng.randrange(0, 200), EV_SYN, SYN_DROPPED if rng.random() < 0.01 else SYN_REPORT, 0))
        else:
            out.append((rng.randrange(0, 30_000), EV_KEY, rng.choice(keys), rng.choice((0, 1, 1, 2))))
    return out


def key_events() -> st.SearchStrategy[list[tuple[int, int, int, int]]]:
    """(microseconds since the previous event, type, code, value): keys (never ';'), SYN_REPORT,
    SYN_DROPPED, other event types, repeats and odd values, time even stepping back; hand-drawn
    events around a seeded flood of up to 5000."""
    return st.builds(lambda a, flood, b: a + flood + b, st.lists(_key_event(), max_size=40),
                     st.builds(_flood, st.integers(0, 2**32), st.integers(0, 5000)), st.lists(_key_event(), max_size=40))


def decode_keys(decoder: KeyDecoder, events, start: float = 1_700_000_000.0) -> list[Scan]:
    """Feed `events` as real evdev InputEvents; the reader's monotonic clock follows the events."""
    scans: list[Scan] = []
    t = start
    for dt_us, etype, code, value in events:
        t = max(0.0, t + dt_us / 1e6)
        event = InputEvent(int(t), int(t % 1 * 1e6), etype, code, value)
        trace_event(event)  # what `scan-test --trace` prints for it
        scans += decoder.feed(event, t)
        scans += decoder.expire(t)
        assert decoder.pending <= MAX_CODE
    return scans + decoder.expire(t + 3600)


@pytest.mark.parametrize("keymap", ["us", "de", "fr"])
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(events=key_events(), terminator=st.sampled_from(["ENTER", "TAB", "0x03"]))
def test_evdev_decoder_takes_any_event_stream(keymap, events, terminator):
    for scan in decode_keys(KeyDecoder(keymap, terminator, 100, source="evdev:fuzz"), events):
        assert (scan.text == "") == bool(scan.defect)
        assert len(scan.text) <= MAX_CODE and "\n" not in scan.text


def test_evdev_key_floods_into_the_till_charge_nothing(fuzz):
    @FAST
    @given(key_events())
    def run(events):
        for scan in decode_keys(KeyDecoder("us", "ENTER", 100, source="evdev:fuzz"), events):
            fuzz.deliver(scan)
        _example_done(fuzz)

    run()


# --- bounded memory --------------------------------------------------------------------------


def _garbage_stream(size: int, seed: int) -> list[bytes]:
    """`size` bytes of reproducible garbage in 4 KiB reads (a serial read takes at most MAX_FRAME):
    long runs with no terminator, random bytes, and bursts of short frames."""
    rng = random.Random(seed)
    chunks = []
    while size > 0:
        kind = rng.random()
        if kind < 0.4:
            chunk = bytes([rng.choice(b"9a\x00\xff")]) * 4096
        elif kind < 0.8:
            chunk = rng.randbytes(4096)
        else:
            chunk = b"13456789\r" * 455
        chunks.append(chunk[:4096])
        size -= 4096
    return chunks


def test_memory_stays_bounded_under_a_serial_flood():
    chunks = _garbage_stream(4 << 20, seed=1)
    decoder = FrameDecoder("ENTER")

    def feed():
        for c in chunks:
            decoder.feed(c)

    peak = peak_bytes(feed)
    assert peak < FLOOD_BOUND, f"{peak} bytes"


def test_memory_stays_bounded_under_a_key_flood():
    rng = random.Random(2)
    keys = [KEY[k] for k in "1234567890"] + [KEY["ENTER"], KEY["LEFTSHIFT"], KEY["A"], 59]  # 59: F1
    events = [InputEvent(1_700_000_000 + i // 1000, i % 1000 * 1000, EV_KEY, rng.choice(keys), rng.choice([0, 1]))
              for i in range(200_000)]
    decoder = KeyDecoder("us", "ENTER", 100)

    def feed():
        for e in events:
            decoder.feed(e, e.sec + e.usec / 1e6)

    peak = peak_bytes(feed)
    assert peak < FLOOD_BOUND, f"{peak} bytes"


def test_memory_stays_bounded_feeding_the_till_a_flood(fuzz):
    """5 000 garbage scans of every kind through the till (logs formatted and dropped)."""
    rng = random.Random(3)
    texts = [rng.choice(["", "x" * 70_000, "1345678901234567" + str(i % 100).zfill(2), f"junk{i}", "\x00\x1b[2J",
                         "CMD:CANCEL"]) for i in range(5_000)]

    def feed():
        for t in texts:
            fuzz.lane.till.handle_scan(Scan(t, "fuzz"))

    with logs_discarded():
        peak = peak_bytes(feed)
    assert peak < FLOOD_BOUND, f"{peak} bytes"
    fuzz.assert_nothing_charged()
    assert fuzz.lane.till._recent_codes == {}


def test_memory_stays_bounded_under_a_stdin_flood(caplog):
    caplog.set_level(logging.INFO, logger="appliance")
    data = b"".join(_garbage_stream(4 << 20, seed=4))
    peak = peak_bytes(lambda: read_stdin(data, caplog, on_scan=lambda scan: None))
    assert peak < FLOOD_BOUND, f"{peak} bytes"

"""`kind = "serial"`: a scan gun in serial or USB-CDC ("USB COM") mode, read with pyserial.

Two parts, kept apart so the protocol can be table-tested without a port:

* `FrameDecoder` (pure): raw bytes in, `Frame`s out. It cuts the byte stream at the terminator
  (wherever the reads happened to split it), strips the configured prefix, AIM symbology
  identifier and suffix, and rejects what it cannot read with certainty: bytes that are not
  UTF-8, control characters inside the data, frames longer than `MAX_FRAME` bytes. A rejected
  frame becomes a `Frame` with `defect` set and empty text; nothing is ever guessed or repaired.
* `SerialLink` (thin transport): opens the port by path, reads what has arrived, closes. It
  translates pyserial and OS errors into `DeviceError` at this boundary.

`SerialScanner` joins the two in its reader thread and owns the outage policy: when the port
goes away (USB unplug, the by-id link vanishing) it drops any half-read frame as a defect, logs
once, calls `on_fault(reason)` once, looks for the path again every `retry_s` seconds without
logging each attempt, and when the port opens again logs once and calls `on_fault(None)`.

Terminators (`[scanner] terminator`): "CR", "LF", "CRLF", "TAB" or one byte "0xNN" end a frame
exactly there; any other control byte inside a frame is a defect (so a scanner sending CRLF to
a lane set to CR shows up as defects, not as silently altered codes). "ENTER" (the default) is
lenient: CR, LF and CRLF all end a frame. In every mode a terminator with no data before it
(the LF of a CRLF under ENTER, a blank line) is skipped silently.

Prefix, AIM identifier and suffix are stripped in the order a scanner sends them:
`[prefix][AIM id][data][suffix][terminator]`. A configured prefix or suffix that is missing makes
the frame a defect (a missing suffix usually means a cut frame). An AIM identifier (`]` + a
letter + one character, e.g. `]Q1`, `]C0`, `]E0`) is stripped when present; frames without one
pass unchanged, since scanners may send identifiers for some symbologies only.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import serial

from appliance.errors import DeviceError
from appliance.redact import printable
from appliance.scan import Scan, Scanner, scanners

log = logging.getLogger(__name__)

#: A frame longer than this without a terminator is a defect; the rest up to the next terminator is dropped.
MAX_FRAME = 4096
#: Port used when `[scanner] device` is empty: the symlink made by image/udev/99-appliance-scanner.rules.
DEFAULT_DEVICE = "/dev/scanner"
#: A SerialLink's read timeout unless given: how long one read waits for a first byte. The scanner
#: itself waits without limit while no scan is half received (`cancel()` ends that wait).
READ_TIMEOUT_S = 0.2
#: `SerialLink.read(timeout_s=...)` default: the link's own timeout.
_CONFIGURED = object()
#: How often a lost port is looked for again.
RETRY_S = 1.0

_TERMINATORS = {"CR": b"\r", "LF": b"\n", "CRLF": b"\r\n", "TAB": b"\t"}
_AIM_ID = re.compile(r"\][A-Za-z][!-~]")
_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
_STOPBITS = {1: serial.STOPBITS_ONE, 2: serial.STOPBITS_TWO}
_BYTESIZE = {7: serial.SEVENBITS, 8: serial.EIGHTBITS}

OnTrace = Callable[[bytes], None]


# --- protocol --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One decoded scan: `text`, or empty text and the `defect` that made it unreadable."""

    text: str
    defect: str | None = None


def terminator_bytes(terminator: str) -> tuple[bytes, ...]:
    """The byte sequences that end a frame for a validated `[scanner] terminator` value."""
    t = terminator.upper()
    if t == "ENTER":
        return (b"\r", b"\n")
    if t in _TERMINATORS:
        return (_TERMINATORS[t],)
    if re.fullmatch(r"0X[0-9A-F]{2}", t):
        return (bytes([int(t[2:], 16)]),)
    raise ValueError(f"unknown terminator {terminator!r}")


class FrameDecoder:
    """Cuts a serial byte stream into frames. Pure: no I/O, no clock, no threads.

    `feed(chunk)` takes bytes exactly as a read returned them and returns the frames they
    complete, in order; an incomplete frame (including half of a CRLF) waits for the next chunk.
    `discard(why)` drops the incomplete frame, e.g. when the port is lost, so it can never be
    glued to bytes read later.
    """

    def __init__(self, terminator: str = "ENTER", *, strip_aim: bool = False, strip_prefix: str = "",
                 strip_suffix: str = "", max_frame: int = MAX_FRAME):
        self._ends = terminator_bytes(terminator)
        self._split = re.compile(b"|".join(re.escape(e) for e in self._ends))
        self._keep = max(len(e) for e in self._ends) - 1  # bytes that may be the start of a terminator
        self._strip_aim = strip_aim
        self._prefix = strip_prefix
        self._suffix = strip_suffix
        self._max = max_frame
        self._buf = b""
        self._overlong = False  # inside a frame already reported as too long: drop up to its terminator

    @classmethod
    def from_config(cls, cfg) -> FrameDecoder:
        """A decoder for a `ScannerConfig`."""
        return cls(cfg.terminator, strip_aim=cfg.strip_aim, strip_prefix=cfg.strip_prefix,
                   strip_suffix=cfg.strip_suffix)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (0 between frames)."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Frame]:
        frames: list[Frame] = []
        self._buf += chunk
        while True:
            m = self._split.search(self._buf)
            if m is None:
                break
            raw, self._buf = self._buf[:m.start()], self._buf[m.end():]
            if self._overlong:
                self._overlong = False
                continue
            frame = self._frame(raw)
            if frame is not None:
                frames.append(frame)
        if len(self._buf) > self._max:
            if not self._overlong:
                frames.append(Frame("", f"longer than {self._max} bytes without a terminator"))
                self._overlong = True
            self._buf = self._buf[len(self._buf) - self._keep:] if self._keep else b""
        return frames

    def discard(self, why: str) -> Frame | None:
        """Drop the incomplete frame. Returns it as a defect `why`, or None if nothing was held."""
        held, self._buf = self._buf, b""
        was_overlong, self._overlong = self._overlong, False
        if held and not was_overlong:
            return Frame("", why)
        return None

    def _frame(self, raw: bytes) -> Frame | None:
        if not raw:
            return None
        if len(raw) > self._max:
            return Frame("", f"longer than {self._max} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return Frame("", "bytes that are not UTF-8")
        if self._prefix:
            if not text.startswith(self._prefix):
                return Frame("", f"missing the configured prefix {printable(self._prefix)!r}")
            text = text[len(self._prefix):]
        if self._suffix:
            if not text.endswith(self._suffix):
                return Frame("", f"missing the configured suffix {printable(self._suffix)!r}")
            text = text[:len(text) - len(self._suffix)]
        if self._strip_aim and _AIM_ID.match(text):
            text = text[3:]
        for c in text:
            if not c.isprintable():
                what = f"control character 0x{ord(c):02x}" if ord(c) < 0x80 else f"non-printing character U+{ord(c):04X}"
                return Frame("", f"{what} in the scan")
        if not text:
            return Frame("", "nothing left after stripping prefix, AIM identifier and suffix")
        return Frame(text)


def trace_hex(chunk: bytes) -> str:
    """A raw chunk as hex for `appliance scan-test --trace`, every digit byte shown as `##`.

    All digits are masked, not only long runs: a payment code may arrive one byte per read,
    and a trace must never let a code be pieced together again.
    """
    cells = ["##" if 0x30 <= b <= 0x39 else f"{b:02x}" for b in chunk]
    return f"rx {len(chunk)} bytes: {' '.join(cells)}"


# --- transport -------------------------------------------------------------------------------


def _describe(e: BaseException) -> str:
    if "exclusively lock" in str(e):
        return "in use by another program"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return str(e) or type(e).__name__


class SerialLink:
    """Thin pyserial transport: open by path, read what has arrived, close.

    Every failure is raised as `DeviceError` with a short reason; pyserial exceptions do not
    leave this class. The port is opened exclusively, so a second reader (a technician's
    scan-test while the service runs) gets a clear "in use" error instead of stealing bytes,
    and opening discards whatever the port buffered before (stale scans must not be charged).
    """

    def __init__(self, path: str, *, baudrate: int = 9600, bytesize: int = 8, parity: str = "N",
                 stopbits: int = 1, timeout: float = READ_TIMEOUT_S):
        self.path = path
        self._settings = dict(baudrate=baudrate, bytesize=_BYTESIZE[bytesize], parity=_PARITY[parity],
                              stopbits=_STOPBITS[stopbits], timeout=timeout)
        self._port: serial.Serial | None = None

    def open(self) -> None:
        if not os.path.exists(self.path):
            raise DeviceError(f"{self.path} does not exist")
        try:
            port = serial.Serial(self.path, exclusive=True, **self._settings)
            port.reset_input_buffer()
        except (serial.SerialException, OSError, ValueError) as e:
            raise DeviceError(f"{self.path}: {_describe(e)}") from None
        self._port = port

    def read(self, timeout_s=_CONFIGURED) -> bytes:
        """What has arrived: waits up to `timeout_s` (None: until a byte or `cancel()`; default:
        the link's timeout) for a first byte, then takes all that is buffered."""
        port = self._port
        if port is None:
            raise DeviceError(f"{self.path} is not open")
        try:
            timeout_s = self._settings["timeout"] if timeout_s is _CONFIGURED else timeout_s
            if port.timeout != timeout_s:
                port.timeout = timeout_s
            data = port.read(1)
            if data:
                waiting = port.in_waiting
                if waiting:
                    data += port.read(min(waiting, MAX_FRAME))
            return data
        except (serial.SerialException, OSError) as e:
            raise DeviceError(f"{self.path}: {_describe(e)}") from None

    def cancel(self) -> None:
        """Make a read waiting in another thread return at once (empty); the next read if none
        waits. Safe from any thread, also when the port is closed."""
        port = self._port
        if port is not None:
            try:
                port.cancel_read()
            except (serial.SerialException, OSError, ValueError):
                pass  # closed meanwhile: nobody waits on it

    def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError):
                pass  # the device is gone already; nothing left to release


# --- adapter ---------------------------------------------------------------------------------


@scanners.register("serial")
class SerialScanner(Scanner):
    """Reads scans from a serial / USB-CDC scan gun (`[scanner] kind = "serial"`).

    `cfg` is a `ScannerConfig`; `device` should be a stable path (`/dev/scanner` from the udev
    rule, the default when empty, or `/dev/serial/by-id/...`), never `/dev/ttyACM0`, whose number
    changes between plugs. `on_trace(chunk)`, if given, is called in the reader thread with each
    raw chunk before it is decoded (for `appliance scan-test --trace`; see `trace_hex`); it must
    not block or raise. `retry_s` is how often a lost port is looked for again.

    A partial frame older than `inter_char_timeout_ms` (no byte and no terminator for that long)
    is dropped as a defect: it usually means the terminator is configured wrong.
    """

    name = "scanner-serial"
    opens_device = True

    def __init__(self, cfg, on_trace: OnTrace | None = None, *, retry_s: float = RETRY_S):
        super().__init__()
        self._cfg = cfg
        self.device = cfg.device or DEFAULT_DEVICE
        self.source = f"serial:{self.device}"
        self._gap_s = cfg.inter_char_timeout_ms / 1000
        self._link = SerialLink(self.device, baudrate=cfg.baudrate, bytesize=cfg.bytesize,
                                parity=cfg.parity, stopbits=cfg.stopbits, timeout=None)
        self._stop.on_set(self._link.cancel)
        self._on_trace = on_trace
        self._retry_s = retry_s
        self._connected = False
        FrameDecoder.from_config(cfg)  # a bad terminator fails here, at wiring, not in the thread

    @property
    def is_connected(self) -> bool:
        """True while the port is open and being read."""
        return self._connected

    def __str__(self) -> str:
        c = self._cfg
        return (f"serial scanner {self.device} ({c.baudrate} {c.bytesize}{c.parity}{c.stopbits}, "
                f"terminator {c.terminator})")

    def _run(self) -> None:
        decoder = FrameDecoder.from_config(self._cfg)
        faulted = False
        last_data = time.monotonic()
        try:
            while not self._stop.is_set():
                if not self._connected:
                    try:
                        self._link.open()
                    except DeviceError as e:
                        if not faulted:
                            faulted = True
                            log.warning("Scanner port unavailable: %s; looking for it every %gs", e, self._retry_s)
                            self._on_fault(f"scanner port unavailable: {e}")
                        else:
                            log.debug("Scanner port still unavailable: %s", e)
                        self._first_attempt_done()
                        self._stop.wait(self._retry_s)
                        continue
                    self._connected = True
                    if faulted:
                        faulted = False
                        log.info("Scanner port back: %s", self)
                        self._on_fault(None)
                    else:
                        log.info("Reading %s", self)
                    self._first_attempt_done()
                if self._stop.is_set():  # set while the port opened: its cancel() found no port to wake
                    break
                try:  # idle: sleep until bytes come or close() cancels; mid-scan: until the gap runs out
                    chunk = self._link.read(max(0.02, self._gap_s) if decoder.pending else None)
                except DeviceError as e:
                    self._link.close()
                    self._connected = False
                    faulted = True
                    cut = decoder.discard("scan cut off: the scanner port was lost mid-scan")
                    if cut is not None:
                        self._deliver(cut)
                    log.warning("Scanner port lost: %s; looking for it every %gs", e, self._retry_s)
                    self._on_fault(f"scanner port lost: {e}")
                    self._stop.wait(self._retry_s)  # a port that opens but fails every read must not spin
                    continue
                now = time.monotonic()
                if not chunk:
                    if decoder.pending and now - last_data >= self._gap_s:
                        stale = decoder.discard(f"incomplete scan: no terminator within "
                                                f"{self._cfg.inter_char_timeout_ms} ms (check [scanner] terminator)")
                        if stale is not None:
                            self._deliver(stale)
                    continue
                last_data = now
                if self._on_trace is not None:
                    self._on_trace(chunk)
                for frame in decoder.feed(chunk):
                    self._deliver(frame)
        finally:
            self._link.close()
            self._connected = False

    def _deliver(self, frame: Frame) -> None:
        if frame.defect:
            log.debug("Defective scan from %s: %s", self.device, frame.defect)
        self._on_scan(Scan(frame.text, self.source, defect=frame.defect))

"""The Scanner port: whatever reads the scan gun delivers `Scan`s to one callback.

Contract for adapters (one per file, chosen by `[scanner] kind`):
  * `start(on_scan)` starts reading in a background thread and returns at once;
    `on_scan(scan)` is called from that thread, one call per scan, in order.
  * A scan the adapter knows to be damaged (events dropped by the kernel, characters arriving
    too slowly, a missing terminator, undecodable bytes) is delivered with `defect` set and its
    `text` empty: the till signals unknown_code and never treats it as a code.
  * Device loss is not fatal: the adapter logs it once, calls `on_fault(reason)` once, retries
    quietly, and when the device is back logs once more and calls `on_fault(None)`.
  * An adapter that opens a device sets `opens_device` and calls `_first_attempt_done()` once
    its first attempt to open it has ended, opened or not (then after its `on_fault`), so that
    `wait_first_attempt()` lets the service report READY to systemd with the scanner up, or known
    to be missing, never while it is still being opened.
  * `close()` stops the thread within about a second and is safe to call twice.
  * An idle reader sleeps until its device has bytes or the scanner is closed: it blocks on its fd
    beside `self._wake_fd` (select), or in `self._stop.wait()`; a timeout only for a deadline
    that is really due (a code half typed). It never wakes just to look at the stop event.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from appliance.redact import mask
from appliance.registry import Registry
from appliance.wakeup import Stop, WakePipe


@dataclass(frozen=True)
class Scan:
    text: str
    source: str  # adapter and device, e.g. "stdin" or "evdev:/dev/input/by-id/usb-..."
    at: float = field(default_factory=time.monotonic)  # monotonic seconds
    defect: str | None = None  # set when the adapter knows the scan is damaged

    def __repr__(self) -> str:  # the text may be a payment code: one stray log of a Scan must not leak it
        return f"Scan(text={mask(self.text)!r}, source={self.source!r}, at={self.at!r}, defect={self.defect!r})"


OnScan = Callable[[Scan], None]
OnFault = Callable[[str | None], None]  # reason, or None when the device is back


class Scanner(ABC):
    """Base for scanner adapters: a daemon reader thread with a stop event, and a wake-up fd that
    becomes readable when the scanner is closed (for readers that select() on their device)."""

    name = "scanner"
    #: True for adapters that open a device in their thread (see `wait_first_attempt`).
    opens_device = False

    def __init__(self) -> None:
        self._stop = Stop()
        self._wake = WakePipe()
        self._stop.on_set(self._wake.wake)
        self._first_attempt = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_scan: OnScan = lambda scan: None
        self._on_fault: OnFault = lambda reason: None

    def start(self, on_scan: OnScan, on_fault: OnFault | None = None) -> None:
        self._on_scan = on_scan
        self._on_fault = on_fault or (lambda reason: None)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def _wake_fd(self) -> int:
        """Readable once `close()` was called: select() on it beside the device's fd."""
        return self._wake.fd

    @abstractmethod
    def _run(self) -> None:
        """Read until `self._stop` is set, sleeping only in waits that `close()` ends (see above)."""

    def _first_attempt_done(self) -> None:
        """Called by the reader thread when its first attempt to open the device has ended."""
        self._first_attempt.set()

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds, after `start()`, until the device is open or its absence
        reported (`on_fault` called). True at once for adapters that open no device; False if the
        first attempt has not ended in time."""
        return not self.opens_device or self._first_attempt.wait(timeout)

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if not thread.is_alive():
                self._wake.close()


#: kind -> factory `(cfg: ScannerConfig) -> Scanner`; each adapter file registers itself. The
#: options are the `[scanner]` section (shared by all kinds, for now).
scanners = Registry("scanner", {"stdin": "appliance.scan.stdin", "serial": "appliance.scan.serial",
                                "evdev": "appliance.scan.evdev"})


@scanners.register("none")
def _no_scanner(cfg) -> Scanner:
    return NoScanner()


class NoScanner(Scanner):
    """`kind = "none"`: no scan gun; charges arrive only by command."""

    name = "scanner-none"

    def _run(self) -> None:
        self._stop.wait()


def make_scanner(cfg) -> Scanner:
    """The adapter named by `cfg.kind` (a ScannerConfig). Opens nothing until `start()`.
    Raises ConfigError naming `scanner.kind` if that adapter cannot be loaded."""
    return scanners.get(cfg.kind, "scanner.kind").factory(cfg)

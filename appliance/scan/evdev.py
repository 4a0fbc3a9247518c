"""`kind = "evdev"`: a USB keyboard-wedge scan gun read through the Linux input subsystem.

The scanner is a keyboard as far as the kernel is concerned. This adapter opens its event
device, grabs it (EVIOCGRAB: the scanner's keys reach no console, no login prompt, no other
reader while we hold it) and decodes the key presses with `keymap.KeyDecoder`.

Which device:
  * `[scanner] device` set: that path. Prefer a stable one, `/dev/input/by-id/usb-...-event-kbd`
    or the `/dev/scanner` symlink of image/udev/99-appliance-scanner.rules; `/dev/input/eventN`
    numbers change between boots.
  * `device = ""`: auto-detect among keyboard-like devices (`is_keyboard` in
    `list_input_devices`) by `match_name` (case-insensitive substring of the device name) and/or
    `match_vid_pid`. Exactly one must match; with none or several nothing is grabbed (grabbing the
    wrong one would lock a real keyboard) and the fault says which devices matched.

Hazards: the service user needs read access to the device (group `input`, see the udev rule).
Grabbing fails with EBUSY while another process holds the grab. python-evdev is imported only
when a device is opened, so this module imports (and the rest of the service runs) without it.
Nothing evdev-specific leaves this module: open failures become `DeviceError`s, read failures a
fault reason string.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import select
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from appliance.errors import ConfigError, DeviceError
from appliance.redact import mask
from appliance.scan import Scan, Scanner, scanners
from appliance.scan.keymap import EV_KEY, EV_SYN, KEY, SYN_DROPPED, KeyDecoder, key_name

if TYPE_CHECKING:
    from appliance.config import ScannerConfig

log = logging.getLogger(__name__)

INPUT_DIR = "/dev/input"


#: Keys a device must have to count as a keyboard a scanner could type codes on.
_DIGIT_KEYS = frozenset(KEY[d] for d in "1234567890") | frozenset(KEY[f"KP{d}"] for d in range(10))


class InputDeviceLike(Protocol):
    """The part of `evdev.InputDevice` this adapter uses (tests supply their own)."""

    path: str
    name: str
    phys: str
    info: Any  # .vendor, .product (ints)

    @property
    def fd(self) -> int: ...  # a non-blocking fd select() can wait on

    def read(self) -> Iterable[Any]: ...  # InputEvents; BlockingIOError when none are queued

    def capabilities(self) -> dict[int, list[int]]: ...

    def grab(self) -> None: ...

    def ungrab(self) -> None: ...

    def close(self) -> None: ...


OpenDevice = Callable[[str], InputDeviceLike]


def open_input_device(path: str) -> InputDeviceLike:
    """Open an event device with python-evdev. Raises OSError from the open, or DeviceError
    when python-evdev is not installed."""
    try:
        import evdev
    except ImportError as e:
        raise DeviceError(f"python-evdev is not installed ({e})") from None
    return evdev.InputDevice(path)


def is_keyboard(device: InputDeviceLike) -> bool:
    """True if the device can press Enter and type digits (the row or the keypad) or letters."""
    keys = set(device.capabilities().get(EV_KEY, ()))
    return KEY["ENTER"] in keys and bool(keys & (_DIGIT_KEYS | {KEY["A"]}))


def list_input_devices(input_dir: str = INPUT_DIR, *, open_device: OpenDevice | None = None) -> list[dict]:
    """Describe every event device: what `appliance scanners` shows the technician.

    Each dict has `path` (/dev/input/eventN), `by_id` (its /dev/input/by-id symlink, or None),
    `name`, `vid_pid` ("vvvv:pppp", lowercase hex), `phys` and `is_keyboard`. Devices are opened
    read-only for a moment and never grabbed. Returns [] when `input_dir` does not exist (a
    container, a machine without input devices). Devices this user may not open are left out
    with one warning (they need group `input` or root). Raises DeviceError when python-evdev
    is not installed.
    """
    found, unreadable = _survey(input_dir, open_device or open_input_device)
    if unreadable:
        log.warning("%d input devices could not be opened (%s); run as root or join group input",
                    len(unreadable), "; ".join(sorted({why for _, why in unreadable})))
    return found


def _survey(input_dir: str, open_device: OpenDevice) -> tuple[list[dict], list[tuple[str, str]]]:
    """(device dicts, [(path, why not opened)]) for the event devices in input_dir."""
    if not os.path.isdir(input_dir):
        return [], []
    by_id: dict[str, str] = {}
    for link in sorted(glob.glob(os.path.join(input_dir, "by-id", "*"))):
        by_id.setdefault(os.path.realpath(link), link)  # first in sort order: "-event-kbd" before "-if01-..."
    found: list[dict] = []
    unreadable: list[tuple[str, str]] = []
    for path in sorted(glob.glob(os.path.join(input_dir, "event*")), key=_natural):
        try:
            dev = open_device(path)
        except OSError as e:
            unreadable.append((path, e.strerror or str(e)))
            continue
        try:
            found.append({
                "path": path,
                "by_id": by_id.get(os.path.realpath(path)),
                "name": dev.name,
                "vid_pid": f"{dev.info.vendor:04x}:{dev.info.product:04x}",
                "phys": dev.phys,
                "is_keyboard": is_keyboard(dev),
            })
        except OSError as e:
            unreadable.append((path, e.strerror or str(e)))
        finally:
            _quietly(dev.close)
    return found, unreadable


def _natural(path: str) -> tuple:
    """Sort key putting event2 before event10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path))


@scanners.register("evdev")
class EvdevScanner(Scanner):
    """Reads one grabbed keyboard-wedge scanner; see the module docstring for device selection.

    Scans are delivered as `Scan(text, "evdev:<path>", at)`; damaged ones (see `KeyDecoder`)
    with `defect` set and empty text, each with one warning log line. The reader thread never
    dies of a device problem: losing the device (unplug = ENODEV, any read error, not found,
    not openable, not grabbable, ambiguous auto-detect) logs one warning and calls
    `on_fault(reason)` once per outage; it then retries every `retry_interval_s` seconds without
    logging, and when the device is open and grabbed again logs once and calls `on_fault(None)`.
    A code being typed when the device goes away is delivered as a defect.
    `close()` wakes the reader at once, ungrabs and closes the device.
    """

    name = "scanner-evdev"
    opens_device = True

    def __init__(self, cfg: ScannerConfig, *, open_device: OpenDevice | None = None, input_dir: str = INPUT_DIR,
                 retry_interval_s: float = 1.0, on_trace: Callable[[str], None] | None = None):
        """`cfg` is a ScannerConfig. `open_device(path)` opens an event device (default:
        python-evdev); `input_dir` is searched for auto-detection. Opens nothing until `start()`.
        `on_trace(line)` receives one line per key press, digits masked (`trace_event`).

        Raises ConfigError (a ValueError) naming the key when the keymap or terminator is
        unknown, or when neither a device nor match criteria are configured.
        """
        super().__init__()
        if not (cfg.device or cfg.match_name or cfg.match_vid_pid):
            raise ConfigError("scanner.device", "set the scanner's device path (e.g. /dev/scanner), or "
                                                "scanner.match_name / scanner.match_vid_pid to find it")
        self._cfg = cfg
        self._decoder = KeyDecoder.from_config(cfg)
        self._open_device = open_device or open_input_device
        self._input_dir = input_dir
        self._retry_s = retry_interval_s
        self._device: InputDeviceLike | None = None
        self._path = ""
        self._on_trace = on_trace

    def __str__(self) -> str:
        if self._cfg.device:
            return f"evdev scanner {self._cfg.device}"
        return f"evdev scanner matching {self._criteria()}"

    @property
    def is_open(self) -> bool:
        """True while the scanner is open and grabbed."""
        return self._device is not None

    # -- reader thread --

    def _run(self) -> None:
        outage: str | None = None  # the reason of the current outage, logged and reported once
        try:
            while not self._stop.is_set():
                if self._device is None:
                    try:
                        self._acquire()
                    except Exception as e:  # noqa: BLE001 - nothing may kill the reader
                        reason = _reason(e)
                        if outage is None:
                            outage = reason
                            if isinstance(e, DeviceError):
                                log.warning("%s; retrying every %g s", reason, self._retry_s)
                            else:
                                log.exception("%s; retrying every %g s", reason, self._retry_s)
                            self._fault(reason)
                        else:
                            log.debug("still unavailable: %s", reason)
                        self._first_attempt_done()
                        self._stop.wait(self._retry_s)
                        continue
                    if outage is not None:
                        log.info("scanner back: %s", self._describe())
                        outage = None
                        self._fault(None)
                    else:
                        log.info("scanner ready: %s", self._describe())
                    self._first_attempt_done()
                try:
                    self._pump()
                except Exception as e:  # noqa: BLE001
                    outage = self._lost(e)
        finally:
            self._release()

    def _acquire(self) -> None:
        """Find, open and grab the scanner. Raises DeviceError with a reason for the technician;
        never leaves a device open or grabbed when it raises."""
        path = self._cfg.device or self._detect()
        try:
            dev = self._open_device(path)
        except FileNotFoundError:
            raise DeviceError(f"scanner not found: {path}") from None
        except PermissionError:
            raise DeviceError(f"scanner not accessible: {path} (permission denied; "
                              "the service user needs group input)") from None
        except OSError as e:
            raise DeviceError(f"scanner cannot be opened: {path} ({e.strerror or e})") from None
        try:
            if not is_keyboard(dev):
                raise DeviceError(f"not a keyboard, not grabbed: {path} ({dev.name})")
            dev.grab()
        except OSError as e:
            _quietly(dev.close)
            if e.errno == errno.EBUSY:
                raise DeviceError(f"scanner {path} is grabbed by another process") from None
            raise DeviceError(f"scanner cannot be grabbed: {path} ({e.strerror or e})") from None
        except BaseException:
            _quietly(dev.close)
            raise
        self._device, self._path = dev, path
        self._decoder.source = f"evdev:{path}"

    def _detect(self) -> str:
        """The path of the one keyboard device matching the criteria (by-id link if it has one)."""
        found, unreadable = _survey(self._input_dir, self._open_device)
        matches = [d for d in found if d["is_keyboard"] and self._matches(d)]
        if len(matches) == 1:
            return matches[0]["by_id"] or matches[0]["path"]
        if matches:
            paths = ", ".join(d["path"] for d in matches)
            raise DeviceError(f"scanner not chosen: {len(matches)} keyboard devices match {self._criteria()} "
                              f"({paths}); set scanner.device to one of them")
        note = f"; {len(unreadable)} input devices not readable ({unreadable[0][1]})" if unreadable else ""
        raise DeviceError(f"scanner not found: no keyboard device matches {self._criteria()}{note}")

    def _matches(self, d: dict) -> bool:
        name, vid_pid = self._cfg.match_name, self._cfg.match_vid_pid
        return ((not name or name.casefold() in (d["name"] or "").casefold())
                and (not vid_pid or vid_pid.lower() == d["vid_pid"]))

    def _criteria(self) -> str:
        parts = []
        if self._cfg.match_name:
            parts.append(f"name containing {self._cfg.match_name!r}")
        if self._cfg.match_vid_pid:
            parts.append(f"VID:PID {self._cfg.match_vid_pid}")
        return " and ".join(parts)

    def _pump(self) -> None:
        """Wait for events (until `close()`; while a code is pending, until its inter-character
        deadline) and decode whatever arrived."""
        dev = self._device
        assert dev is not None
        deadline = self._decoder.deadline
        wait = None if deadline is None else max(0.0, deadline - time.monotonic()) + 0.001
        ready, _, _ = select.select([dev.fd, self._wake_fd], [], [], wait)
        now = time.monotonic()
        scans: list[Scan] = []
        if dev.fd in ready:
            try:
                events = list(dev.read())
            except BlockingIOError:
                events = []
            for event in events:
                if self._on_trace is not None:
                    line = trace_event(event)
                    if line:
                        self._on_trace(line)
                scans += self._decoder.feed(event, now)
        scans += self._decoder.expire(now)
        for scan in scans:
            self._deliver(scan)

    def _lost(self, e: Exception) -> str:
        """Release a failed device; report the outage once. Returns its reason."""
        if isinstance(e, OSError) and e.errno == errno.ENODEV:
            reason = f"scanner unplugged: {self._path}"
            log.warning("%s; waiting for it to come back", reason)
        else:
            reason = f"scanner read failed: {self._path} ({_reason(e)})"
            if isinstance(e, OSError):
                log.warning("%s; reopening it", reason)
            else:
                log.exception("%s; reopening it", reason)
        self._release()
        for scan in self._decoder.abandon(time.monotonic(), "the scanner went away mid-code"):
            self._deliver(scan)
        self._fault(reason)
        return reason

    def _release(self) -> None:
        dev, self._device = self._device, None
        if dev is not None:
            _quietly(dev.ungrab)
            _quietly(dev.close)

    def _deliver(self, scan: Scan) -> None:
        if scan.defect:
            log.warning("%s: %s", scan.source, scan.defect)
        else:
            log.debug("%s: scan %s", scan.source, mask(scan.text))
        try:
            self._on_scan(scan)
        except Exception:  # noqa: BLE001 - a failing consumer must not stop the scanner
            log.exception("the scan handler failed")

    def _fault(self, reason: str | None) -> None:
        try:
            self._on_fault(reason)
        except Exception:  # noqa: BLE001
            log.exception("the fault handler failed")

    def _describe(self) -> str:
        dev = self._device
        if dev is None:
            return self._path
        return f"{self._path} ({dev.name!r}, phys {dev.phys!r}), grabbed"


def trace_event(event) -> str | None:
    """A technician's view of one input event: key presses by name with digit keys masked
    ("KEY_#", "KEY_KP#": a trace must never spell out a payment code), and dropped events."""
    if event.type == EV_SYN and event.code == SYN_DROPPED:
        return "SYN_DROPPED (kernel dropped events)"
    if event.type != EV_KEY or event.value != 1:
        return None
    name = key_name(event.code)
    return re.sub(r"(?<=KEY_)(KP)?[0-9]$", lambda m: (m.group(1) or "") + "#", name)


def _reason(e: BaseException) -> str:
    if isinstance(e, DeviceError):
        return str(e)
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return f"{type(e).__name__}: {e}"


def _quietly(action: Callable[[], object]) -> None:
    """Run a release step whose failure changes nothing (device already gone, not grabbed)."""
    try:
        action()
    except Exception:  # noqa: BLE001
        pass

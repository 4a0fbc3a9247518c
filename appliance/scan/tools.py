"""Technician's scanner tools behind `appliance scan-test` and `appliance scanners`.

Both only read: nothing is charged, nothing is journaled, nothing is published. Output shows a
payment code only as `Classification.masked` (first 4 + last 4 at most); raw traces mask every
digit.

Raw traces: a `Scan` carries no raw bytes, so an adapter that can show them takes a trace
callback that puts ready-made, already masked lines (str) on a `queue.Queue` (`trace_lines`).
scan_test reads scans and faults through that same queue, so each trace line is printed in
the order the reader thread produced it, before the scan it belongs to.
`scanner_for_test(cfg, trace=True)` builds the pair for `kind = "serial"` (hex of each chunk
read, via `serial.trace_hex`); other kinds get no trace queue yet, and scan-test says so.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from pathlib import Path
from typing import TextIO

from appliance.errors import DeviceError
from appliance.money import format_amount
from appliance.scan import Scanner, make_scanner

#: Where udev puts the stable names of serial ports, and the symlink our own udev rule makes.
SERIAL_BY_ID = Path("/dev/serial/by-id")
SCANNER_LINK = Path("/dev/scanner")

_POLL_S = 0.2


def scanner_for_test(cfg, trace: bool = False) -> tuple[Scanner, queue.Queue | None]:
    """The scanner named by `cfg` (a ScannerConfig) and, with `trace`, its queue of raw trace lines."""
    if trace and cfg.kind == "serial":
        from appliance.scan.serial import SerialScanner, trace_hex

        lines: queue.Queue = queue.Queue()
        return SerialScanner(cfg, on_trace=lambda chunk: lines.put(trace_hex(chunk))), lines
    if trace and cfg.kind == "evdev":
        from appliance.scan.evdev import EvdevScanner

        lines = queue.Queue()
        return EvdevScanner(cfg, on_trace=lines.put), lines
    return make_scanner(cfg), None


def scan_test(scanner: Scanner, classifier, out: TextIO = sys.stdout, trace: bool = False,
              stop: threading.Event | None = None,
              trace_lines: queue.Queue | None = None) -> int:
    """Start `scanner` and print one line per scan until Ctrl-C or `stop` is set. Returns 0.

    Each line shows the masked input and its classification (kind, payment type, reason), or
    the defect that made the scan unreadable. Device faults and recoveries are printed as they
    happen. With `trace`, the str lines the scanner's trace callback puts on `trace_lines`
    (already masked by the producer) are printed too; without it they are dropped. The scanner
    is closed before returning.
    """
    # One queue for trace lines (str), scans (Scan) and faults (tuple), in the reader's order.
    events: queue.Queue = trace_lines if trace_lines is not None else queue.Queue()
    stop = stop or threading.Event()
    counts: dict[str, int] = {}

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    def show(item) -> None:
        if isinstance(item, str):
            if trace:
                say(f"      trace {item}")
            return
        if isinstance(item, tuple):
            _, reason = item
            say(f"scanner fault: {reason}" if reason else "scanner back")
            return
        n = sum(counts.values()) + 1
        if item.defect:
            counts["defect"] = counts.get("defect", 0) + 1
            say(f"#{n:<3} (unreadable)  defect: {item.defect}")
            return
        c = classifier.classify(item.text)
        counts[c.kind] = counts.get(c.kind, 0) + 1
        parts = [f"#{n:<3} {c.masked}", f"kind={c.kind}"]
        if c.payment_type:
            parts.append(f"type={c.payment_type}")
        if c.kind == "order":
            parts.append(f"order={c.order} amount={format_amount(c.amount_fen)}")
        if c.command:
            parts.append(f"command={c.command}")
        if c.reason:
            parts.append(f"reason: {c.reason}")
        say("  ".join(parts))

    try:
        what = str(scanner) if type(scanner).__str__ is not object.__str__ else scanner.name
        say(f"Reading scans from {what}; Ctrl-C to stop. Nothing is charged or journaled.")
        if trace and trace_lines is None:
            say("(no raw trace for this scanner kind; showing decoded scans only)")
        scanner.start(events.put, lambda reason: events.put(("fault", reason)))
        while not stop.is_set():
            try:
                show(events.get(timeout=_POLL_S))
            except queue.Empty:
                pass
    except KeyboardInterrupt:
        pass
    finally:
        scanner.close()
    while True:  # what arrived before the scanner stopped
        try:
            show(events.get_nowait())
        except queue.Empty:
            break
    total = sum(counts.values())
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    say(f"Stopped after {total} scan{'s' if total != 1 else ''}" + (f" ({summary})." if total else "."))
    return 0


def list_scanners(out: TextIO = sys.stdout) -> int:
    """Print the serial ports and input devices a scan gun could be. Returns 0."""

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    say('Serial / USB-CDC ports (kind = "serial"; put the first path in [scanner] device):')
    ports = serial_ports()
    for p in ports:
        path = f"{p['by_id']} -> {p['device']}" if p["by_id"] else p["device"]
        say("  " + "  ".join(x for x in (path, p["vid_pid"], p["description"]) if x))
    if not ports:
        say("  none found")
    if SCANNER_LINK.is_symlink():
        target = os.path.realpath(SCANNER_LINK)
        say(f"  {SCANNER_LINK} -> {target}" + ("" if os.path.exists(target) else " (target missing)"))

    say('Input devices (kind = "evdev", keyboard-wedge scanners):')
    try:
        from appliance.scan.evdev import list_input_devices
        devices = list_input_devices()
    except (ImportError, AttributeError, DeviceError) as e:
        say(f"  evdev not available ({e})")
        return 0
    except OSError as e:
        say(f"  cannot list input devices: {e.strerror or e}")
        return 0
    for d in devices:
        path = f"{d['by_id']} -> {d.get('path')}" if d.get("by_id") else str(d.get("path"))
        role = "keyboard" if d.get("is_keyboard") else "not a keyboard"
        phys = f"phys={d['phys']}" if d.get("phys") else ""
        say("  " + "  ".join(x for x in (path, d.get("vid_pid"), repr(d.get("name", "")), role, phys) if x))
    if not devices:
        say("  none found")
    return 0


def serial_ports(by_id_dir: Path = SERIAL_BY_ID) -> list[dict]:
    """Serial ports pyserial knows, each with its stable /dev/serial/by-id path if udev made one.

    Keys: device (/dev/ttyACM0), by_id ("" if none), description, vid_pid ("" if not USB).
    """
    import serial.tools.list_ports

    by_real: dict[str, str] = {}
    try:
        for link in sorted(by_id_dir.iterdir()):
            by_real.setdefault(os.path.realpath(link), str(link))
    except OSError:
        pass  # no USB serial device has ever been plugged in
    out = []
    for info in sorted(serial.tools.list_ports.comports(), key=lambda i: i.device):
        vid_pid = f"{info.vid:04x}:{info.pid:04x}" if info.vid is not None and info.pid is not None else ""
        description = info.description if info.description and info.description != "n/a" else ""
        out.append({"device": info.device, "by_id": by_real.get(os.path.realpath(info.device), ""),
                    "description": description, "vid_pid": vid_pid})
    return out

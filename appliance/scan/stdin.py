"""`kind = "stdin"`: one line on standard input is one scan (for bench tests and piping).

Reads raw bytes so that a line that is not UTF-8 becomes a defective scan instead of a crash.
End of input ends the reader; the service keeps running on other inputs (charge commands).
"""

from __future__ import annotations

import logging
import os
import select
import sys

from appliance.scan import Scan, Scanner, scanners

log = logging.getLogger(__name__)

#: A line longer than this is read in full but delivered only as a defect.
MAX_LINE = 4096


@scanners.register("stdin")
def _from_config(cfg) -> StdinScanner:
    return StdinScanner()


class StdinScanner(Scanner):
    name = "scanner-stdin"

    def __init__(self, fd: int | None = None):
        super().__init__()
        self._fd = sys.stdin.fileno() if fd is None else fd

    def _run(self) -> None:
        buf = b""
        overlong = False  # inside a line already reported as too long: drop up to its newline
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd, self._wake_fd], [], [])
            if self._fd not in ready:
                continue  # closed: the loop ends
            chunk = os.read(self._fd, 4096)
            if not chunk:
                if buf and not overlong:  # the tail of a line reported too long is no scan of its own
                    self._deliver(buf)
                log.info("stdin closed; no more scans from it")
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if overlong:
                    overlong = False
                else:
                    self._deliver(line)
            if len(buf) > MAX_LINE:
                if not overlong:
                    self._overlong()
                overlong, buf = True, b""

    def _overlong(self) -> None:
        self._on_scan(Scan("", "stdin", defect=f"line longer than {MAX_LINE} bytes"))

    def _deliver(self, line: bytes) -> None:
        """One complete line (without its newline) as a scan, or as a defect when it is longer
        than MAX_LINE (however the reads split it) or not UTF-8."""
        if len(line) > MAX_LINE:
            self._overlong()
            return
        line = line.removesuffix(b"\r")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._on_scan(Scan("", "stdin", defect="bytes that are not UTF-8"))
            return
        self._on_scan(Scan(text, "stdin"))

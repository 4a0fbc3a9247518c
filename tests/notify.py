"""systemd's side of sd_notify, for tests that run a real `appliance run`.

`NotifySocket` is the datagram socket a service's `NOTIFY_SOCKET` names (a path in the test's
tmp dir). A reader thread keeps every assignment it receives (`READY=1`, `WATCHDOG=1`,
`STATUS=...`, `STOPPING=1`; a datagram may carry several, one per line) with its arrival time on
the monotonic clock, so that tests can check order and spacing the way systemd would.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest


class NotifySocket:
    def __init__(self, path: Path):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []  # (monotonic arrival, "NAME=value")
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._reader.start()

    def env(self, watchdog_s: float | None = None) -> dict[str, str]:
        """The environment systemd gives a Type=notify service (with WatchdogSec=, WATCHDOG_USEC)."""
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_s is not None:
            env["WATCHDOG_USEC"] = str(int(watchdog_s * 1e6))
        return env

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            with self._changed:
                self.messages += [(at, line) for line in data.decode().splitlines() if line]
                self._changed.notify_all()

    def times(self, message: str) -> list[float]:
        """Arrival times of every `message` (e.g. "WATCHDOG=1") so far."""
        with self._changed:
            return [at for at, m in self.messages if m == message]

    def wait_for(self, message: str, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> float:
        """The arrival time of the first `message`; fails the test if `proc` ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [at for at, m in self.messages if m == message]
                if found:
                    return found[0]
                if proc is not None and proc.poll() is not None:
                    pytest.fail(f"the service exited ({proc.returncode}) before {message}; got {self.messages}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {message} within {timeout}s; got {self.messages}")
                self._changed.wait(0.05)

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=2)
        self._sock.close()
        self.path.unlink(missing_ok=True)  # the path can be bound again (a restarted service)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The lane lock: at most one process drives a lane's journal at a time.

An exclusive `fcntl.flock` on `STATE_DIR/lane.lock` (file mode 0600; the holder writes its pid
into it, for diagnostics only). `appliance run` holds it for its whole life; the CLI's `charge`
and `cancel` hold it for their whole run when no service is running. Everyone else who wants to
drive the lane either talks to the holder (the control socket, `control.py`) or waits.

Contract:
- `acquire(timeout_s)` returns once the lock is held, or raises `LaneBusy` naming the holder's
  pid after `timeout_s`; `on_wait(pid)` is called once, when it first has to wait.
- The kernel drops a flock when its process dies, even by SIGKILL: there is no stale lock to
  clean up, and none is ever broken by us.
- The lock belongs to this object's open file; a second `LaneLock` on the same directory, even in
  the same process, does not get it while the first holds it.
- Nothing is touched before `acquire()`; `release()` is idempotent.
- Run as root (a technician's `sudo appliance charge`), the lock file is given to the owner of the
  state dir, so that the service's user can still open it afterwards.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Callable

from appliance.errors import ApplianceError

LOCK_NAME = "lane.lock"


class LaneBusy(ApplianceError):
    """Another process owns the lane and did not let go in time."""

    def __init__(self, pid: int | None, waited_s: float):
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"lane busy: held by {who} (waited {waited_s:g}s)")


class LaneLock:
    def __init__(self, state_dir: Path, *, clock: Callable[[], float] = time.monotonic):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self._clock = clock
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free now. True when this object holds it (also if it already did)."""
        if self._fd is not None:
            return True
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.geteuid() == 0:  # `sudo appliance charge`: leave the file to the service's user
                owner = os.stat(self.state_dir)
                os.fchown(fd, owner.st_uid, owner.st_gid)
        except OSError as e:
            raise ApplianceError(f"cannot open the lane lock {self.path}: {e.strerror or e} "
                                 "(run as the service user, e.g. sudo -u appliance appliance ...)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise ApplianceError(f"cannot lock {self.path}: {e}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return True

    def acquire(self, timeout_s: float, *, poll_s: float = 0.1, stop: threading.Event | None = None,
                on_wait: Callable[[int | None], None] | None = None) -> bool:
        """Wait up to timeout_s for the lock. Returns True once held, False if `stop` was set
        meanwhile; raises LaneBusy when the time is up."""
        start = self._clock()
        waiting = False
        while not self.try_acquire():
            if not waiting and on_wait is not None:
                on_wait(self.holder())
            waiting = True
            if self._clock() - start >= timeout_s:
                raise LaneBusy(self.holder(), timeout_s)
            if stop is not None:
                if stop.wait(poll_s):
                    return False
            else:
                time.sleep(poll_s)
        return True

    def holder(self) -> int | None:
        """The pid written by the current (or last) holder; None if unknown. Diagnostics only."""
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        """Let go. The file stays: removing it would let two processes lock two different files."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor of the open file drops the flock


def held(state_dir: Path, locks: Path = Path("/proc/locks")) -> bool | None:
    """Whether some process holds the lane lock of `state_dir` now, without touching the lock: the
    kernel's table of file locks (`/proc/locks`) is searched for a flock on the file's device and
    inode. Needs no permission on the file (`appliance status` runs as anyone) and never makes a
    starting service wait. False when there is no lock file; None when it cannot be told (no
    /proc, the file not stat-able)."""
    try:
        st = os.stat(Path(state_dir) / LOCK_NAME)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        table = locks.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in table.splitlines():
        parts = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146405 0 EOF"; "->" marks a waiter
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
            return True
    return False

"""Named crash points, for the kill harness (tests/test_kill_harness.py) and fault tests only.

`hit(name)` marks a moment where losing the process matters: just before and just after a journal
commit, just after the platform charged or reversed. It does nothing unless the process was
started with `APPLIANCE_CRASH_AT=N`: then the N-th hit of any point in this process kills the
process with SIGKILL (`APPLIANCE_CRASH_AT=NAME:N`: the N-th hit of the point NAME), exactly as power loss or the OOM killer would, after appending the point's
name to the file named by `APPLIANCE_CRASH_TRACE` (when set) so the harness can say where it
struck. The environment is read once, at the first hit; an unset variable costs one attribute
test per hit.

In-process tests can instead `set_hook(fn)`: `fn(name)` then runs at every hit, in the thread
that hits it (the disk-full tests fill the disk at a chosen point this way).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

ENV = "APPLIANCE_CRASH_AT"
TRACE_ENV = "APPLIANCE_CRASH_TRACE"

_lock = threading.Lock()
_armed: int | None = None  # the hit number that kills; 0 = disarmed
_only: str | None = None  # count only the hits of this point
_hits = 0
_hook: Callable[[str], None] | None = None


def set_hook(fn: Callable[[str], None] | None) -> None:
    """Run `fn(name)` at every hit from now on (None: stop). For tests in this process."""
    global _hook
    _hook = fn


def hit(name: str) -> None:
    """Count one pass through the crash point `name`; SIGKILL the process if it is the chosen one."""
    global _armed, _hits, _only
    if _hook is not None:
        _hook(name)
    if _armed == 0:
        return
    with _lock:
        if _armed is None:
            point, _, n = os.environ.get(ENV, "").rpartition(":")
            _armed = int(n) if n.isdigit() else 0
            _only = point or None
            if _armed == 0:
                return
        if _only is not None and name != _only:
            return
        _hits += 1
        if _hits != _armed:
            return
        trace = os.environ.get(TRACE_ENV)
        if trace:
            with open(trace, "a") as f:
                f.write(name + "\n")
        os.kill(os.getpid(), signal.SIGKILL)

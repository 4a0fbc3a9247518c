"""Waking sleeping threads without polling: a stop request that wakes every kind of wait, and a
self-pipe for threads that block on file descriptors.

An idle lane sleeps until something happens (a scan, a command, a timer that is really due), so
no thread may wake "just to look" (issue 10: <= 1 wakeup/s on a Pi Zero). Each thread therefore
blocks in the one wait its work comes through (a queue, a condition, select() on its fds), with a
timeout only when a deadline is really due; a stop must reach every one of those waits:

* `Stop` is the service's stop request: a `threading.Event` whose `set()` also calls the hooks
  its sleepers registered with `on_set` (put a wake-up on a queue, notify a condition, write a
  `WakePipe`). A plain `threading.Event` would leave them asleep.
* `WakePipe` is a non-blocking pipe whose read end is put beside the fds a thread select()s on;
  `wake()` (from any thread, or a Stop hook) makes that select() return at once.
"""

from __future__ import annotations

import os
import threading
from typing import Callable


class Stop(threading.Event):
    """A stop request. `set()` sets the event, then calls every hook registered with `on_set`
    (each once, in the setting thread; a hook must not block). Hooks are for waking sleepers:
    they must also look at the event itself when they wake."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list[Callable[[], None]] = []
        self._hooks_lock = threading.RLock()  # reentrant: a signal handler may set() in a thread registering

    def on_set(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call `hook` when the stop is set (at once if it already is). Returns a function that
        unregisters it (for a sleeper that ends before the stop)."""
        with self._hooks_lock:
            self._hooks.append(hook)
        if self.is_set():
            hook()

        def remove() -> None:
            with self._hooks_lock:
                if hook in self._hooks:
                    self._hooks.remove(hook)

        return remove

    def set(self) -> None:
        super().set()
        with self._hooks_lock:
            hooks = list(self._hooks)
        for hook in hooks:
            hook()


def following(event: threading.Event) -> Stop:
    """`event` itself if it is a `Stop`; else a Stop that is set once `event` is (for callers of
    `service.run` that hold a plain Event: tests, the demo). The bridge is a daemon thread blocked
    on the event: it costs no wakeups, and ends with the event's set()."""
    if isinstance(event, Stop):
        return event
    stop = Stop()

    def follow() -> None:
        event.wait()
        stop.set()

    threading.Thread(target=follow, name="stop-follower", daemon=True).start()
    return stop


class WakePipe:
    """A self-pipe: `fd` becomes readable when `wake()` is called; `clear()` empties it. Both ends
    are non-blocking and close-on-exec; `close()` is idempotent."""

    def __init__(self) -> None:
        self.fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"\0")
        except (BlockingIOError, OSError):  # full (already woken) or closed (nobody left to wake)
            pass

    def clear(self) -> None:
        try:
            while os.read(self.fd, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self.fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fd = self.write_fd = -1

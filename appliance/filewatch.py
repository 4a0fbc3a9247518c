"""Being told when a file is deleted, renamed, replaced or written, instead of looking (Linux inotify).

The idle lane must notice at once that its journal file was lost (deleted, renamed over,
emptied) without a timer waking it every second (issue 10). `FileWatch` blocks one daemon thread
in read() on an inotify descriptor that watches the file itself (its link count or attributes
changed, it was moved or deleted, written: in WAL mode the main file is written only at a
checkpoint, so the lane's own payments rarely trigger it) and its directory (a file created or
moved in: a replacement by rename). Every event calls `on_change()`; what changed is for the
caller to check (`Journal.check_file`): events say "look now", never what is true.

`start()` returns False where inotify is missing (not Linux, no instances left): the caller then
keeps its timer.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import threading
from pathlib import Path
from typing import Callable

from appliance.wakeup import WakePipe

log = logging.getLogger(__name__)

# <sys/inotify.h>
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
FILE_EVENTS = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_MOVE_SELF
DIR_EVENTS = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE


class FileWatch:
    """Call `on_change()` from a daemon thread whenever `path` (or its directory's entries) may
    have changed. `close()` ends the thread at once; both are idempotent."""

    def __init__(self, path: Path, on_change: Callable[[], None]):
        self.path = Path(path)
        self.on_change = on_change
        self._fd = -1
        self._wake = WakePipe()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> bool:
        """Watch from now on. False (and nothing started) when inotify cannot be had."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init, add = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError):
            return False
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            log.warning("no inotify for %s (%s): it is checked by a timer", self.path,
                        os.strerror(ctypes.get_errno()))
            return False
        for target, mask in ((self.path, FILE_EVENTS), (self.path.parent, DIR_EVENTS)):
            if add(fd, os.fsencode(target), mask) < 0:
                log.warning("cannot watch %s (%s): it is checked by a timer", target, os.strerror(ctypes.get_errno()))
                os.close(fd)
                return False
        self._fd = fd
        self._thread = threading.Thread(target=self._run, name="filewatch", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        while not self._closed:
            ready, _, _ = select.select([self._fd, self._wake.fd], [], [])
            if self._closed or self._fd not in ready:
                continue
            try:
                while os.read(self._fd, 4096):  # the events themselves do not matter: "look now"
                    pass
            except BlockingIOError:
                pass
            except OSError as e:  # the descriptor failed: say so once and stop watching
                log.warning("watching %s failed (%s); it is still checked at every write", self.path, e)
                return
            self.on_change()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.wake()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._thread is None or not self._thread.is_alive():  # else it may still select() on both
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._wake.close()

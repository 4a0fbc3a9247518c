"""journald's native protocol, written by hand: one datagram per log entry to journald's socket.

The protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL) is what `sd_journal_send()` speaks; we write it
here so that the appliance needs no C extension (systemd-python) on the Pi:

- an entry is a list of fields, each `KEY=value\\n`; a value that contains a newline is written
  binary-safe instead: `KEY\\n`, its length as a 64-bit little-endian integer, the value, `\\n`;
- a key is 1-64 of A-Z, 0-9 and `_`, not starting with `_` (journald adds the trusted `_PID`,
  `_UID`, `_SYSTEMD_UNIT` ... itself) nor with a digit;
- the entry goes in one datagram to `/run/systemd/journal/socket`. One larger than the socket
  takes (EMSGSIZE: about the send buffer, ~200 KiB by default) is written to a sealed memfd
  instead, and the memfd is passed with SCM_RIGHTS in an empty datagram; journald refuses an
  unsealed one.

`JournalSender.send()` raises OSError when journald cannot be reached (no socket, journald
restarting, its queue full beyond `SEND_TIMEOUT_S`); `JournalHandler` then writes the record to its
fallback handler (stderr), so that no line is lost. The send blocks like `sd_journal_send()`: a
journald that takes more than `SEND_TIMEOUT_S` to take one datagram counts as unreachable.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import struct
from typing import Iterable, Mapping

#: Where journald listens for native entries.
SOCKET_PATH = "/run/systemd/journal/socket"
#: Seconds one send may wait for room in journald's queue before the record goes to stderr instead.
SEND_TIMEOUT_S = 2.0

_KEY = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def encode(fields: Iterable[tuple[str, str | bytes]]) -> bytes:
    """The native-protocol bytes of one entry. A key may repeat (journald keeps every value).

    Raises ValueError for a key journald would refuse (lower case, leading `_` or digit, > 64)."""
    parts = []
    for key, value in fields:
        if key not in _checked_keys:
            _check_key(key)
        data = value.encode("utf-8", "backslashreplace") if isinstance(value, str) else bytes(value)
        if b"\n" in data:
            parts.append(b"%s\n%s%s\n" % (key.encode(), struct.pack("<Q", len(data)), data))
        else:
            parts.append(b"%s=%s\n" % (key.encode(), data))
    return b"".join(parts)


_checked_keys: set[str] = set()


def _check_key(key: str) -> None:
    if not _KEY.fullmatch(key):
        raise ValueError(f"journal field name {key!r} must be 1-64 of A-Z, 0-9, '_', starting with a letter")
    if len(_checked_keys) < 256:  # the keys are the code's own few: remember them
        _checked_keys.add(key)


class JournalSender:
    """Sends encoded entries to journald's native socket (`path`: tests point it at their own)."""

    def __init__(self, path: str = SOCKET_PATH, timeout_s: float = SEND_TIMEOUT_S):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if struct.calcsize("l") == 8:  # a 64-bit timeval: the kernel's send timeout (EAGAIN after it)
            seconds = int(timeout_s)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                  struct.pack("ll", seconds, int((timeout_s - seconds) * 1e6)))
        else:  # 32-bit (its timeval may be either size): Python's timeout, which polls before each send
            self._sock.settimeout(timeout_s)

    def send(self, entry: bytes) -> None:
        """Send one entry: as a datagram, or through a sealed memfd when too large for one."""
        try:
            self._sock.sendto(entry, self.path)
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(entry)

    def _send_memfd(self, entry: bytes) -> None:
        fd = os.memfd_create("appliance-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


#: Python's levels -> syslog priorities (what `journalctl -p` filters on).
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def priority(levelno: int) -> int:
    """Syslog priority of a Python level: CRITICAL 2 (crit), ERROR 3 (err), WARNING 4, INFO 6, DEBUG 7.
    Levels between two of Python's take the lower one's priority (a level 25 is info)."""
    for level, prio in PRIORITIES:
        if levelno >= level:
            return prio
    return 7


class JournalHandler(logging.Handler):
    """A logging handler that writes each record as one native journal entry.

    Fields: MESSAGE (the formatted message, traceback included: one entry, however many lines),
    PRIORITY, SYSLOG_IDENTIFIER, CODE_FILE/CODE_LINE/CODE_FUNC, LOGGER, THREAD, and the record's
    `journal_fields` (a mapping of extra fields, e.g. the payment's, set by appliance/logs.py).

    When the send fails, the record goes to `fallback` instead; the outage is reported there
    once, when it starts, and once when journald takes entries again.
    """

    def __init__(self, fallback: logging.Handler, *, path: str = SOCKET_PATH, identifier: str = "appliance"):
        super().__init__()
        self.sender = JournalSender(path)
        self.fallback = fallback
        self.identifier = identifier
        self._outage: str | None = None

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        fields = [("MESSAGE", self.format(record)), ("PRIORITY", str(priority(record.levelno))),
                  ("SYSLOG_IDENTIFIER", self.identifier), ("CODE_FILE", record.pathname),
                  ("CODE_LINE", str(record.lineno)), ("CODE_FUNC", record.funcName),
                  ("LOGGER", record.name), ("THREAD", record.threadName or "")]
        extra: Mapping[str, object] = getattr(record, "journal_fields", None) or {}
        fields += [(key, str(value)) for key, value in extra.items()]
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = encode(self.fields(record))
        except Exception:
            self.handleError(record)
            return
        try:
            self.sender.send(entry)
        except OSError as e:
            self._lost(f"{type(e).__name__}: {e.strerror or e}")
            self.fallback.handle(record)
            return
        if self._outage is not None:
            why, self._outage = self._outage, None
            self.emit(_note(logging.INFO, f"journald takes entries again at {self.sender.path} "
                                          f"(the lines meanwhile went to stderr: {why})"))

    def _lost(self, why: str) -> None:
        if self._outage is None:
            self._outage = why
            self.fallback.handle(_note(logging.WARNING, f"journald unreachable at {self.sender.path} ({why}); "
                                                        "logging to stderr"))

    def close(self) -> None:
        self.sender.close()
        super().close()


def _note(level: int, text: str) -> logging.LogRecord:
    """A record of the handler's own (its outage and its end), logged as appliance.journald."""
    return logging.LogRecord(__name__, level, __file__, 0, text, None, None, "JournalHandler")

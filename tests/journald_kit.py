"""A stand-in for journald's native socket: a real AF_UNIX datagram socket that takes entries as
journald does (a datagram, or an empty datagram carrying a sealed memfd) and parses them by the
protocol's text (systemd.io/JOURNAL_NATIVE_PROTOCOL), independently of appliance/journald.py."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import threading
from pathlib import Path

#: The seals journald requires of a passed memfd before it reads it.
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def parse(data: bytes) -> list[tuple[str, bytes]]:
    """The fields of one entry, in order: `KEY=value\\n`, or `KEY\\n` + u64 LE length + value + `\\n`."""
    fields = []
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 1 + 8
            value = data[start:start + size]
            assert data[start + size:start + size + 1] == b"\n", "a binary-safe value ends with a newline"
            i = start + size + 1
        fields.append((key.decode("ascii"), value))
    return fields


class Entry(dict):
    """One received entry: {KEY: value as str} (the last value of a repeated key), plus how it came."""

    def __init__(self, fields: list[tuple[str, bytes]], raw: bytes, via_memfd: bool, seals: int | None):
        super().__init__((k, v.decode()) for k, v in fields)
        self.raw, self.via_memfd, self.seals = raw, via_memfd, seals


class JournalSocket:
    """Bound at `path`; `entries()` takes every entry sent so far, `entry()` waits for one."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def entry(self, timeout: float = 10.0) -> Entry:
        self.sock.settimeout(timeout)
        fds = array.array("i")
        data, ancdata, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancdata:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if not fds:
            return Entry(parse(data), data, False, None)
        assert data == b"" and len(fds) == 1, "a memfd comes alone, in an empty datagram"
        fd = fds[0]
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            raw = b""
            while chunk := os.pread(fd, 1 << 20, len(raw)):
                raw += chunk
        finally:
            os.close(fd)
        return Entry(parse(raw), raw, True, seals)

    def entries(self) -> list[Entry]:
        out = []
        while True:
            try:
                out.append(self.entry(timeout=0.0))
            except (BlockingIOError, TimeoutError):
                return out

    def collect(self) -> "Collector":
        """Take entries on a thread of their own from now on (a sender blocks once the socket
        holds net.unix.max_dgram_qlen datagrams: 10 by default, 512 where systemd set it)."""
        return Collector(self)

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


class Collector:
    """Receives a JournalSocket's entries in the background into `entries`, until `stop()`."""

    def __init__(self, journal: JournalSocket):
        self.journal = journal
        self.entries: list[Entry] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.entries.append(self.journal.entry(timeout=0.05))
            except TimeoutError:
                continue

    def stop(self) -> list[Entry]:
        self._stop.set()
        self._thread.join()
        self.entries += self.journal.entries()
        return self.entries

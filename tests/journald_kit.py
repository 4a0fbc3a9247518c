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


# --- a real systemd-journald, for the one test that asks it what it filed ---------------------------

JOURNALD = "/lib/systemd/systemd-journald"
#: What the test asks journalctl, by name: its arguments (the journal's files are in /run/log/journal).
QUERIES = {
    "native": ["-t", "appliance"],
    "native -p warning": ["-t", "appliance", "-p", "warning"],
    "native TXN_ID=1": ["-t", "appliance", "TXN_ID=1"],
    "native ORDER=A1": ["-t", "appliance", "ORDER=A1"],
    "stream": ["-t", "appliance-stream"],
    "stream -p warning": ["-t", "appliance-stream", "-p", "warning"],
    "large": ["-t", "appliance-large"],
}
#: The size of the entry sent through a memfd (beyond any datagram).
LARGE = 1 << 20


def real_journald_missing() -> str | None:
    """Why a real journald cannot be run here (it needs root for its mount namespace), or None."""
    import shutil

    if os.geteuid() != 0:
        return "a private systemd-journald needs root (mount namespace, tmpfs on /run)"
    for tool in ("unshare", "systemd-cat", "journalctl", JOURNALD):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


def _under_real_journald(work: Path, code: str) -> None:
    """Run in a private mount namespace (`unshare -m`): a real systemd-journald on a tmpfs /run,
    `appliance run` under it twice (identifier `appliance`: entries to the native socket;
    `appliance-stream`: no native socket, lines on the stream with their <N>), each charging order
    A1 with `code` (config `work/<identifier>.toml`, state `work/<identifier>`), and an entry of
    LARGE bytes (through a memfd, as `appliance-large`); then journalctl's
    answers to QUERIES, as JSON, into work/answers.json, and the export of everything into
    work/export.bin."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from appliance.journal import Journal, State

    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    if os.path.isdir("/var/log/journal"):  # the host's persistent journal stays untouched
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/var/log/journal"], check=True)
    journald = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not all(os.path.exists(f"/run/systemd/journal/{s}") for s in ("socket", "stdout", "io.systemd.journal")):
            assert time.monotonic() < deadline, "journald did not open its sockets"
            time.sleep(0.05)
        for identifier, env in (("appliance", {}), ("appliance-stream", {"APPLIANCE_JOURNAL_SOCKET": "/nonexistent"})):
            # systemd-cat connects stdout and stderr to journald's stream; the shell names it in
            # JOURNAL_STREAM as systemd does for a unit (dev:ino of stderr)
            cmd = ["systemd-cat", "-t", identifier, "sh", "-c",
                   'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@"', "sh",
                   sys.executable, "-m", "appliance", "run", "--config", str(work / f"{identifier}.toml")]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, text=True, env={**os.environ, **env})
            journal = Journal(work / identifier, "S0001", "L01")
            try:
                proc.stdin.write(f"ORD:A1:12.34\n{code}\n")
                proc.stdin.flush()
                while not any(t.state is State.PAID for t in journal.recent()):
                    assert time.monotonic() < deadline + 40, "the payment did not end"
                    time.sleep(0.05)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
                proc.stdin.close()
                journal.close()
        subprocess.run([sys.executable, "-c", "import logging; from appliance.journald import JournalHandler; "
                        "log = logging.getLogger('large'); "
                        "log.addHandler(JournalHandler(logging.StreamHandler(), identifier='appliance-large')); "
                        f"log.warning('x' * {LARGE})"], check=True)
        subprocess.run(["journalctl", "--sync"], check=True)
        files = ["journalctl", "-D", "/run/log/journal", "--no-pager"]
        answers = {name: [json.loads(line) for line in subprocess.run(
            files + ["-o", "json", "--all"] + args, capture_output=True, text=True, check=True).stdout.splitlines()]
            for name, args in QUERIES.items()}
        (work / "answers.json").write_text(json.dumps(answers))
        (work / "export.bin").write_bytes(subprocess.run(files + ["-o", "export"], capture_output=True,
                                                         check=True).stdout)
    finally:
        journald.terminate()
        journald.wait(timeout=20)


if __name__ == "__main__":  # python tests/journald_kit.py WORK CODE, inside `unshare -m`
    import sys

    _under_real_journald(Path(sys.argv[1]), sys.argv[2])

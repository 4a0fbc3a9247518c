"""The lane's door: commands into the running till over a local Unix socket.

While `appliance run` is up it holds the lane lock (`lanelock.py`) and listens on
`STATE_DIR/control.sock` (mode 0660: the service user and its group). The CLI's `charge` and
`cancel` send their command there, so the service's own till runs it in its own thread and no
second owner ever drives the journal. Without a service, the CLI takes the lane lock and runs the
command on a headless lane itself (`submit`).

Protocol: JSON lines, UTF-8, at most `MAX_LINE` bytes a line. One request, one reply:

    {"op": "charge", "order": "A1", "amount_fen": 1250, "code": "1345...", "source": "command",
     "wait_s": 0}
    {"op": "cancel", "order": "A1", "wait_s": 0}
    -> {"txn_id", "out_trade_no", "order", "payment_type", "platform", "amount", "state",
        "reason", "exit_code"}      (the till's Result.as_dict() plus the CLI's exit code)
    -> {"error": "...", "exit_code": 1}   (the command failed unexpectedly; nothing to report)
    {"op": "sync"}
    -> {"uplink": {"kind", "connected", "connected_since", "last_error", "backlog",
        "oldest_queued_seq", "oldest_queued_at", "last_seq", "last_ack_seq", "last_ack_at"},
        "exit_code": 0}             (Uplink.state(); the uplink is woken to send at once)

A request that is not exactly one of these shapes gets a `refused` reply (exit code 5) naming what
is wrong, never a crash. With `wait_s` > 0 an open result (unknown, pending, cancel requested,
deferred) is waited out for up to that long while the service's resolver drives it, then the
state it reached is the reply. If the service stops while the till is in the platform call, the
connection closes without a reply (`ServiceGone` on the client: the outcome is unknown).

The payment code travels only inside the request; it is never logged, and refusals name it masked.

Layers: `validate` + `CommandHandler.handle(dict) -> dict` are the transport-free part (head
office's MQTT cancel goes through `handle`, appliance/uplink/commands.py); `ControlServer` is the socket transport; `call` and `submit`
are the client side.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import select
import socket
import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from appliance.errors import ApplianceError, BadInput, JournalIntegrityError
from appliance.journal import OPEN_STATES, Journal
from appliance.lanelock import LaneBusy, LaneLock
from appliance.money import MAX_FEN
from appliance.redact import mask
from appliance.till import CancelCommand, ChargeCommand, Command, Result, Till
from appliance.wakeup import WakePipe

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
#: A request line longer than this (bytes, newline included) is refused and the connection closed.
MAX_LINE = 4096
#: The longest `wait_s` a request may ask for.
MAX_WAIT_S = 3600.0
#: Connections handled at once; one more is told "busy" and closed.
MAX_CLIENTS = 16
#: How long a client may take to send a whole request line, once connected or answered (a
#: client trickling its bytes is dropped as one sending none).
REQUEST_TIMEOUT_S = 10.0
#: Exit codes for failures that are not payment outcomes, as cli.py documents them: 1 other
#: error, 6 the journal is not whole. The CLI gives the same codes with or without a service.
EXIT_ERROR, EXIT_INTEGRITY = 1, 6
#: The state a CLI prints when the service went away mid-command, and its exit code (unknown).
GONE_EXIT = 4
GONE_MESSAGE = ("the service stopped before the answer; the payment is resolved at the next start, "
                "see `appliance journal`")

_SOURCE = re.compile(r"[a-z][a-z0-9_-]{0,15}")
_NAME = re.compile(r"[A-Za-z_]{1,20}")  # shown as they are: no digits, so never a payment code
_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
               dict: "an object"}
_FIELDS = {"charge": {"op", "order", "amount_fen", "code", "source", "wait_s"},
           "cancel": {"op", "order", "wait_s"}, "sync": {"op"}}


class SyncQuery:
    """The `sync` request, as `validate` gives it: no till command, a report of the uplink."""


SYNC = SyncQuery()


class ServiceGone(ApplianceError):
    """The service closed the connection after taking the request and before answering."""


def refused(reason: str, cancel: bool = False) -> dict:
    """The reply for a request that was not carried out (bad request, service stopping)."""
    return reply_of(Result("refused", reason, cancel=cancel))


def reply_of(result: Result) -> dict:
    return {**result.as_dict(), "exit_code": result.exit_code}


# --- the transport-free part ------------------------------------------------------------------


def validate(request: object) -> tuple[Command | SyncQuery, float]:
    """Check a parsed request strictly. Returns the till command (or SYNC) and its wait_s; raises BadInput
    (and nothing else, whatever the request holds) with a message that never contains the
    payment code, nor any text of the request but a short name (see `shown`)."""
    if not isinstance(request, dict):
        raise BadInput("a request must be a JSON object")
    op = request.get("op")
    if not isinstance(op, str) or op not in _FIELDS:
        raise BadInput(f"unknown op {shown(op) if 'op' in request else '(none given)'}: "
                       "expected 'charge', 'cancel' or 'sync'")
    keys = set(request)
    required = _FIELDS[op] - {"source", "wait_s"}
    if missing := sorted(required - keys):
        raise BadInput(f"{op}: missing {', '.join(missing)}")
    if extra := keys - _FIELDS[op]:
        raise BadInput(f"{op}: unknown field(s) {shown_names(extra)}")
    if op == "sync":
        return SYNC, 0.0
    order = _string(request, "order", 64)
    wait_s = request.get("wait_s", 0)
    # no float(): an int too large for a float compares exactly; nan compares false
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not 0 <= wait_s <= MAX_WAIT_S:
        raise BadInput(f"wait_s must be a number of seconds from 0 to {MAX_WAIT_S:g}")
    if op == "cancel":
        return CancelCommand(order), float(wait_s)
    amount = request["amount_fen"]
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_FEN:
        raise BadInput(f"amount_fen must be a whole number of fen from 1 to {MAX_FEN}")
    code = _string(request, "code", 128)
    source = request.get("source", "command")
    if not isinstance(source, str) or not _SOURCE.fullmatch(source):
        raise BadInput("source must be 1-16 of a-z, 0-9, '_' or '-', starting with a letter")
    return ChargeCommand(order, amount, code, source), float(wait_s)


def shown_names(names: Iterable[object], at_most: int = 5) -> str:
    """Field names of a request as a refusal lists them: sorted, `shown`, the first few."""
    names = sorted(shown(k) for k in names)
    return ", ".join(names[:at_most]) + (", ..." if len(names) > at_most else "")


def shown(value: object) -> str:
    """A word of the request (an op, a field name) as a refusal may show it: a short name as it
    is, other text masked like a payment code (it may be one; masking also drops control
    characters and lone surrogates), anything else by its JSON type."""
    if isinstance(value, str):
        return value if _NAME.fullmatch(value) else mask(value)
    return f"({_JSON_TYPES.get(type(value), type(value).__name__)})"


def _string(request: dict, key: str, limit: int) -> str:
    value = request[key]
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise BadInput(f"{key} must be a string of 1 to {limit} characters")
    return value


class CommandHandler:
    """Runs validated commands on the service's till and answers with reply dicts.

    `handle()` is called from any thread but the till's. It posts the command to the till, waits
    for its Result, then (with wait_s) polls the journal until the resolver ends the payment.
    `close()` makes waiting handlers give up: a command the till has not started is cancelled
    (refused: nothing was done); one it is running raises `Abandoned` (the caller says nothing).

    `uplink_state` (Uplink.state) answers `sync`; without one (no uplink wired) the answer is the
    journal's outbox with kind "none", never connected. `sync_now` (Uplink.sync_now), if given, is
    called after each `sync` so that the uplink sends at once.
    """

    class Abandoned(Exception):
        """The service is stopping while the till runs the command: its outcome is unknown here."""

    def __init__(self, till: Till, journal: Journal, *, uplink_state: Callable[[], dict] | None = None,
                 sync_now: Callable[[], None] | None = None, poll_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.till = till
        self.journal = journal
        self.uplink_state = uplink_state
        self.sync_now = sync_now
        self.poll_s = poll_s
        self._clock = clock
        self._closing = threading.Event()

    def close(self) -> None:
        self._closing.set()

    def handle(self, request: object) -> dict:
        """A parsed request in, a reply dict out. Raises only `Abandoned`."""
        try:
            command, wait_s = validate(request)
        except BadInput as e:
            log.warning("control: request refused: %s", e)
            return refused(str(e), cancel=isinstance(request, dict) and request.get("op") == "cancel")
        if command is SYNC:
            return self._sync()
        try:
            result = self._run(command)
        except self.Abandoned:
            raise
        except CancelledError:
            return refused("the lane service is stopping; nothing was done, try again",
                           isinstance(command, CancelCommand))
        except JournalIntegrityError as e:  # the journal was lost under the service
            return {"error": f"journal refused: {e}", "exit_code": EXIT_INTEGRITY}
        except ApplianceError as e:
            return {"error": str(e), "exit_code": EXIT_ERROR}
        except Exception as e:  # a till bug: the run loop has logged it with its traceback
            return {"error": f"unexpected error in the lane service: {type(e).__name__}", "exit_code": EXIT_ERROR}
        if wait_s and result.txn is not None and result.txn.state in OPEN_STATES:
            result = self._wait_for_end(result, wait_s)
        return reply_of(result)

    def _sync(self) -> dict:
        try:
            try:
                if self.uplink_state is not None:
                    state = self.uplink_state()
                else:
                    state = {"kind": "none", "connected": False, "connected_since": None, "last_error": None,
                             **dataclasses.asdict(self.journal.outbox_state())}
            finally:
                self.journal.close()  # this thread's connection, if the read opened one
        except JournalIntegrityError as e:
            return {"error": f"journal refused: {e}", "exit_code": EXIT_INTEGRITY}
        except ApplianceError as e:
            return {"error": f"the outbox cannot be read: {e}", "exit_code": EXIT_ERROR}
        if self.sync_now is not None:
            self.sync_now()
        return {"uplink": state, "exit_code": 0}

    def _run(self, command: Command) -> Result:
        future: Future[Result] = self.till.post_command(command)
        while True:
            try:
                return future.result(timeout=self.poll_s)
            except FutureTimeout:
                if self._closing.is_set() and not future.cancel():
                    raise self.Abandoned() from None

    def _wait_for_end(self, result: Result, wait_s: float) -> Result:
        """Poll the journal (this thread's own connection, closed before returning)."""
        txn = result.txn
        deadline = self._clock() + wait_s
        try:
            while txn.state in OPEN_STATES and self._clock() < deadline and not self._closing.is_set():
                self._closing.wait(self.poll_s)
                txn = self.journal.get(txn.txn_id) or txn
        finally:
            self.journal.close()
        return Result.of(txn, result.cancel)


# --- the socket transport ---------------------------------------------------------------------


@contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for bind/connect that reaches `path` whatever its length.

    AF_UNIX addresses hold at most 107 bytes, and a state dir (a pytest tmp path, a deep mount)
    can be longer. Then we open the directory and name the socket through the magic link
    /proc/self/fd/<fd>/<name>: the kernel resolves it to the same directory, so server and client
    agree on one inode, with no chdir (process-wide, unsafe with threads) and no symlink in a
    shared place like /tmp. Short paths are used as they are, which keeps error messages plain.
    """
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    """Listens on STATE_DIR/control.sock and answers each connection in its own thread.

    The caller must hold the lane lock: `start()` removes a socket file left by a dead service.
    Stopping is two steps, so that the till can finish a platform call in between:
    `stop_accepting()`, then `close()`.
    """

    def __init__(self, state_dir: Path, handler: CommandHandler, *, max_clients: int = MAX_CLIENTS):
        self.path = Path(state_dir) / SOCKET_NAME
        self.handler = handler
        self._slots = threading.BoundedSemaphore(max_clients)
        self._sock: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._wake: WakePipe | None = None  # wakes the accept loop's select() at stop_accepting()

    def start(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                with unix_address(self.path) as address:
                    sock.bind(address)
                os.chmod(self.path, 0o660)  # before listen(): nobody can connect until then
                sock.listen(max(8, MAX_CLIENTS))
                sock.setblocking(False)  # accept() once select() saw a client; it may have gone since
            except BaseException:
                sock.close()
                raise
        except OSError as e:
            raise ApplianceError(f"cannot open the control socket {self.path}: {e}") from None
        self._sock = sock
        self._wake = WakePipe()
        self._accepter = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._accepter.start()
        log.info("control socket %s ready", self.path)

    def stop_accepting(self) -> None:
        """Take no new connection; the socket file goes (a new client then finds no service)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._wake is not None:
            self._wake.wake()
        if self._accepter is not None:
            self._accepter.join(timeout=2.0)
            if not self._accepter.is_alive() and self._wake is not None:
                self._wake.close()
        if self._sock is not None:
            self._sock.close()
            self.path.unlink(missing_ok=True)

    def close(self, grace_s: float = 0.3) -> None:
        """Stop accepting, make waiting handlers give up, and after grace_s cut every connection
        still open (its client sees EOF). Idempotent."""
        self.stop_accepting()
        self.handler.close()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._conns:
                    break
            time.sleep(0.02)
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            ready, _, _ = select.select([self._sock, self._wake.fd], [], [])  # sleeps until a client or a stop
            if self._sock not in ready:
                continue
            try:
                conn, _ = self._sock.accept()
                conn.setblocking(True)
            except BlockingIOError:  # the client gave up before we took it
                continue
            except OSError as e:
                if self._closed.is_set():
                    return
                log.error("control: accept failed: %s", e)
                time.sleep(0.2)
                continue
            if not self._slots.acquire(blocking=False):
                _turn_away(conn, f"the lane service is busy ({MAX_CLIENTS} commands at once); try again")
                continue
            with self._lock:
                self._conns.add(conn)
            try:
                threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()
            except RuntimeError as e:  # no thread to be had (a resource limit): this client only is refused
                log.error("control: cannot serve a connection: %s", e)
                with self._lock:
                    self._conns.discard(conn)
                self._slots.release()
                _turn_away(conn, "the lane service cannot take a command now; try again")

    def _serve(self, conn: socket.socket) -> None:
        try:
            reader = _LineReader(conn)
            while not self._closed.is_set():
                try:
                    line = reader.line(deadline=time.monotonic() + REQUEST_TIMEOUT_S)
                    conn.settimeout(REQUEST_TIMEOUT_S)  # for the reply
                except _Oversized:
                    log.warning("control: request refused: longer than %d bytes", MAX_LINE)
                    _send(conn, refused(f"request longer than {MAX_LINE} bytes"))
                    _discard_rest(conn)
                    return
                if line is None:
                    return
                try:
                    request = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError) as e:  # a position, never the text
                    reason = "request is not UTF-8" if isinstance(e, UnicodeDecodeError) else \
                        "request is not JSON (nested too deep)" if isinstance(e, RecursionError) else \
                        f"request is not JSON ({type(e).__name__} at byte {getattr(e, 'pos', '?')})"
                    log.warning("control: request refused: %s", reason)
                    _send(conn, refused(reason))
                    continue
                try:
                    reply = self.handler.handle(request)
                except CommandHandler.Abandoned:
                    log.warning("control: stopping while a command was in the till; its client gets no answer")
                    return
                _send(conn, reply)
        except OSError as e:  # the client went away, or sent nothing in time
            log.info("control: connection dropped: %s", e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            self._slots.release()


def _turn_away(conn: socket.socket, reason: str) -> None:
    """Answer a connection we will not serve with a refusal, and close it. The client may have
    hung up already: that is its business, never the accept loop's end."""
    with conn:
        try:
            conn.settimeout(1.0)
            _send(conn, refused(reason))
        except OSError as e:
            log.debug("control: refusal not delivered: %s", e)


class _Oversized(Exception):
    pass


class _LineReader:
    """Reads newline-terminated lines of at most MAX_LINE bytes from a stream socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def line(self, deadline: float | None = None) -> bytes | None:
        """The next line without its newline; a last line without one at EOF; None at EOF. With a
        `deadline` (time.monotonic()), TimeoutError unless the line is whole by then, however
        slowly its bytes come (each recv() alone would wait its timeout anew)."""
        while b"\n" not in self.buf:
            if len(self.buf) >= MAX_LINE:
                raise _Oversized()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the request line did not come in time")
                self.sock.settimeout(left)
            chunk = self.sock.recv(MAX_LINE)
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest or None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        if len(line) >= MAX_LINE:
            raise _Oversized()
        return line


def _discard_rest(conn: socket.socket, limit: int = 1 << 20, within_s: float = 1.0) -> None:
    """Before closing on a client still sending: read (and drop) what it sends, up to a bound in
    bytes and in time, so that closing with unread data does not reset the connection and lose
    our reply."""
    conn.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + within_s
    while limit > 0 and (left := deadline - time.monotonic()) > 0:
        conn.settimeout(left)
        if not (chunk := conn.recv(65536)):
            return
        limit -= len(chunk)


def _send(conn: socket.socket, reply: dict) -> None:
    conn.sendall(json.dumps(reply, ensure_ascii=False).encode() + b"\n")


# --- the client side --------------------------------------------------------------------------


#: How long a client waits for a reply beyond the request's own wait_s: a safety net only, for a
#: service that hangs without closing (its watchdog restarts it); the till answers or closes.
REPLY_TIMEOUT_S = 300.0


def _wait_of(request: dict) -> float:
    w = request.get("wait_s", 0)
    return float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w <= MAX_WAIT_S else 0.0


#: How long a client keeps trying while the service's queue of waiting connections is full.
CONNECT_WAIT_S = 5.0


def _connect(sock: socket.socket, path: Path) -> None:
    """Connect, waiting out a full listen backlog (EAGAIN: a Unix socket never blocks for it) for
    up to CONNECT_WAIT_S, as a busy service drains it; any other error is raised at once."""
    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        try:
            with unix_address(path) as address:
                sock.connect(address)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def call(state_dir: Path, request: dict, *, reply_timeout_s: float = REPLY_TIMEOUT_S) -> dict | None:
    """Send one request to the service of this state dir. Returns its reply, or None when no
    service listens (no socket file, or one left by a dead service). Raises ServiceGone when the
    service closed the connection before answering, ApplianceError when it cannot be reached."""
    path = Path(state_dir) / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(5.0)
        try:
            _connect(sock, path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError as e:
            if e.errno == errno.ENOENT:  # the state dir itself is missing
                return None
            hint = " (run as the service user or a member of its group)" if e.errno == errno.EACCES else ""
            if e.errno == errno.EAGAIN:
                hint = f" (its queue of waiting connections stayed full for {CONNECT_WAIT_S:g}s)"
            raise ApplianceError(f"cannot reach the lane service at {path}: {e.strerror}{hint}") from None
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
        except (ConnectionResetError, BrokenPipeError):
            pass  # it may have answered (busy) and closed before reading: read what it said
        try:
            sock.settimeout(reply_timeout_s)
            line = _LineReader(sock).line()
        except _Oversized:
            raise ApplianceError("the lane service sent an oversized reply") from None
        except (ConnectionResetError, BrokenPipeError):
            line = None
        except TimeoutError:
            raise ApplianceError(f"no answer from the lane service within {reply_timeout_s:g}s; "
                                 "see `appliance journal` for the outcome") from None
    if line is None:
        raise ServiceGone(GONE_MESSAGE)
    try:
        reply = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        reply = None
    if not isinstance(reply, dict) or not isinstance(reply.get("exit_code"), int) or \
            not ("error" in reply or "state" in reply or "uplink" in reply):
        raise ApplianceError("unreadable reply from the lane service")
    return reply


#: How long a one-shot command waits for a lane that another one-shot command holds.
LOCK_WAIT_S = 15.0


def submit(state_dir: Path, request: dict, headless: Callable[[], dict], *, lock_wait_s: float | None = None,
           poll_s: float = 0.1, on_wait: Callable[[int | None], None] | None = None) -> dict:
    """Run a command on this lane, whoever owns it: the running service (over the socket), else
    `headless()` run here while holding the lane lock. While another one-shot command holds the
    lock, keep trying both (a service may have just started) for up to lock_wait_s, then raise
    LaneBusy. `on_wait(pid)` is called once, when the lane is first found busy."""
    lock_wait_s = LOCK_WAIT_S if lock_wait_s is None else lock_wait_s
    lock = LaneLock(state_dir)
    deadline = time.monotonic() + lock_wait_s
    warned = False
    while True:
        reply = call(state_dir, request, reply_timeout_s=REPLY_TIMEOUT_S + _wait_of(request))
        if reply is not None:
            return reply
        if lock.try_acquire():
            break
        if not warned and on_wait is not None:
            on_wait(lock.holder())
        warned = True
        if time.monotonic() >= deadline:
            raise LaneBusy(lock.holder(), lock_wait_s)
        time.sleep(poll_s)
    try:
        return headless()
    finally:
        lock.release()

"""Fuzzing the command path: hostile requests into `CommandHandler.handle` (where the MQTT uplink's
commands will enter) with the till running in its own thread, and hostile bytes into the
`ControlServer`'s Unix socket (where the CLI's commands enter today).

Invariants (see fuzzing.py): `handle` never raises; every reply is a dict with an int exit code
in the documented set that serialises as strict JSON and UTF-8; a request that is not a valid
command is refused (exit 5) and commits nothing to the journal; the only payments are for
commands the test built valid on purpose, and the platform's ledger holds no code twice; no full
payment code and no traceback in the logs; no thread dies; bounded memory and threads.

Sizes: hypothesis example counts are modest (this file runs in about 15 s on two cores).
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import control, service
from appliance.config import from_dict
from appliance.control import MAX_LINE, CommandHandler, ControlServer
from appliance.indicator import make_indicator
from appliance.payments.sandbox import SandboxOptions, SandboxProvider
from appliance.wakeup import Stop
from conftest import (ALIPAY_NOTENOUGH, WECHAT_EXPIRED, WECHAT_LOST_ANSWER, WECHAT_PAID, WECHAT_PASSWORD_GIVEUP,
                      WECHAT_PASSWORD_OK, WECHAT_SLOW, WECHAT_SYSTEMERROR, WECHAT_UNREACHABLE, lane_dict, wait_for)
from appliance.money import MAX_FEN
from fuzzing import (CODE_DIGITS, FuzzLane, JournalWatch, chunked, garbage_requests, logs_discarded, peak_bytes, thread_crashes,
                     valid_cancels, valid_charges)

#: Every outcome the sandbox platform has (see appliance/payments/sandbox.py).
SANDBOX_CODES = [WECHAT_PAID, ALIPAY_NOTENOUGH, WECHAT_EXPIRED, WECHAT_PASSWORD_OK, WECHAT_PASSWORD_GIVEUP,
                 WECHAT_SYSTEMERROR, WECHAT_UNREACHABLE, WECHAT_LOST_ANSWER, WECHAT_SLOW]
#: The exit codes a reply may carry (cli.py): 0 done, 1 error, 3 declined, 4 unknown, 5 refused, 6 journal.
EXIT_CODES = {0, 1, 3, 4, 5, 6}
SETTINGS = settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                             HealthCheck.filter_too_much])
#: Memory a flood of requests may take above what was allocated before it, whatever its length
#: (measured: 50-120 KiB for 300 to 10 000 requests).
FLOOD_BOUND = 512 * 1024
#: The same through the socket: connection threads, their buffers of up to MAX_LINE, two dozen
#: connections at once (the test's own client threads are counted too). Measured: ~150 KiB for
#: 400 connections one after another, whatever their number; ~360 KiB with 24 at once.
SOCKET_FLOOD_BOUND = 1024 * 1024


def lane_config(state_dir, **sections):
    """The shared test lane, with a platform whose slow code (..97) answers in 20 ms, not 3 s."""
    return from_dict(lane_dict(state_dir, providers={"sandbox": {
        "kind": "sandbox", "first_query_after_s": 0.0, "query_every_s": 0.05, "reverse_after_s": 0.3, "slow_ms": 20}},
        **sections))


@pytest.fixture
def cfg(tmp_path):
    return lane_config(tmp_path / "state")


def check_reply(reply: object) -> dict:
    """A reply any client (CLI, MQTT) can read: a dict, an int exit code it documents, strict JSON
    (no nan) that encodes as UTF-8 (no lone surrogate), and either a state or an error."""
    assert isinstance(reply, dict), reply
    assert type(reply.get("exit_code")) is int and reply["exit_code"] in EXIT_CODES, reply
    json.dumps(reply, ensure_ascii=False, allow_nan=False).encode("utf-8")
    assert "state" in reply or "error" in reply, reply
    return reply


def refused(reply: dict) -> bool:
    return reply.get("state") == "refused" and reply["exit_code"] == 5


class JumpingClock:
    """A monotonic clock that moves `step_s` at every reading: a `wait_s` of an hour is waited out
    in a few polls (the resolver does not run while a request is checked; see CommandFuzz)."""

    def __init__(self, step_s: float):
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


class RunningLane:
    """A real lane with its till's loop (and optionally the resolver's) in threads of their own,
    as `appliance run` has them, and the fuzz record its invariants are checked against."""

    def __init__(self, lane, caplog, *, resolver: bool):
        caplog.set_level(logging.DEBUG, logger="appliance")
        self.fuzz = FuzzLane(lane, caplog)
        self.lane = lane
        self._stop = Stop()
        self._threads = [threading.Thread(target=lane.till.run, args=(self._stop,),
                                          name="till", daemon=True)]
        if resolver:
            self._threads.append(threading.Thread(target=lane.resolver.run, args=(self._stop,),
                                                  name="resolver", daemon=True))
        for t in self._threads:
            t.start()

    def check(self) -> None:
        assert all(t.is_alive() for t in self._threads)
        self.fuzz.check()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)


class CommandFuzz(RunningLane):
    """The handler the MQTT uplink will call, on a lane whose till runs in its thread. The resolver
    is stepped by the test between requests only, so that what a request commits to the journal is
    exactly what its own handling committed."""

    def __init__(self, lane, caplog):
        super().__init__(lane, caplog, resolver=False)
        self.handler = CommandHandler(lane.till, lane.journal, poll_s=0.002, clock=JumpingClock(60.0))
        self.watch = JournalWatch(lane.journal.state_dir)

    def example(self) -> None:
        """Start an example with an empty record (one that failed may have left its own)."""
        self.fuzz.clear()

    def send(self, request: object, *, valid: bool = False) -> dict:
        """Hand one request to the handler and check its reply and what it committed."""
        if valid:
            request = self.fuzz.inserted_command(request)
        self.fuzz.sent(request)
        before = self.watch.version()
        reply = check_reply(self.handler.handle(request))
        if not valid:
            assert refused(reply), f"not refused: {reply}"
        else:
            assert reply["exit_code"] in (0, 3, 4, 5), reply
        if refused(reply):
            assert self.watch.version() == before, "a refused request changed the journal"
        elif reply.get("txn_id") is not None:
            txn = self.lane.journal.get(reply["txn_id"])
            assert txn is not None and txn.order == request["order"] and reply["order"] == txn.order
        return reply

    def check(self) -> None:
        self.lane.resolver.step()  # open payments move on (their results reach the till's thread)
        super().check()

    def close(self) -> None:
        super().close()
        self.watch.close()


@pytest.fixture
def commands(lane, caplog):
    with closing(CommandFuzz(lane, caplog)) as c:
        yield c


@pytest.fixture
def log_lane(tmp_path):
    """The lane for the memory floods: it shows results on the `log` indicator. The `mock` one's
    fake pins keep every state they were ever set to (a growth of the test fake, not of the lane)."""
    cfg = lane_config(tmp_path / "state", indicator={"kind": "log"})
    with closing(service.build(cfg, indicator=make_indicator(cfg.indicator))) as lane:
        yield lane


def _limit(lane) -> int:
    return lane.till.max_amount_fen


# --- the transport-free part: CommandHandler.handle ------------------------------------------------


def test_what_the_strategies_take_for_granted(lane):
    """Garbage is refused for sure only while these hold: no payment code outside CODE_DIGITS
    (the default rules), a lane limit below money.MAX_FEN."""
    classify = lane.till.classifier.classify
    lo, hi = CODE_DIGITS
    for prefix in ("10", "15", "25", "30", "62", "01", "18", "51"):
        assert classify(prefix + "1" * (lo - 3)).kind != "payment" and classify(prefix + "1" * (hi - 1)).kind != "payment"
    assert classify("25" + "1" * (lo - 2)).kind == classify("25" + "1" * (hi - 2)).kind == "payment"  # the edges
    assert _limit(lane) < MAX_FEN


def test_handle_refuses_any_garbage_and_changes_nothing(commands):
    @SETTINGS
    @given(st.lists(garbage_requests(_limit(commands.lane), SANDBOX_CODES), min_size=1, max_size=6))
    def run(requests):
        commands.example()
        for r in requests:
            commands.send(r)
        commands.fuzz.assert_nothing_charged()
        commands.check()

    with thread_crashes() as crashes:
        run()
    assert crashes == []


def test_handle_charges_only_what_was_built_valid(commands):
    limit = _limit(commands.lane)
    request = st.one_of(garbage_requests(limit, SANDBOX_CODES).map(lambda r: (r, False)),
                        valid_charges(limit, SANDBOX_CODES).map(lambda r: (r, True)),
                        valid_charges(limit, SANDBOX_CODES).map(lambda r: (r, True)),
                        valid_cancels().map(lambda r: (r, True)))

    @SETTINGS
    @given(st.lists(request, min_size=1, max_size=6))
    def run(requests):
        commands.example()
        for r, valid in requests:
            commands.send(r, valid=valid)
        commands.check()

    with thread_crashes() as crashes:
        run()
    assert crashes == []
    assert commands.lane.journal.recent(limit=1), "no valid charge was ever paid: the test proves nothing"


#: The order paid before a flood: the flood's charges for it are refused by the till.
PAID_FIRST = {"op": "charge", "order": "M1", "amount_fen": 100, "code": WECHAT_PAID}


def _flood_requests(n: int, seed: int) -> list[object]:
    """`n` hostile requests from a seeded generator, most of them reaching the till (its refusal
    paths, once PAID_FIRST is paid), the others refused by validation: 64 KiB strings, deep lists,
    huge numbers."""
    rng = random.Random(seed)
    big = "9" * 65536
    shapes = [
        lambda i: {"op": "charge", "order": "M1", "amount_fen": 100, "code": f"13456789012{i:05d}00"},  # M1 is paid
        lambda i: {"op": "charge", "order": f"M{i}", "amount_fen": 10**9, "code": WECHAT_PAID},  # over the limit
        lambda i: {"op": "charge", "order": f"M{i}", "amount_fen": 100, "code": f"{i}x"},  # not a code
        lambda i: {"op": "charge", "order": f"bad order {i}", "amount_fen": 100, "code": WECHAT_PAID},
        lambda i: {"op": "cancel", "order": f"NONE{i}", "wait_s": 3600},
        lambda i: {"op": "charge", "order": "M1", "amount_fen": 100, "code": big},
        lambda i: {big: i, "op": "cancel", "order": "M1"},
        lambda i: {"op": big, "order": "M1"},
        lambda i: [[[[i]]]] * 50,
        lambda i: {"op": "cancel", "order": "M1", "wait_s": 10**400},
        lambda i: big + str(i),
    ]
    return [rng.choice(shapes)(i) for i in range(n)]


def test_memory_stays_bounded_under_a_flood_of_commands(log_lane, caplog):
    """3 000 hostile requests through the handler and the till's thread (logs formatted and dropped)."""
    with closing(CommandFuzz(log_lane, caplog)) as commands:
        assert commands.send(PAID_FIRST, valid=True)["state"] == "paid"
        requests = _flood_requests(3000, seed=5)

        def flood():
            for r in requests:
                reply = commands.handler.handle(r)
                assert refused(reply), reply

        before = commands.watch.version()
        with logs_discarded():
            peak = peak_bytes(flood)
        assert peak < FLOOD_BOUND, f"{peak} bytes"
        assert commands.watch.version() == before
        assert len(log_lane.journal.recent(limit=10)) == 1


# --- the socket transport: ControlServer ----------------------------------------------------------


class SocketFuzz(RunningLane):
    """The lane as `appliance run` wires it: till and resolver in their threads, the control
    server on a real Unix socket in the lane's state dir, answering through the lane's handler."""

    def __init__(self, lane, caplog):
        super().__init__(lane, caplog, resolver=True)
        self.state_dir = lane.journal.state_dir
        self.server = ControlServer(self.state_dir, lane.commands)
        self.server.start()
        self.baseline = threading.active_count()

    def connect(self) -> socket.socket:
        """A connected client socket. A full listen backlog (a burst of clients faster than the
        accept loop) fails a connect with a timeout at once (EAGAIN): try again, as a client would."""
        deadline = time.monotonic() + 10.0
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10.0)
            try:
                with control.unix_address(self.server.path) as address:
                    s.connect(address)
                return s
            except BlockingIOError:
                s.close()
                assert time.monotonic() < deadline, "the control server never accepted"
                time.sleep(0.01)

    def exchange(self, chunks: list[bytes], *, half_close: bool = True) -> list[dict]:
        """Send `chunks` on one connection (from a thread of its own: the server answers while we
        send), then read every reply line until the server closes. Each must be strict JSON."""
        with self.connect() as s:
            def send():
                try:
                    for c in chunks:
                        s.sendall(c)
                    if half_close:
                        s.shutdown(socket.SHUT_WR)
                except OSError:  # the server cut an oversized request short
                    pass

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            buf = b""
            try:
                while chunk := s.recv(4096):
                    buf += chunk
            except ConnectionResetError:  # closed with our request unread (told busy): its reply came first
                pass
            sender.join(timeout=10)
        assert buf == b"" or buf.endswith(b"\n"), "a reply line without its newline"
        return [check_reply(json.loads(line.decode("utf-8"))) for line in buf.splitlines()]

    def idle(self) -> bool:
        """Every connection is closed and its thread gone."""
        return not self.server._conns and threading.active_count() == self.baseline

    def check(self) -> None:
        assert wait_for(self.idle, timeout=10), f"{threading.active_count() - self.baseline} threads left"
        assert self.server._accepter.is_alive(), "the control server stopped accepting"
        super().check()

    def charge_once(self, order: str, code: str) -> None:
        """Whatever came before, a valid charge through the CLI's own client is paid, and once."""
        request = self.fuzz.inserted_command({"op": "charge", "order": order, "amount_fen": 100, "code": code})
        assert control.call(self.state_dir, request)["state"] == "paid"
        book = SandboxProvider("sandbox", SandboxOptions(), self.state_dir)
        try:
            assert book.charges(code) == 1
        finally:
            book.close()
        self.check()

    def close(self) -> None:
        self.server.close()
        super().close()


@pytest.fixture
def door(lane, caplog):
    with closing(SocketFuzz(lane, caplog)) as d:
        yield d


def answered(data: bytes) -> tuple[list[bytes], bool]:
    """The reference: the lines of `data` the server answers, in order, and whether it then
    answers "too long" and closes (at the first line of MAX_LINE bytes or more). A last line
    without its newline is answered at EOF."""
    *lines, rest = data.split(b"\n")
    out = []
    for line in lines + ([rest] if rest else []):
        if len(line) >= MAX_LINE:
            return out, True
        out.append(line)
    return out, False


def _json_line(value: object, ascii_only: bool) -> bytes:
    """A request as a client would encode it; without ensure_ascii a lone surrogate becomes bytes
    that are not UTF-8 (as a buggy client's would)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


#: Lines no JSON encoder writes: not UTF-8, not JSON, nested past the parser's recursion limit
#: (hypothesis raises the limit by 2000 while it runs a test: 1500 deep fails only outside it),
#: numbers past a float's range or past the parser's digit limit, a lone surrogate escaped.
RAW_LINES = [b"", b"{", b"\xff\xfe", b"\xed\xa0\x80", b"\xc3", b"\x00" * 10, b"\r", b"NaN", b"-Infinity", b"1e999",
             b"[" * 1500, b"[" * 4000, b"[" * 2000 + b"]" * 2000, b'{"":' * 1020, b"9" * 4000,
             b'{"op": "cancel", "order": "A1", "wait_s": ' + b"9" * 400 + b"}",
             b'{"op": "cancel", "order": "A1", "wait_s": NaN}',
             b'{"op": "charge", "order": "A1", "amount_fen": 100, "code": "\\ud800"}',
             b'{"op": "cancel", "order": "A1", "\\udfff\\u0000": 1}',
             b'{"op": "cancel", "order": "A1", "op": "charge"}', b'{"op": "cancel"}{"op": "cancel"}']


def socket_lines(limit: int) -> st.SearchStrategy[tuple[bytes, bool]]:
    """(line, valid on purpose) pairs: garbage requests encoded as JSON, raw garbage, long runs."""
    run = st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255),
                    st.one_of(st.integers(MAX_LINE - 2, MAX_LINE + 2), st.integers(1, 70_000)))
    garbage = st.one_of(st.builds(_json_line, garbage_requests(limit, SANDBOX_CODES), st.booleans()),
                        st.builds(_json_line, garbage_requests(limit, SANDBOX_CODES), st.booleans()),
                        st.binary(max_size=120), st.sampled_from(RAW_LINES), st.sampled_from(RAW_LINES), run)
    valid = st.one_of(valid_charges(limit, SANDBOX_CODES), valid_cancels()).map(
        lambda r: {**r, "wait_s": min(r.get("wait_s", 0), 1.0)})  # the resolver ends any payment within 1 s
    return st.one_of(garbage.map(lambda line: (line, False)), valid.map(lambda r: (r, True)))


def test_socket_takes_any_bytes_and_charges_only_valid_lines(door):
    limit = _limit(door.lane)

    @settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.filter_too_much])
    @given(st.lists(socket_lines(limit), max_size=12), st.booleans(), st.lists(st.integers(0, 1 << 20), max_size=8))
    def run(items, last_newline, cuts):
        door.fuzz.clear()
        lines, valid_lines = [], set()
        for item, valid in items:
            if valid:
                line = _json_line(door.fuzz.inserted_command(item), True)
                valid_lines.add(line)
            else:
                line = item.replace(b"\n", b"")
            lines.append(line)
            try:
                door.fuzz.sent(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, ValueError, RecursionError):
                door.fuzz.sent(line.decode("utf-8", "replace"))
        data = b"\n".join(lines) + (b"\n" if last_newline and lines else b"")
        replies = door.exchange(chunked(data, cuts))
        want, oversized = answered(data)
        assert len(replies) == len(want) + oversized, (len(replies), len(want), oversized)
        for line, reply in zip(want, replies):
            if line in valid_lines:
                assert reply["exit_code"] in (0, 3, 4, 5), reply
            else:
                assert refused(reply), (line[:80], reply)
        if oversized:
            assert refused(replies[-1]) and str(MAX_LINE) in replies[-1]["reason"]
        door.check()

    with thread_crashes() as crashes:
        run()
    assert crashes == []
    door.charge_once("FINAL-CHECK", "134500000000314100")


def test_socket_survives_idle_half_open_and_too_many_clients(door, monkeypatch):
    """More clients than MAX_CLIENTS: some connect and send nothing, some send half a line and
    wait, some hang up before the server answers them "busy", the rest send garbage and a valid
    charge each, all at once. The server keeps accepting, idle ones are dropped after the request
    timeout, every reply is a JSON line, each valid charge is paid at most once, and its threads go."""
    monkeypatch.setattr(control, "REQUEST_TIMEOUT_S", 1.0)
    idle = [door.connect() for _ in range(control.MAX_CLIENTS)]
    for i, s in enumerate(idle[::2]):
        s.sendall(b'{"op": "charge", "order": "H%d", "amount_fen": 100, "code": "' % i)  # no end, no newline
    assert wait_for(lambda: len(door.server._conns) == control.MAX_CLIENTS)
    trickling = threading.Event()

    def trickle(s: socket.socket) -> None:
        """A byte every 0.1 s: the line is never done within the request timeout."""
        try:
            while not trickling.wait(0.1):
                s.sendall(b" ")
        except OSError:  # dropped by the server
            pass

    for s in idle[1:4]:
        threading.Thread(target=trickle, args=(s,), daemon=True).start()

    def hang_up():
        door.connect().close()

    def busy():
        return door.exchange([b'{"op": "cancel", "order": "B1"}\n'])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: hang_up(), range(3 * control.MAX_CLIENTS)))
        replies = list(pool.map(lambda _: busy(), range(control.MAX_CLIENTS)))
    assert all(len(r) == 1 and refused(r[0]) and "busy" in r[0]["reason"] for r in replies), replies[:3]
    assert door.server._accepter.is_alive(), "the control server stopped accepting"
    t0 = time.monotonic()
    for s in idle:  # the server drops each after REQUEST_TIMEOUT_S, trickling or not: EOF, no reply
        assert s.recv(1) == b""
    trickling.set()
    assert time.monotonic() - t0 < 5 * control.REQUEST_TIMEOUT_S, "a trickling client kept its slot"
    for s in idle:
        s.close()
    assert wait_for(door.idle, timeout=10)

    codes = [f"1345678901{i:06d}00" for i in range(3 * control.MAX_CLIENTS)]
    rng = random.Random(7)

    def client(i: int) -> list[dict]:
        request = door.fuzz.inserted_command({"op": "charge", "order": f"K{i}", "amount_fen": 100, "code": codes[i]})
        lines = [rng.randbytes(rng.randrange(200)).replace(b"\n", b"") for _ in range(5)] + [_json_line(request, True)]
        return door.exchange([b"\n".join(lines) + b"\n"])

    with ThreadPoolExecutor(len(codes)) as pool:
        results = list(pool.map(client, range(len(codes))))
    for replies in results:
        assert len(replies) in (1, 6), replies  # told busy, or an answer for each line
        assert all(refused(r) for r in replies[:-1]) and replies[-1]["exit_code"] in (0, 5)
    paid = sum(r[-1]["state"] == "paid" for r in results)
    assert paid >= control.MAX_CLIENTS // 2, f"only {paid} of {len(codes)} paid"
    door.check()  # the ledger: no code twice, no trade the journal does not have
    door.charge_once("FINAL-CHECK", WECHAT_PAID)


def test_memory_and_threads_stay_bounded_under_a_flood_of_connections(log_lane, caplog):
    """400 connections one after another, each with hostile lines (up to MAX_LINE long, deeply
    nested, not UTF-8, requests reaching the till's refusals), then two dozen at once: the peak of
    memory allocated meanwhile stays under a bound, and every connection's thread ends."""
    rng = random.Random(9)
    requests = _flood_requests(1200, seed=6)
    conversations = [[_json_line(r, rng.random() < 0.5)[:MAX_LINE - 1] for r in requests[i:i + 3]]
                     + [rng.choice(RAW_LINES)] for i in range(0, len(requests), 3)]
    with closing(SocketFuzz(log_lane, caplog)) as door:
        [reply] = door.exchange([_json_line(door.fuzz.inserted_command(PAID_FIRST), True) + b"\n"])
        assert reply["state"] == "paid"

        def flood():
            for lines in conversations:
                assert len(door.exchange([b"\n".join(lines) + b"\n"])) == len(lines)
            with ThreadPoolExecutor(24) as pool:
                for replies in pool.map(lambda lines: door.exchange([b"\n".join(lines) + b"\n"]), conversations[:24]):
                    assert all(refused(r) for r in replies)

        with logs_discarded():
            peak = peak_bytes(flood)
        assert peak < SOCKET_FLOOD_BOUND, f"{peak} bytes"
        assert len(door.lane.journal.recent(limit=10)) == 1
        door.check()

"""The control socket: strict protocol against a real socket and a real till thread, then the
real `appliance run` with `appliance charge`/`cancel` going through it."""

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from appliance import control, service
from appliance.config import from_dict
from appliance.errors import ApplianceError, JournalError, JournalLost
from appliance.indicator import Signal, make_indicator
from appliance.journal import Journal, State
from appliance.money import MAX_FEN
from appliance.payments.sandbox import SandboxOptions, SandboxProvider
from appliance.scan import Scan
from appliance.till import CancelCommand, ChargeCommand
from appliance.wakeup import Stop
from conftest import (WECHAT_PAID, WECHAT_PAID_2, WECHAT_PASSWORD_OK, WECHAT_SLOW, appliance_cmd, lane_dict,
                      subprocess_env, wait_for, write_config)

SLOW_MS = 1500


def ledger(state_dir):
    return SandboxProvider("sandbox", SandboxOptions(), state_dir)


class Door:
    """A wired lane with its till, resolver and control server running in this process."""

    def __init__(self, state_dir, *, start_till=True, max_clients=control.MAX_CLIENTS, **sections):
        sections.setdefault("providers", {"sandbox": {"kind": "sandbox", "first_query_after_s": 0.0,
                                                      "query_every_s": 0.05, "reverse_after_s": 0.3,
                                                      "slow_ms": SLOW_MS}})
        self.cfg = from_dict(lane_dict(state_dir, **sections))
        self.state_dir = state_dir
        self.shown = []
        self.lane = service.build(self.cfg, indicator=make_indicator(
            self.cfg.indicator, on_render=lambda signal, pattern: self.shown.append(signal)))
        self.stop = Stop()
        self.threads = [threading.Thread(target=self.lane.resolver.run, args=(self.stop,), daemon=True)]
        if start_till:
            self.threads.append(threading.Thread(target=self.lane.till.run, args=(self.stop,), daemon=True))
        for t in self.threads:
            t.start()
        self.server = control.ControlServer(state_dir, self.lane.commands, max_clients=max_clients)
        self.server.start()

    def call(self, **request):
        return control.call(self.state_dir, request)

    def close(self):
        self.server.close()
        self.stop.set()
        for t in self.threads:
            t.join(timeout=SLOW_MS / 1000 + 5)
        self.lane.close()


@pytest.fixture
def door(tmp_path):
    d = Door(tmp_path / "state")
    yield d
    d.close()


def raw(state_dir, data: bytes, timeout=10.0) -> list[dict]:
    """Send raw bytes, half-close, and read every reply line until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, \
            control.unix_address(state_dir / control.SOCKET_NAME) as address:
        s.settimeout(timeout)
        s.connect(address)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server may cut an oversized request before reading it all
            pass
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def charge_request(order="C1", code=WECHAT_PAID, **extra):
    return {"op": "charge", "order": order, "amount_fen": 100, "code": code, "source": "command", "wait_s": 0,
            **extra}


# --- validation (transport-free) --------------------------------------------------------------

@pytest.mark.parametrize("request_,why", [
    ([], "JSON object"),
    ({"op": "refund", "order": "A"}, "unknown op"),
    ({"order": "A"}, "unknown op"),
    ({"op": "charge", "order": "A", "amount_fen": 1}, "missing code"),
    ({**charge_request(), "pin": "1234"}, "unknown field(s) pin"),
    ({"op": "cancel", "order": "A", "code": WECHAT_PAID}, "unknown field(s) code"),
    (charge_request(order=7), "order must be a string"),
    (charge_request(order=""), "order must be a string"),
    (charge_request(order="x" * 65), "order must be a string"),
    ({**charge_request(), "amount_fen": True}, "amount_fen"),
    ({**charge_request(), "amount_fen": 1.5}, "amount_fen"),
    ({**charge_request(), "amount_fen": "100"}, "amount_fen"),
    ({**charge_request(), "amount_fen": 0}, "amount_fen"),
    ({**charge_request(), "amount_fen": -100}, "amount_fen"),
    (charge_request(code=["x"]), "code must be a string"),
    (charge_request(code="1" * 129), "code must be a string"),
    (charge_request(source="Register!"), "source"),
    (charge_request(source=None), "source"),
    (charge_request(wait_s=float("nan")), "wait_s"),
    (charge_request(wait_s=float("inf")), "wait_s"),
    (charge_request(wait_s=-1), "wait_s"),
    (charge_request(wait_s=1e9), "wait_s"),
    (charge_request(wait_s="5"), "wait_s"),
    (charge_request(wait_s=False), "wait_s"),
    # found by fuzzing (test_fuzz_control.py): each raised something else than BadInput
    ({"op": [], "order": "A"}, "unknown op (an array)"),  # TypeError: unhashable
    ({"op": {"charge": 1}, "order": "A"}, "unknown op (an object)"),
    (charge_request(wait_s=10**400), "wait_s"),  # OverflowError: JSON ints have no size limit
    ({**charge_request(), "amount_fen": 10**5000}, "amount_fen must be a whole number of fen from 1 to"),
    ({**charge_request(), "amount_fen": MAX_FEN + 1}, "amount_fen"),
    # ... or showed request text in full: a code, a control character, a lone surrogate
    ({"op": WECHAT_PAID, "order": "A"}, "unknown op 1345**********6700"),
    ({**charge_request(), WECHAT_PAID: 1}, "unknown field(s) 1345**********6700"),
    ({"op": "cancel", "order": "A", "x\ny": 1, "\ud800": 2, "pin": 3}, "unknown field(s) *, ***, pin"),
    ({"op": "sync", "wait_s": 1}, "sync: unknown field(s) wait_s"),
    ({"op": "sync", "order": "A"}, "sync: unknown field(s) order"),
    ({"op": "Sync"}, "unknown op Sync: expected 'charge', 'cancel' or 'sync'"),
])
def test_validate_refuses_every_malformed_request(request_, why):
    with pytest.raises(control.BadInput, match=None) as e:
        control.validate(request_)
    assert why in str(e.value)
    assert WECHAT_PAID not in str(e.value)
    assert str(e.value).isprintable() and str(e.value).encode("utf-8")


def test_the_client_waits_for_any_wait_s_without_raising():
    assert [control._wait_of({"wait_s": w}) for w in (10**400, float("nan"), True, -1, 2.5)] == [0.0, 0.0, 0.0, 0.0, 2.5]


def test_validate_accepts_the_two_shapes():
    command, wait = control.validate(charge_request(wait_s=2.5))
    assert command == ChargeCommand("C1", 100, WECHAT_PAID, "command") and wait == 2.5
    assert WECHAT_PAID not in repr(command)  # a stray log of a command does not leak the code
    assert control.validate({"op": "cancel", "order": "C1"}) == (CancelCommand("C1"), 0.0)
    assert control.validate({"op": "charge", "order": "C1", "amount_fen": 5, "code": "x"})[0].source == "command"
    assert control.validate({"op": "sync"}) == (control.SYNC, 0.0)


class _FailingTill:
    """A till whose every command fails with `error` (the real till turns failures it knows into
    refusals; this is the handler's last line for the ones it does not)."""

    def __init__(self, error):
        self.error = error

    def post_command(self, command):
        future = Future()
        future.set_exception(self.error)
        return future


@pytest.mark.parametrize("error,exit_code,text", [
    (JournalLost("the journal was deleted while in use"), 6, "journal refused: the journal was deleted"),
    (ApplianceError("platform table broken"), 1, "platform table broken"),
    (RuntimeError(WECHAT_PAID), 1, "unexpected error in the lane service: RuntimeError"),
])
def test_handler_maps_failures_to_the_clis_exit_codes(tmp_path, error, exit_code, text):
    reply = control.CommandHandler(_FailingTill(error), journal=None).handle(charge_request())
    assert set(reply) == {"error", "exit_code"} and reply["exit_code"] == exit_code
    assert text in reply["error"] and WECHAT_PAID not in reply["error"]


# --- sync: the uplink's state -------------------------------------------------------------------

UPLINK = {"kind": "mqtt", "connected": True, "connected_since": "2026-11-29T08:00:00.000Z", "last_error": None,
          "backlog": 0, "oldest_queued_seq": None, "oldest_queued_at": None, "last_seq": 4, "last_ack_seq": 4,
          "last_ack_at": "2026-11-29T08:00:01.000Z"}


def test_sync_without_an_uplink_reports_the_journals_outbox(door):
    assert door.call(**charge_request())["state"] == "paid"
    reply = door.call(op="sync")
    outbox = door.lane.journal.outbox_state()
    assert outbox.backlog >= 2  # the payment's pending and paid events, nothing sends them
    assert reply == {"uplink": {"kind": "none", "connected": False, "connected_since": None, "last_error": None,
                                "backlog": outbox.backlog, "oldest_queued_seq": outbox.oldest_queued_seq,
                                "oldest_queued_at": outbox.oldest_queued_at, "last_seq": outbox.last_seq,
                                "last_ack_seq": None, "last_ack_at": None}, "exit_code": 0}


def test_sync_asks_the_uplink_and_wakes_it(lane):
    woken = []
    handler = control.CommandHandler(lane.till, lane.journal, uplink_state=lambda: dict(UPLINK),
                                     sync_now=lambda: woken.append(1))
    assert handler.handle({"op": "sync"}) == {"uplink": UPLINK, "exit_code": 0} and woken == [1]
    assert handler.handle({"op": "sync", "now": True})["state"] == "refused" and woken == [1]


@pytest.mark.parametrize("error,exit_code,text", [
    (JournalError("journal read failed: disk I/O error"), 1, "the outbox cannot be read: journal read failed"),
    (JournalLost("the journal was deleted while in use"), 6, "journal refused: the journal was deleted"),
])
def test_sync_with_an_unreadable_outbox_is_an_error_reply(lane, error, exit_code, text):
    def state():
        raise error

    reply = control.CommandHandler(lane.till, lane.journal, uplink_state=state).handle({"op": "sync"})
    assert reply == {"error": reply["error"], "exit_code": exit_code} and text in reply["error"]


# --- the socket with a real till thread -------------------------------------------------------

def test_charge_and_cancel_through_the_socket(door, caplog):
    caplog.set_level(logging.DEBUG)
    reply = door.call(**charge_request())
    assert reply["exit_code"] == 0
    assert (reply["state"], reply["order"], reply["amount"], reply["payment_type"]) == ("paid", "C1", "1.00",
                                                                                         "wechat")
    [txn] = door.lane.journal.recent()
    assert (txn.txn_id, txn.source, txn.state) == (reply["txn_id"], "command", State.PAID)
    again = door.call(**charge_request(code=WECHAT_PAID_2))
    assert (again["exit_code"], again["state"]) == (5, "refused") and "already paid" in again["reason"]
    reply = door.call(op="cancel", order="C1", wait_s=0)
    assert (reply["exit_code"], reply["state"]) == (0, "cancelled")
    nope = door.call(op="cancel", order="NOPE")
    assert nope["exit_code"] == 5 and "no paid payment" in nope["reason"]
    book = ledger(door.state_dir)
    assert book.charges(WECHAT_PAID) == 0 and [state for state, _ in book.trades().values()] == ["REFUND"]
    book.close()
    assert all(WECHAT_PAID not in r.getMessage() for r in caplog.records)


def test_bad_requests_get_refused_replies_and_the_server_keeps_serving(door, caplog):
    caplog.set_level(logging.DEBUG)
    secret = json.dumps(charge_request(code=WECHAT_PAID, amount_fen="1.00")).encode()
    replies = raw(door.state_dir, b"not json\n" + b"\xff\xfe\n" + b"[1, 2]\n" + b'{"op": "x"}\n' + secret + b"\n")
    assert [r["exit_code"] for r in replies] == [5] * 5
    assert [r["state"] for r in replies] == ["refused"] * 5
    assert "not JSON" in replies[0]["reason"] and "not UTF-8" in replies[1]["reason"]
    assert "JSON object" in replies[2]["reason"] and "unknown op" in replies[3]["reason"]
    assert "amount_fen" in replies[4]["reason"]
    [oversized] = raw(door.state_dir, b"{" + b" " * (2 * control.MAX_LINE))  # no newline at all
    assert oversized["state"] == "refused" and str(control.MAX_LINE) in oversized["reason"]
    [long_line] = raw(door.state_dir, json.dumps(charge_request(order="x" * control.MAX_LINE)).encode() + b"\n")
    assert str(control.MAX_LINE) in long_line["reason"]
    assert door.call(**charge_request())["state"] == "paid"  # still serving
    assert door.lane.journal.recent()[0].order == "C1" and len(door.lane.journal.recent()) == 1
    assert all(WECHAT_PAID not in r.getMessage() for r in caplog.records)


def test_json_nested_past_the_recursion_limit_is_refused_not_a_dead_connection(door):
    """Found by fuzzing: 4000 '[' (within MAX_LINE) made json.loads raise RecursionError, which
    killed the connection's thread with a traceback: no reply, the client saw a reset."""
    deep = [b"[" * 4000, b"[" * 2000 + b"]" * 2000, b'{"":' * 1020]
    replies = raw(door.state_dir, b"\n".join(deep) + b"\n")
    assert [(r["state"], r["reason"]) for r in replies] == [("refused", "request is not JSON (nested too deep)")] * 3
    assert door.call(**charge_request())["state"] == "paid"


def test_concurrent_clients_one_thread_owns_the_lane(door):
    codes = [f"1345678901234{i:03d}00" for i in range(8)]
    same_order = [f"1345678901235{i:03d}00" for i in range(4)]
    jobs = [charge_request(order=f"P{i}", code=c) for i, c in enumerate(codes)]
    jobs += [charge_request(order="SAME", code=c) for c in same_order]
    jobs += [charge_request(order=f"Q{i}", code=codes[0]) for i in range(3)]  # a code already used
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda r: control.call(door.state_dir, r), jobs))
    assert [r["state"] for r in replies[:8]] == ["paid"] * 8
    assert sorted(r["state"] for r in replies[8:12]) == ["paid"] + ["refused"] * 3
    assert [r["state"] for r in replies[12:]] == ["refused"] * 3
    book = ledger(door.state_dir)
    assert all(book.charges(c) == 1 for c in codes) and sum(book.charges(c) for c in same_order) == 1
    book.close()


def test_wait_s_waits_for_the_resolver_without_blocking_the_till(door):
    t0 = time.monotonic()
    reply = door.call(**charge_request(code=WECHAT_PASSWORD_OK, wait_s=10))
    assert (reply["state"], reply["exit_code"]) == ("paid", 0)
    assert time.monotonic() - t0 < 10
    # while a client waits, the till takes other commands
    waiting = ThreadPoolExecutor(1).submit(door.call, **charge_request(order="W2", code="134567890123456893",
                                                                        wait_s=0.6))
    assert wait_for(lambda: any(t.order == "W2" for t in door.lane.journal.recent()))
    assert door.call(**charge_request(order="W3", code="134567890123456800"))["state"] == "paid"
    assert waiting.result(timeout=10)["state"] in ("declined", "unknown")  # password given up, or still open
    quick = door.call(**charge_request(order="W4", code="134567890123457092"))
    assert (quick["state"], quick["exit_code"]) == ("unknown", 4)


def test_long_state_dir_path_beyond_the_unix_socket_limit(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "state"
    assert len(os.fsencode(deep / control.SOCKET_NAME)) > 108
    d = Door(deep)
    try:
        assert d.call(**charge_request())["state"] == "paid"
    finally:
        d.close()
    assert not (deep / control.SOCKET_NAME).exists()
    assert control.call(deep, charge_request()) is None  # no service: the CLI goes headless


def test_a_stale_socket_file_means_no_service_and_is_replaced_at_start(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(state / control.SOCKET_NAME))
    s.close()  # a dead service's leftover: the file stays, nobody listens
    assert control.call(state, charge_request()) is None
    d = Door(state)
    try:
        assert oct(os.stat(state / control.SOCKET_NAME).st_mode & 0o777) == "0o660"
        assert d.call(**charge_request())["state"] == "paid"
    finally:
        d.close()


def test_more_clients_than_slots_are_told_busy(tmp_path):
    """Clients beyond the slots are told busy, also when they hang up before that reply. Found by
    fuzzing: the reply's send failing (EPIPE) ended the accept loop's thread, and from then on every
    client waited in the backlog, unanswered."""
    d = Door(tmp_path / "state", max_clients=1)
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with control.unix_address(d.server.path) as address:
            idle.connect(address)
            assert wait_for(lambda: len(d.server._conns) == 1)
            gone = 0
            deadline = time.monotonic() + 10
            while gone < 20:  # each hangs up at once; a full backlog (nobody accepts) fails a connect
                assert time.monotonic() < deadline, "the control server no longer accepts"
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    try:
                        s.connect(address)
                        gone += 1
                    except BlockingIOError:
                        time.sleep(0.05)
        reply = control.call(d.state_dir, charge_request(), reply_timeout_s=5)
        assert reply["state"] == "refused" and "busy" in reply["reason"]
        assert d.server._accepter.is_alive()
        idle.close()
        assert wait_for(lambda: not d.server._conns)
        assert d.call(**charge_request())["state"] == "paid"
    finally:
        idle.close()
        d.close()


@pytest.mark.parametrize("opening", [b"", b"x" * (2 * control.MAX_LINE)], ids=["request", "after-oversized"])
def test_a_client_trickling_bytes_is_dropped_within_the_request_timeout(door, monkeypatch, opening):
    """Found by fuzzing: the timeout was per recv(), so a byte every few seconds kept a connection
    (and one of MAX_CLIENTS slots) for hours: 16 such clients shut the lane's door."""
    monkeypatch.setattr(control, "REQUEST_TIMEOUT_S", 0.5)
    stop = Stop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, \
            control.unix_address(door.state_dir / control.SOCKET_NAME) as address:
        s.settimeout(10)
        s.connect(address)

        def trickle():
            try:
                s.sendall(opening)
                while not stop.wait(0.05):
                    s.sendall(b" ")
            except OSError:
                pass

        threading.Thread(target=trickle, daemon=True).start()
        t0 = time.monotonic()
        buf = b""
        try:
            while chunk := s.recv(4096):
                buf += chunk
        except ConnectionResetError:
            pass
        dropped = wait_for(lambda: not door.server._conns, timeout=3)  # the server's side, still trickled at
        stop.set()
    assert dropped and time.monotonic() - t0 < 3
    assert [r["state"] for r in map(json.loads, buf.splitlines())] == (["refused"] if opening else [])


def test_no_thread_for_a_connection_refuses_that_client_only(door, monkeypatch):
    class NoConnThreads(threading.Thread):
        def start(self):
            if self.name == "control-conn":
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(threading, "Thread", NoConnThreads)
    reply = door.call(**charge_request())
    assert reply["state"] == "refused" and "cannot take a command now" in reply["reason"]
    monkeypatch.undo()
    assert door.server._accepter.is_alive() and not door.server._conns
    assert door.call(**charge_request())["state"] == "paid"


def test_a_command_the_till_never_started_is_refused_when_the_service_stops(tmp_path):
    d = Door(tmp_path / "state", start_till=False)  # a till that never gets to the command
    pending = ThreadPoolExecutor(1).submit(d.call, **charge_request())
    time.sleep(0.3)
    d.close()
    reply = pending.result(timeout=10)
    assert (reply["state"], reply["exit_code"]) == ("refused", 5) and "nothing was done" in reply["reason"]
    assert d.lane.journal.recent() == []


def test_service_stopping_mid_platform_call_gives_the_client_eof(tmp_path):
    d = Door(tmp_path / "state")
    pending = ThreadPoolExecutor(1).submit(d.call, **charge_request(code=WECHAT_SLOW))
    try:
        assert wait_for(lambda: d.lane.journal.recent() and d.lane.journal.recent()[0].state is State.PENDING)
        time.sleep(0.2)
        d.server.close()
        with pytest.raises(control.ServiceGone, match="stopped before the answer"):
            pending.result(timeout=10)
    finally:
        d.close()


def test_command_results_show_when_idle_but_never_break_the_cashiers_order(door):
    door.call(**charge_request())
    assert wait_for(lambda: Signal.PAID in door.shown)  # a register-pushed charge beeps
    door.lane.till.post_scan(Scan("ORD:M1:2.00", "stdin"))
    assert wait_for(lambda: door.lane.indicator.current is Signal.AWAITING_CODE)
    del door.shown[:]
    assert door.call(**charge_request(order="M2", code="134567890123456600"))["state"] == "paid"
    assert door.call(op="cancel", order="C1")["state"] == "cancelled"
    time.sleep(0.2)
    assert door.shown == [] and door.lane.indicator.current is Signal.AWAITING_CODE
    door.lane.till.post_scan(Scan("134567890123456500", "stdin"))  # the cashier's order still takes its code
    assert wait_for(lambda: any(t.order == "M1" and t.state is State.PAID for t in door.lane.journal.recent()))


# --- the real service and CLI -----------------------------------------------------------------

def _cli(conf, *args):
    return subprocess.run(appliance_cmd() + list(args) + ["--config", str(conf)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=60)


def _service(tmp_path, slow_ms=3000):
    doc = lane_dict(tmp_path / "state", scanner={"kind": "stdin"}, indicator={"kind": "log"})
    doc["providers"]["sandbox"]["slow_ms"] = slow_ms
    conf = write_config(tmp_path / "a.toml", doc)
    err_path = tmp_path / "service.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.PIPE,
                                stderr=err, text=True, env=subprocess_env())
    assert wait_for(lambda: "control socket" in err_path.read_text()), err_path.read_text()
    return conf, proc, err_path


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


@pytest.mark.integration
def test_cli_charge_and_cancel_go_through_the_running_service(tmp_path):
    conf, proc, err_path = _service(tmp_path)
    try:
        r = _cli(conf, "charge", "--order", "R1", "--amount", "12.34", "--code", WECHAT_PAID, "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert set(out) == {"txn_id", "out_trade_no", "order", "payment_type", "platform", "amount", "state",
                            "reason"}
        assert (out["order"], out["amount"], out["state"]) == ("R1", "12.34", "paid")
        r = _cli(conf, "charge", "--order", "R2", "--amount", "1.00", "--code", WECHAT_PASSWORD_OK, "--wait", "10")
        assert r.returncode == 0 and "paid" in r.stdout, r.stderr
        r = _cli(conf, "charge", "--order", "R1", "--amount", "12.34", "--code", WECHAT_PAID_2, "--json")
        assert r.returncode == 5 and "already paid" in json.loads(r.stdout)["reason"]
        r = _cli(conf, "cancel", "--order", "R2", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["state"] == "cancelled"
        service_log = err_path.read_text()
        # the service's own till did the work: its log has the payments and the LED showed them
        assert "order R1 12.34 wechat" in service_log and "indicator: paid" in service_log
        assert "order R2 1.00 wechat" in service_log and "indicator: cancelled" in service_log
        assert WECHAT_PAID not in service_log + r.stdout + r.stderr
    finally:
        _stop(proc)
    assert proc.returncode == 0
    journal = Journal(tmp_path / "state", "S0001", "L01")
    assert [(t.order, t.state, t.source) for t in reversed(journal.recent())] == [
        ("R1", State.PAID, "command"), ("R2", State.CANCELLED, "command")]
    journal.close()
    book = ledger(tmp_path / "state")
    assert book.charges(WECHAT_PAID) == 1 and book.charges(WECHAT_PAID_2) == 0
    book.close()


@pytest.mark.integration
def test_sigterm_during_a_slow_command_client_exits_4(tmp_path):
    conf, proc, err_path = _service(tmp_path, slow_ms=30_000)
    try:
        client = subprocess.Popen(appliance_cmd() + ["charge", "--order", "K1", "--amount", "5.00", "--code",
                                                     WECHAT_SLOW, "--json", "--config", str(conf)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
        journal = Journal(tmp_path / "state", "S0001", "L01")
        assert wait_for(lambda: journal.recent() and journal.recent()[0].state is State.PENDING)
        time.sleep(0.3)  # inside the platform call
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = client.communicate(timeout=15)
        proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 6.0
    finally:
        _stop(proc)
    assert client.returncode == 4, err
    assert "service stopped before the answer" in err and "appliance journal" in err
    assert json.loads(out)["state"] == "unknown"
    assert journal.recent()[0].state is State.PENDING  # resolved at the next start
    journal.close()


def test_a_client_waits_out_a_full_connection_queue(tmp_path):
    """A service that drains its backlog a moment later is reached, not reported unreachable (a Unix
    socket's connect fails with EAGAIN at once while the listen backlog is full)."""
    state = tmp_path / "state"
    state.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fillers = []
    with control.unix_address(state / control.SOCKET_NAME) as address:
        server.bind(address)
        server.listen(1)
        while True:  # fill the backlog: nobody accepts yet
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(address)
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)

    def serve_later():
        time.sleep(0.3)
        server.settimeout(5)
        for _ in range(len(fillers) + 1):
            conn, _ = server.accept()
            conn.settimeout(0.2)
            try:
                if conn.recv(4096):
                    conn.sendall(b'{"state": "paid", "reason": "", "exit_code": 0}\n')
            except TimeoutError:
                pass  # a filler: it sends nothing
            conn.close()

    t = threading.Thread(target=serve_later)
    t.start()
    try:
        assert control.call(state, charge_request(), reply_timeout_s=5)["state"] == "paid"
    finally:
        t.join(10)
        for s in fillers:
            s.close()
        server.close()

"""Head office's commands (appliance/uplink/commands.py) on a real lane whose till runs in its
own thread: strict validation that changes nothing, and each command's effect on the lane."""

import json
import logging
import re
import threading

import pytest

from appliance import schemas, service
from appliance.config import from_dict
from appliance.errors import BadMessage, JournalError
from appliance.indicator import Signal
from appliance.journal import State
from appliance.money import MAX_FEN
from appliance.scan import Scan
from appliance.uplink.commands import MAX_REQUEST, Commands
from appliance.wakeup import Stop
from conftest import WECHAT_PAID, WECHAT_SYSTEMERROR, Recorder, journal_snapshot, lane_dict, wait_for

AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UPLINK_STATE = {"kind": "mqtt", "connected": True, "connected_since": "2024-05-01T08:00:00.000Z", "last_error": None,
                "backlog": 3, "oldest_queued_seq": 7, "oldest_queued_at": "2024-05-01T08:01:00.000Z", "last_seq": 9,
                "last_ack_seq": 6, "last_ack_at": "2024-05-01T08:00:59.000Z"}


class Office:
    """A wired lane with its till running, and the Commands head office talks to."""

    def __init__(self, state_dir, *, run_till=True, **kwargs):
        self.lane = service.build(from_dict(lane_dict(state_dir)), indicator=Recorder())
        self.stop = Stop()
        self.thread = threading.Thread(target=self.lane.till.run, args=(self.stop,), daemon=True)
        if run_till:
            self.thread.start()
        self.syncs = []
        self.state = dict(UPLINK_STATE)
        self.commands = Commands(self.lane.commands, self.lane.till, lambda: self.state,
                                 lambda: self.syncs.append(1), "S0001", "L01", **kwargs)

    def __call__(self, name, request):
        payload = request if isinstance(request, bytes) else json.dumps(request).encode()
        reply = self.commands(name, payload)
        schemas.check("reply", json.dumps(reply, allow_nan=False))  # publishable as it is, per its schema
        assert AT.match(reply["at"])
        assert (reply["kind"], reply["version"], reply["store_id"], reply["terminal_id"]) == ("reply", 1, "S0001",
                                                                                              "L01")
        assert reply["ok"] is (reply["error"] is None)
        return reply

    def pay(self, order, code=WECHAT_PAID):
        assert self("charge", {"request_id": f"pay-{order}", "order": order, "amount_fen": 100})["ok"]
        self.lane.till.post_scan(Scan(code, "test"))
        assert wait_for(lambda: any(t.order == order and t.state is State.PAID for t in self.lane.journal.recent()))

    def close(self):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.lane.close()


@pytest.fixture
def office(tmp_path):
    o = Office(tmp_path / "state")
    yield o
    o.close()


@pytest.fixture(scope="module")
def shared_office(tmp_path_factory):
    """One lane for the requests that must change nothing (each test checks that they did not)."""
    o = Office(tmp_path_factory.mktemp("office") / "state")
    yield o
    o.close()


def records(caplog):
    return [r for r in caplog.records if r.name == "appliance.uplink.commands"]


# --- malformed requests: an error reply, nothing changed ----------------------------------------

R = {"request_id": "r-1"}
CHARGE = {**R, "order": "A1", "amount_fen": 100}


@pytest.mark.parametrize("name,request_,why", [
    ("ping", b'{"request_id": "r-1", "pad": "' + b"x" * MAX_REQUEST + b'"}', "more than the 4096 a message may have"),
    ("ping", b"\xff\xfe{}", "not UTF-8 (byte 0xff at offset 0)"),
    ("ping", b'{"request_id": "r-1"', "$: not JSON"),
    ("ping", b"", "$: not JSON"),
    ("ping", b"[" * 4000, "nested too deeply"),
    ("ping", [], "JSON object"),
    ("ping", "r-1", "JSON object"),
    ("ping", None, "JSON object"),
    ("ping", {}, "missing request_id"),
    ("ping", {"request_id": ""}, "request_id must be"),
    ("ping", {"request_id": "r" * 65}, "request_id must be"),
    ("ping", {"request_id": "a/b"}, "request_id must be"),
    ("ping", {"request_id": "a+b"}, "request_id must be"),
    ("ping", {"request_id": "a#b"}, "request_id must be"),
    ("ping", {"request_id": "a b"}, "request_id must be"),
    ("ping", {"request_id": "r\u00e9"}, "request_id must be"),
    ("ping", {"request_id": 7}, "request_id must be"),
    ("ping", {"request_id": None}, "request_id must be"),
    ("refund", R, "unknown command refund: expected charge, cancel, sync, ping"),
    ("", R, "unknown command (empty)"),
    ("+", R, "unknown command *"),
    (WECHAT_PAID, R, "unknown command 1345**********6700"),
    ("charge", {**R, "order": "A1"}, "charge: missing amount_fen"),
    ("charge", R, "charge: missing amount_fen, order"),
    ("cancel", R, "cancel: missing order"),
    ("charge", {**CHARGE, "code": WECHAT_PAID}, "unknown field(s) code"),
    ("charge", {**CHARGE, WECHAT_PAID: 1}, "unknown field(s) 1345**********6700"),
    ("cancel", {**R, "order": "A1", "amount_fen": 100}, "unknown field(s) amount_fen"),
    ("sync", {**R, "full": True}, "sync: unknown field(s) full"),
    ("ping", {**R, "x\ny": 1}, "ping: unknown field(s) *"),
    ("charge", {**CHARGE, "order": "A/1"}, "order must be 1-32 letters"),
    ("charge", {**CHARGE, "order": "A+1"}, "order must be 1-32 letters"),
    ("charge", {**CHARGE, "order": "A#1"}, "order must be 1-32 letters"),
    ("cancel", {**R, "order": "A/1"}, "order must be 1-32 letters"),
    ("cancel", {**R, "order": "#"}, "order must be 1-32 letters"),
    ("charge", {**CHARGE, "order": ""}, "order must be 1-32 letters"),
    ("charge", {**CHARGE, "order": "A" * 33}, "order must be 1-32 letters"),
    ("charge", {**CHARGE, "order": "A 1"}, "order must be 1-32 letters"),
    ("charge", {**CHARGE, "order": 1}, "order must be 1-32 letters"),
    ("charge", {**CHARGE, "order": None}, "order must be 1-32 letters"),
    ("charge", {**CHARGE, "amount_fen": 0}, "amount_fen must be a whole number of fen from 1 to"),
    ("charge", {**CHARGE, "amount_fen": -100}, "amount_fen"),
    ("charge", {**CHARGE, "amount_fen": MAX_FEN + 1}, "amount_fen"),
    ("charge", {**CHARGE, "amount_fen": 10**30}, "amount_fen"),
    ("charge", {**CHARGE, "amount_fen": 1.5}, "amount_fen"),
    ("charge", {**CHARGE, "amount_fen": 100.0}, "amount_fen"),
    ("charge", {**CHARGE, "amount_fen": "100"}, "amount_fen"),
    ("charge", {**CHARGE, "amount_fen": True}, "amount_fen"),
    ("charge", {**CHARGE, "amount_fen": None}, "amount_fen"),
    ("charge", b'{"request_id": "r-1", "order": "A1", "amount_fen": NaN}', "NaN is not a JSON number"),
    ("charge", b'{"request_id": "r-1", "order": "A1", "amount_fen": 1, "amount_fen": 2}', "duplicate key 'amount_fen'"),
    ("ping", b'{"request_id": "r-1", "%s": 1, "%s": 2}' % ((WECHAT_PAID.encode(),) * 2), "duplicate key '1345**"),
])
def test_a_malformed_request_gets_an_error_reply_and_changes_nothing(shared_office, caplog, name, request_, why):
    office = shared_office
    caplog.set_level(logging.DEBUG)
    before = journal_snapshot(office.lane.journal)
    reply = office(name, request_)
    assert reply["ok"] is False and why in reply["error"] and reply["result"] is None
    parsed = request_
    if isinstance(request_, bytes):  # a reply names a request_id only from a request it could read
        try:
            parsed = schemas.parse(request_, MAX_REQUEST)
        except BadMessage:
            parsed = None
    valid_id = isinstance(parsed, dict) and parsed.get("request_id") == "r-1"
    assert reply["request_id"] == ("r-1" if valid_id else None)
    assert reply["command"] == name if name in ("charge", "cancel", "sync", "ping") else why.split()[2]
    assert office.lane.till.health()["lane"] == "ready" and office.syncs == []
    assert journal_snapshot(office.lane.journal) == before
    # The published schema refuses it too, but for 100.0: JSON Schema calls it an integer; the lane
    # takes only a whole number as it is written in JSON.
    if name in schemas.COMMANDS and not (isinstance(request_, dict) and isinstance(request_.get("amount_fen"), float)):
        with pytest.raises(BadMessage):
            schemas.check("command", request_ if isinstance(request_, bytes) else json.dumps(request_), command=name)
    [logged] = records(caplog)
    assert logged.levelno == logging.WARNING and "refused" in logged.getMessage()
    assert WECHAT_PAID not in json.dumps(reply) + logged.getMessage()


def test_a_request_of_exactly_the_limit_is_taken(office):
    request = json.dumps(R).encode()
    request += b" " * (MAX_REQUEST - len(request))
    assert office("ping", request)["result"] == {"pong": True}
    assert not office("ping", request + b" ")["ok"]


# --- the commands --------------------------------------------------------------------------------

def test_ping(office, caplog):
    caplog.set_level(logging.INFO)
    reply = office("ping", R)
    assert (reply["ok"], reply["command"], reply["request_id"], reply["result"]) == (True, "ping", "r-1",
                                                                                      {"pong": True})
    [logged] = records(caplog)
    assert logged.levelno == logging.INFO and "ping" in logged.getMessage() and "r-1" in logged.getMessage()


def test_charge_arms_the_lane_and_the_payment_follows_the_scanned_code(office, caplog):
    caplog.set_level(logging.INFO)
    reply = office("charge", {"request_id": "reg:42", "order": "A1", "amount_fen": 12_34})
    assert reply["ok"] and reply["request_id"] == "reg:42"
    assert reply["result"] == {"order": "A1", "amount": "12.34", "amount_fen": 12_34, "state": "awaiting_code",
                               "expires_in_s": 60.0}
    assert office.lane.till.health()["lane"] == "awaiting_code"
    assert wait_for(lambda: office.lane.indicator.current is Signal.AWAITING_CODE)
    assert office.lane.journal.recent() == []  # nothing journaled until the code comes
    [logged] = records(caplog)
    assert logged.levelno == logging.INFO and "charge" in logged.getMessage() and "reg:42" in logged.getMessage()
    office.lane.till.post_scan(Scan(WECHAT_PAID, "test"))
    assert wait_for(lambda: office.lane.journal.recent() and office.lane.journal.recent()[0].state is State.PAID)
    [txn] = office.lane.journal.recent()
    assert (txn.order, txn.amount_fen) == ("A1", 12_34)


@pytest.mark.parametrize("setup,request_,why,lane_state", [
    ([], {**CHARGE, "amount_fen": 50_000_01}, "exceeds this lane's limit", "ready"),
    (["pay"], CHARGE, "already paid", "ready"),
    (["ORD:B1:1.00"], CHARGE, "mid order", "awaiting_code"),
    (["CMD:CANCEL"], CHARGE, "order ticket of a cancel", "awaiting_cancel"),
    (["ORD:B1:1.00", WECHAT_SYSTEMERROR], CHARGE, "being resolved", "resolving"),
])
def test_a_charge_the_lane_refuses_says_why(office, caplog, setup, request_, why, lane_state):
    for step in setup:
        if step == "pay":
            office.pay("A1")
        else:
            office.lane.till.post_scan(Scan(step, "test"))
    assert wait_for(lambda: office.lane.till.health()["lane"] == lane_state)
    before = journal_snapshot(office.lane.journal)
    caplog.set_level(logging.INFO)
    reply = office("charge", request_)
    assert reply["ok"] is False and why in reply["error"]
    assert reply["result"]["state"] == "refused" and reply["result"]["order"] == "A1"
    assert office.lane.till.health()["lane"] == lane_state
    assert journal_snapshot(office.lane.journal) == before
    [logged] = records(caplog)
    assert logged.levelno == logging.WARNING


def test_a_charge_the_till_does_not_take_in_time_is_withdrawn(tmp_path):
    office = Office(tmp_path / "state", run_till=False, charge_wait_s=0.2)  # a till stuck in a platform call
    try:
        reply = office("charge", CHARGE)
        assert reply["ok"] is False and "nothing was done" in reply["error"] and reply["result"] is None
        office.lane.till.drain()  # the till gets to its queue: the withdrawn command does not arm it
        assert office.lane.till.health()["lane"] == "ready"
    finally:
        office.close()


def test_a_charge_while_the_service_stops_is_refused(tmp_path):
    office = Office(tmp_path / "state", run_till=False)
    try:
        stopping = threading.Timer(0.2, office.lane.till._cancel_queued_commands)  # what run() does at its end
        stopping.start()
        reply = office("charge", CHARGE)
        assert reply["ok"] is False and "stopping" in reply["error"]
    finally:
        office.close()


def test_cancel_goes_the_control_sockets_way(office):
    office.pay("A1")
    reply = office("cancel", {**R, "order": "A1"})
    assert reply["ok"] and (reply["result"]["state"], reply["result"]["exit_code"]) == ("cancelled", 0)
    assert set(reply["result"]) == {"txn_id", "out_trade_no", "order", "payment_type", "platform", "amount",
                                    "state", "reason", "exit_code"}
    assert office.lane.journal.recent()[0].state is State.CANCELLED
    before = journal_snapshot(office.lane.journal)
    nope = office("cancel", {**R, "order": "B9"})
    assert nope["ok"] is False and "no paid payment" in nope["error"]
    assert (nope["result"]["state"], nope["result"]["exit_code"]) == ("refused", 5)
    assert journal_snapshot(office.lane.journal) == before


def test_sync_reports_the_backlog_and_wakes_the_uplink(office):
    reply = office("sync", R)
    assert reply["ok"] and reply["result"] == {"backlog": 3, "oldest_queued_seq": 7, "last_seq": 9,
                                               "last_ack_seq": 6, "last_ack_at": "2024-05-01T08:00:59.000Z",
                                               "connected": True}
    assert office.syncs == [1]


def test_sync_with_an_unreadable_outbox_says_so(office):
    def broken():
        raise JournalError("journal read failed: disk I/O error")

    office.commands.uplink_state = broken
    reply = office("sync", R)
    assert reply["ok"] is False and "disk I/O error" in reply["error"] and office.syncs == []

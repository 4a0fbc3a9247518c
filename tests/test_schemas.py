"""appliance.schemas: each payload kind's JSON Schema, table-driven with valid and invalid examples."""

from __future__ import annotations

import copy
import json

import pytest
from jsonschema import Draft202012Validator

from appliance import schemas
from appliance.errors import ApplianceError, BadMessage

EID = "0123456789abcdef0123456789abcdef"
AT = "2026-12-01T03:04:05.678Z"

#: One valid message of each kind, as the contract (/docs/mqtt.md) describes them.
TXN = {"kind": "txn", "version": 2, "event_id": EID, "seq": 7, "store_id": "S0001", "terminal_id": "L01",
       "txn_id": 3, "out_trade_no": "S0001_L01_20261201000001000003", "order": "A1001",
       "payment_type": "wechat", "platform": "wechat_main", "funding_source": "CMB_DEBIT", "txn_kind": "pay",
       "amount": "12.50", "amount_fen": 1250, "currency": "CNY", "state": "paid", "previous_state": "pending",
       "reason": "SUCCESS", "code_masked": "1345**********6789", "platform_txn_id": "4200001234",
       "source": "scan", "business_date": "2026-12-01", "created_at": "2026-12-01T03:04:04.000Z", "at": AT}
LANE = {"kind": "lane", "version": 1, "event_id": EID, "seq": 1, "store_id": "S0001", "terminal_id": "L01",
        "event": "fault", "detail": {"source": "scanner", "reason": "unplugged"}, "business_date": "2026-12-01",
        "at": AT}
TOTAL = {"payment_type": "wechat", "funding_source": None, "count": 2, "amount_fen": 2500, "amount": "25.00",
         "declined": 1, "cancelled": 1, "cancelled_amount_fen": 100, "cancelled_amount": "1.00", "open": 0}
DAILY = {"kind": "daily", "version": 1, "store_id": "S0001", "terminal_id": "L01", "business_date": "2026-12-01",
         "closed": False, "currency": "CNY", "as_of_seq": 9, "at": AT, "totals": [TOTAL]}
STATUS = {"kind": "status", "version": 1, "store_id": "S0001", "terminal_id": "L01", "state": "online", "at": AT,
          "software_version": "0.1.0", "backlog": 0, "last_ack_seq": 9, "last_ack_at": AT, "lane": "ready",
          "faults": {}, "scanner": "ok", "platforms": {"wechat_main": "ok"}, "connected_since": AT}
WILL = {"kind": "status", "version": 1, "store_id": "S0001", "terminal_id": "L01", "state": "offline", "at": AT}
REPLY = {"kind": "reply", "version": 1, "command": "ping", "request_id": "r-1", "ok": True, "error": None,
         "result": {"pong": True}, "store_id": "S0001", "terminal_id": "L01", "at": AT}
VALID = {"txn": TXN, "lane": LANE, "daily": DAILY, "status": STATUS, "reply": REPLY,
         "command": {"request_id": "r-1", "order": "A1001", "amount_fen": 1250}}


def changed(doc: dict, **changes) -> dict:
    """A deep copy of doc with keys set (value ...: deleted); a dotted key goes into totals[0]."""
    d = copy.deepcopy(doc)
    for k, v in changes.items():
        target, key = (d["totals"][0], k.split("__", 1)[1]) if k.startswith("total__") else (d, k)
        if v is ...:
            del target[key]
        else:
            target[key] = v
    return d


GOOD = [
    ("txn", TXN),
    ("txn", changed(TXN, funding_source=None, platform_txn_id=None, previous_state=None, state="pending")),
    ("txn", changed(TXN, state="cancel_requested", previous_state="paid", txn_kind="cancel")),
    ("txn", changed(TXN, state="paid", previous_state="cancel_requested", txn_kind="cancel")),
    ("txn", changed(TXN, state="refunded", previous_state="cancel_requested", txn_kind="refund")),
    ("txn", changed(TXN, amount="100000000.00", amount_fen=10_000_000_000)),
    ("lane", LANE),
    ("lane", changed(LANE, event="started", detail={})),
    ("daily", DAILY),
    ("daily", changed(DAILY, totals=[], as_of_seq=0)),
    ("daily", changed(DAILY, closed=True, event_id=EID, seq=10)),
    ("status", STATUS),
    ("status", WILL),
    ("status", changed(WILL, state="stopped", last_ack_seq=None, last_ack_at=None, lane="resolving",
                       faults={"scanner": "unplugged"}, scanner="fault")),
    ("reply", REPLY),
    ("reply", changed(REPLY, ok=False, error="unknown command 'x'", result=None, request_id=None, command="x")),
    ("command", {"request_id": "r-1", "order": "A1001", "amount_fen": 1250}),
    ("command", {"request_id": "a.b:c_d-9"}),
]

BAD = [  # kind, payload, the start of the reason
    ("txn", changed(TXN, event_id="0123456789ABCDEF0123456789ABCDEF"), "$.event_id: "),
    ("txn", changed(TXN, event_id=EID[:31]), "$.event_id: "),
    ("txn", changed(TXN, store_id="S-1"), "$.store_id: "),
    ("txn", changed(TXN, store_id="S00000001"), "$.store_id: "),
    ("txn", changed(TXN, terminal_id="L0001"), "$.terminal_id: "),
    ("txn", changed(TXN, seq=0), "$.seq: "),
    ("txn", changed(TXN, seq="7"), "$.seq: "),
    ("txn", changed(TXN, seq=True), "$.seq: "),
    ("txn", changed(TXN, amount="12.5"), "$.amount: "),
    ("txn", changed(TXN, amount="12.51"), "$.amount: '12.51' is not the amount of 1250 fen"),
    ("txn", changed(TXN, amount_fen=0, amount="0.00"), "$.amount_fen: "),
    ("txn", changed(TXN, amount_fen=12.5), "$.amount_fen: "),
    ("txn", changed(TXN, currency="USD"), "$.currency: "),
    ("txn", changed(TXN, state="lost"), "$.state: "),
    ("txn", changed(TXN, txn_kind="sale"), "$.txn_kind: "),
    ("txn", changed(TXN, state="refunded", txn_kind="pay"), "$.txn_kind: "),
    ("txn", changed(TXN, state="cancelled", txn_kind="pay"), "$.txn_kind: "),
    ("txn", changed(TXN, txn_kind="refund"), "$.state: "),
    ("txn", changed(TXN, business_date="2026-02-30"), "$.business_date: "),
    ("txn", changed(TXN, business_date="20261201"), "$.business_date: "),
    ("txn", changed(TXN, at="2026-12-01T03:04:05Z"), "$.at: "),
    ("txn", changed(TXN, at="2026-12-01T11:04:05.678+08:00"), "$.at: "),
    ("txn", changed(TXN, version=1), "$.version: "),
    ("txn", changed(TXN, kind="lane"), "$.kind: "),
    ("txn", changed(TXN, code="134567890123456789"), "$: Additional properties"),
    ("txn", changed(TXN, reason=...), "$: 'reason' is a required property"),
    ("txn", changed(TXN, funding_source=...), "$: 'funding_source' is a required property"),
    ("lane", changed(LANE, event="day_close"), "$.event: "),
    ("lane", changed(LANE, detail={"nested": {"a": 1}}), "$.detail.nested: "),
    ("lane", changed(LANE, seq=...), "$: 'seq' is a required property"),
    ("daily", changed(DAILY, total__amount="25.10"), "$.totals[0].amount: '25.10' is not the amount"),
    ("daily", changed(DAILY, total__cancelled_amount="2.00"), "$.totals[0].cancelled_amount: "),
    ("daily", changed(DAILY, total__open=-1), "$.totals[0].open: "),
    ("daily", changed(DAILY, total__extra=1), "$.totals[0]: Additional properties"),
    ("daily", changed(DAILY, total__funding_source=...), "$.totals[0]: 'funding_source' is a required"),
    ("daily", changed(DAILY, event_id=EID), "$: 'seq' is a dependency of 'event_id'"),
    ("daily", changed(DAILY, event_id=EID, seq=10), "$.closed: "),
    ("daily", changed(DAILY, as_of_seq=-1), "$.as_of_seq: "),
    ("status", changed(WILL, state="gone"), "$.state: "),
    ("status", changed(STATUS, backlog=-1), "$.backlog: "),
    ("status", changed(STATUS, lane="busy"), "$.lane: "),
    ("status", changed(STATUS, platforms={"a": "down"}), "$.platforms.a: "),
    ("status", changed(STATUS, faults={"scanner": 1}), "$.faults.scanner: "),
    ("reply", changed(REPLY, error="boom"), "$.error: "),
    ("reply", changed(REPLY, ok=False), "$.error: "),
    ("reply", changed(REPLY, request_id="a/b"), "$.request_id: "),
    ("reply", changed(REPLY, request_id="x" * 65), "$.request_id: "),
    ("command", {"order": "A1001", "amount_fen": 1250}, "$: "),
    ("command", {"request_id": "r+1"}, "$: "),
    ("command", ["ping"], "$: "),
]


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_every_schema_is_valid_draft_2020_12(kind):
    s = schemas.schema(kind)
    Draft202012Validator.check_schema(s)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("kind, doc", GOOD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(GOOD)])
def test_valid_messages_pass(kind, doc):
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert schemas.check(kind, payload) == doc


@pytest.mark.parametrize("kind, doc, reason", BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_invalid_messages_fail_with_path_and_reason(kind, doc, reason):
    with pytest.raises(BadMessage) as e:
        schemas.check(kind, json.dumps(doc).encode())
    assert e.value.reason.startswith(reason), e.value.reason
    assert len(e.value.reason) <= schemas.REASON_CHARS
    assert isinstance(e.value, ApplianceError)


@pytest.mark.parametrize("payload, reason", [
    (b"", "$: not JSON"),
    (b"{", "$: not JSON"),
    (b"\xff{}", "$: not UTF-8 (byte 0xff at offset 0)"),
    (b'{"kind":"status","kind":"status"}', "$: not usable JSON: duplicate key 'kind'"),
    (b'{"backlog": NaN}', "$: not usable JSON: NaN"),
    (b"[" * 100_000 + b"]" * 100_000, "$: "),
    (b" " * (schemas.MAX_BYTES + 1), f"$: {schemas.MAX_BYTES + 1} bytes"),
])
def test_what_is_not_json_is_a_bad_message(payload, reason):
    with pytest.raises(BadMessage) as e:
        schemas.check("status", payload)
    assert e.value.reason.startswith(reason)


def test_a_reason_never_carries_a_payment_code_or_much_of_the_payload():
    code = "134567890123456789"
    for doc in (changed(TXN, code_masked=code * 4), changed(TXN, order=code + "!"), changed(TXN, platform_txn_id=code * 8), changed(TXN, reason=code * 100)):
        with pytest.raises(BadMessage) as e:
            schemas.check("txn", json.dumps(doc))
        assert code not in e.value.reason and len(e.value.reason) <= schemas.REASON_CHARS


def test_one_command_is_checked_against_its_own_arguments():
    assert schemas.check("command", b'{"request_id":"r1","order":"A1"}', command="cancel") == {
        "request_id": "r1", "order": "A1"}
    with pytest.raises(BadMessage, match=r"^\$: Additional properties"):
        schemas.check("command", b'{"request_id":"r1","order":"A1"}', command="ping")
    with pytest.raises(BadMessage, match=r"^\$: 'amount_fen' is a required property"):
        schemas.check("command", b'{"request_id":"r1","order":"A1"}', command="charge")
    with pytest.raises(BadMessage, match=r"^\$: 4097 bytes"):
        schemas.check("command", b" " * 4097, command="ping")
    with pytest.raises(ValueError, match="unknown command"):
        schemas.check("command", b"{}", command="reboot")
    with pytest.raises(ValueError, match="unknown payload kind"):
        schemas.check("cmd", b"{}")


def test_schemas_ship_as_package_data():
    """An editable install reads them from the tree; a wheel has only what package-data names."""
    import tomllib
    from fnmatch import fnmatch

    from conftest import ROOT

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["appliance"]
    for kind in schemas.KINDS:
        assert (ROOT / "appliance" / "schemas" / f"{kind}.json").is_file()
        assert any(fnmatch(f"schemas/{kind}.json", g) for g in globs), globs


def test_every_payload_a_journal_writes_is_valid(tmp_path):
    """The journal's outbox rows (txn, lane, day_close) and its daily totals pass head office's check,
    and head office's totals from those txn events equal the journal's own (the same definitions)."""
    from datetime import datetime, timedelta, timezone

    from appliance.hq.ingest import Message, Router
    from appliance.hq.report import day_totals
    from appliance.hq.store import Store
    from appliance.journal import Journal, State

    now = [datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)]
    j = Journal(tmp_path / "state", "S0001", "L01", clock=lambda: now[0])
    codes = iter(f"1345678901234567{i:02d}" for i in range(50))

    def pay(order, fen, *moves, ptype="wechat", funding=None):
        t = j.open_payment(order=order, amount_fen=fen, payment_type=ptype, platform="sandbox", code=next(codes))
        for to in moves:
            j.transition(t.txn_id, to, "because", funding_source=funding,
                         auth_code=next(codes) if to is State.DEFERRED else None)

    S = State
    pay("A1", 1250, S.PAID, funding="CMB_DEBIT")
    pay("A2", 100, S.DECLINED)
    pay("A3", 5, S.UNKNOWN, S.REVERSED)
    pay("A4", 999, S.PAID, S.CANCEL_REQUESTED, S.REFUNDED, ptype="alipay")
    pay("A5", 42, S.PAID, S.CANCEL_REQUESTED, S.PAID)
    pay("A6", 7, S.DEFERRED)
    pay("A7", 8)
    j.lane_event("fault", {"source": "scanner", "reason": "unplugged"})
    day = j.business_date_now()
    now[0] += timedelta(days=1)
    assert j.close_days(j.business_date_now()) == [day]
    rows = j.claim(limit=1000)
    assert {r.kind for r in rows} == {"txn", "lane", "day_close"}
    hq = Store(f"sqlite:///{tmp_path / 'hq.sqlite'}")
    router = Router(hq, "lanes")
    for r in rows:
        kind = {"txn": "txn", "event": "lane", "daily": "daily"}[r.topic]
        assert schemas.check(kind, r.payload.encode())["seq"] == r.seq
        events: list[dict] = []
        assert router.write(Message(f"lanes/S0001/L01/{r.topic}", r.payload.encode(), r.seq, 1), events) == kind
        hq.add_events(events)
    assert hq.Reject.select().count() == 0
    daily = j.daily(day)
    schemas.check("daily", json.dumps(daily))
    ours = [{k: v for k, v in t.items() if k not in ("store_id", "terminal_id")} for t in day_totals(hq, day)]
    assert ours == daily["totals"] and len(ours) == 3
    j.close()
    hq.close()

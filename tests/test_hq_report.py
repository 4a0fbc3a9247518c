"""appliance.hq.report: the day's totals from a hand-made set of events (table-driven), the lanes that
need attention, the cross-check against the lanes' own day totals, and `appliance hq report`."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from appliance.hq import report
from appliance.hq.store import Store
from appliance.money import format_amount
from conftest import appliance_cmd, subprocess_env
from test_schemas import DAILY, STATUS, TXN, WILL, changed

DAY = "2026-12-01"
AT = "2026-12-01T05:00:00.000Z"


def txn(store_id="S0001", terminal_id="L01", n=1, seq=1, state="paid", fen=1000, ptype="wechat", funding=None,
        day=DAY, previous=None) -> dict:
    """Payment `n`'s event number `seq` (its out_trade_no is made from store, terminal and n)."""
    kind = "refund" if state == "refunded" else "cancel" if state in ("cancel_requested", "cancelled") else "pay"
    return changed(TXN, event_id=uuid.uuid4().hex, seq=seq, store_id=store_id, terminal_id=terminal_id, txn_id=n,
                   out_trade_no=f"{store_id}_{terminal_id}_{n}", state=state, previous_state=previous,
                   txn_kind=kind, amount_fen=fen, amount=format_amount(fen), payment_type=ptype,
                   funding_source=funding, business_date=day)


def line(store_id="S0001", terminal_id="L01", ptype="wechat", funding=None, count=0, fen=0, declined=0,
         cancelled=0, cancelled_fen=0, open_=0) -> dict:
    return {"store_id": store_id, "terminal_id": terminal_id, "payment_type": ptype, "funding_source": funding,
            "count": count, "amount_fen": fen, "amount": format_amount(fen), "declined": declined,
            "cancelled": cancelled, "cancelled_amount_fen": cancelled_fen,
            "cancelled_amount": format_amount(cancelled_fen), "open": open_}


CASES = {
    "one paid": ([txn(seq=1, state="pending"), txn(seq=2, state="paid", previous="pending")],
                 [line(count=1, fen=1000)]),
    "the latest event counts, whatever the arrival order": (
        [txn(seq=3, state="refunded", previous="cancel_requested"), txn(seq=1, state="paid"),
         txn(seq=2, state="cancel_requested", previous="paid")],
        [line(cancelled=1, cancelled_fen=1000)]),
    "cancel requested still holds the money": (
        [txn(seq=1, state="paid"), txn(seq=2, state="cancel_requested")], [line(count=1, fen=1000)]),
    "a refused cancel is paid again": (
        [txn(seq=1), txn(seq=2, state="cancel_requested"), txn(seq=3, state="paid", previous="cancel_requested")],
        [line(count=1, fen=1000)]),
    "declined and reversed are declined; pending, unknown, deferred are open": (
        [txn(n=1, state="declined"), txn(n=2, state="unknown", seq=2), txn(n=2, state="reversed", seq=5),
         txn(n=3, state="pending", seq=3), txn(n=4, state="unknown", seq=4), txn(n=5, state="deferred", seq=6)],
        [line(declined=2, open_=3)]),
    "per payment type and funding source, sorted (no funding source first)": (
        [txn(n=1, funding="CMB_DEBIT", fen=250), txn(n=2, fen=100, seq=2), txn(n=3, ptype="alipay", fen=7, seq=3),
         txn(n=4, funding="CMB_DEBIT", fen=50, seq=4), txn(n=5, funding="ALIPAYACCOUNT", ptype="alipay", seq=5)],
        [line(ptype="alipay", count=1, fen=7), line(ptype="alipay", funding="ALIPAYACCOUNT", count=1, fen=1000),
         line(count=1, fen=100), line(funding="CMB_DEBIT", count=2, fen=300)]),
    "per store and terminal; other days are not counted": (
        [txn(), txn(terminal_id="L02"), txn(store_id="S0002", n=9), txn(n=2, seq=2, day="2026-11-30")],
        [line(count=1, fen=1000), line(terminal_id="L02", count=1, fen=1000),
         line(store_id="S0002", count=1, fen=1000)]),
    "a re-created journal: the same txn id and seq, another out_trade_no, both count": (
        [txn(n=1, seq=1), changed(txn(n=1, seq=1), out_trade_no="S0001_L01_other")],
        [line(count=2, fen=2000)]),
    "no events": ([], []),
}


@pytest.fixture
def sqlite_store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'hq.sqlite'}")
    yield s
    s.close()


def fill(store: Store, events) -> Store:
    with store.atomic():
        for e in events:
            store.add_event(e, AT)
    return store


@pytest.mark.parametrize("events, expected", CASES.values(), ids=CASES.keys())
def test_day_totals(sqlite_store, events, expected):
    assert report.day_totals(fill(sqlite_store, events), DAY) == expected


def test_day_totals_on_both_databases_and_for_one_store(hq_db_url):
    events = [e for case, _ in CASES.values() for e in case]
    store = fill(Store(hq_db_url), events)
    try:
        everything = report.day_totals(store, DAY)
        assert report.day_totals(store, DAY, store_id="S0002") == [t for t in everything if t["store_id"] == "S0002"]
        assert {t["store_id"] for t in everything} == {"S0001", "S0002"}
        assert report.store_sums(everything)[1] == {
            "store_id": "S0002", "count": 1, "amount_fen": 1000, "amount": "10.00", "declined": 0, "cancelled": 0,
            "cancelled_amount_fen": 0, "cancelled_amount": "0.00", "open": 0}
    finally:
        store.close()


def test_lanes_offline_stopped_or_with_a_backlog_need_attention(sqlite_store):
    for s in (changed(STATUS, terminal_id="L01", backlog=0), changed(STATUS, terminal_id="L02", backlog=12),
              changed(WILL, terminal_id="L03"), changed(WILL, terminal_id="L04", state="stopped"),
              changed(WILL, store_id="S0002", terminal_id="L01")):
        sqlite_store.set_status(s, AT)
    got = [(a["store_id"], a["terminal_id"], a["state"], a["backlog"]) for a in report.attention(sqlite_store)]
    assert got == [("S0001", "L02", "online", 12), ("S0001", "L03", "offline", None),
                   ("S0001", "L04", "stopped", None), ("S0002", "L01", "offline", None)]
    assert len(report.attention(sqlite_store, "S0002")) == 1


def daily(as_of_seq, totals, terminal_id="L01") -> dict:
    return changed(DAILY, terminal_id=terminal_id, as_of_seq=as_of_seq,
                   totals=[{k: v for k, v in t.items() if k not in ("store_id", "terminal_id")} for t in totals])


def test_a_lanes_daily_is_checked_against_the_events_up_to_its_seq(sqlite_store):
    fill(sqlite_store, [txn(n=1, seq=1), txn(n=2, seq=2, fen=500), txn(n=2, seq=3, fen=500, state="cancel_requested"),
                        txn(n=2, seq=4, fen=500, state="cancelled"), txn(terminal_id="L02", seq=1)])
    sqlite_store.set_daily(daily(2, [line(count=2, fen=1500)]), AT)  # agrees as of seq 2 (before the cancel)
    sqlite_store.set_daily(daily(1, [line(count=2, fen=2000)], terminal_id="L02"), AT)  # disagrees
    sqlite_store.set_daily(daily(9, [line(terminal_id="L03", count=1, fen=1)], terminal_id="L03"), AT)  # no events
    found = {(m["terminal_id"], m["missing_events"], m["hq_last_seq"]) for m in report.cross_check(sqlite_store, DAY)}
    assert found == {("L02", False, 1), ("L03", True, 0)}
    sqlite_store.set_daily(daily(4, [line(count=1, fen=1000, cancelled=1, cancelled_fen=500)]), AT)
    assert "L01" not in {m["terminal_id"] for m in report.cross_check(sqlite_store, DAY)}
    sqlite_store.set_daily(daily(4, [line(count=2, fen=1500)]), AT)  # a lane that missed its own cancel
    bad = [m for m in report.cross_check(sqlite_store, DAY) if m["terminal_id"] == "L01"]
    assert bad[0]["hq_totals"] == [{k: v for k, v in line(count=1, fen=1000, cancelled=1, cancelled_fen=500).items()
                                    if k not in ("store_id", "terminal_id")}]


@pytest.mark.integration
def test_the_report_command_prints_a_table_and_json(tmp_path):
    url = f"sqlite:///{tmp_path / 'hq.sqlite'}"
    store = fill(Store(url), [txn(n=1, funding="CMB_DEBIT", fen=1234), txn(n=2, seq=2, state="declined")])
    store.set_status(changed(WILL, terminal_id="L02"), AT)
    store.set_daily(daily(1, []), AT)
    store.close()
    run = [*appliance_cmd(), "hq", "report", "--db", url, "--date", DAY]
    out = subprocess.run(run, capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert "S0001  L01   wechat  CMB_DEBIT      1   12.34" in out.stdout
    assert "S0001/L02: offline" in out.stdout and "S0001/L01: daily as of seq 1 differs" in out.stdout
    out = subprocess.run([*run, "--json", "--store", "S0001"], capture_output=True, text=True, timeout=60,
                         env=subprocess_env())
    doc = json.loads(out.stdout)
    assert doc["stores"][0]["amount"] == "12.34" and doc["stores"][0]["declined"] == 1
    assert [a["terminal_id"] for a in doc["attention"]] == ["L02"] and len(doc["mismatches"]) == 1
    for bad in (["--date", "2026-13-01"], ["--date", "20261201"], ["--store", "S-1"]):
        out = subprocess.run([*run, *bad], capture_output=True, text=True, timeout=60, env=subprocess_env())
        assert out.returncode == 2 and "not a" in out.stderr
    out = subprocess.run([*appliance_cmd(), "hq", "report", "--db", f"sqlite:///{tmp_path / 'nope.sqlite'}"],
                         capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert out.returncode == 2 and "no head-office database" in out.stderr

"""The journal's outbox as head office's queue (schema 3): seq, claim/ack, pruning, lane events,
daily totals and day closes, the room reserve, and the migration of a released schema-2 journal."""

import json
import shutil
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from appliance.errors import JournalError, JournalFull
from appliance.journal import SCHEMA_VERSION, Journal, State
from tests.conftest import journal_snapshot

V2_JOURNAL = Path(__file__).parent / "data" / "journal_v2"


class Clock:
    def __init__(self, at=datetime(2026, 11, 29, 4, 0, tzinfo=timezone.utc)):
        self.at = at

    def __call__(self):
        return self.at

    def advance(self, **kw):
        self.at += timedelta(**kw)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def journal(tmp_path, clock):
    j = Journal(tmp_path, "S0001", "L01", clock=clock)
    yield j
    j.close()


def pay(journal, n: int, *moves, amount=1000, payment_type="wechat"):
    t = journal.open_payment(order=f"O{n}", amount_fen=amount, payment_type=payment_type, platform="sandbox",
                             code=f"1345678901234{n:05d}")
    for to, extra in moves:
        t = journal.transition(t.txn_id, to, "test", **extra)
    return t


def test_every_row_gets_the_next_seq_and_is_queued_in_seq_order(journal):
    pay(journal, 1, (State.PAID, {}))
    journal.lane_event("started", {"version": "x"})
    pay(journal, 2, (State.UNKNOWN, {}), (State.DECLINED, {}))
    rows = journal.claim(limit=100)
    assert [r.seq for r in rows] == list(range(1, 7))
    assert [(r.kind, r.topic) for r in rows][:3] == [("txn", "txn"), ("txn", "txn"), ("lane", "event")]
    for r in rows:
        payload = json.loads(r.payload)
        assert (payload["seq"], payload["event_id"]) == (r.seq, r.event_id)
    assert journal.outbox_state().backlog == 6 and journal.outbox_state().last_seq == 6


def test_a_txn_event_has_the_published_shape_and_no_full_code(journal):
    t = pay(journal, 1, (State.PAID, {"platform_txn_id": "42", "funding_source": "CFT"}))
    pay(journal, 2)
    [_, paid] = journal.events(t.txn_id)
    assert paid == {
        "kind": "txn", "version": 2, "event_id": paid["event_id"], "seq": 2, "store_id": "S0001",
        "terminal_id": "L01", "txn_id": t.txn_id, "out_trade_no": t.out_trade_no, "order": "O1",
        "payment_type": "wechat", "platform": "sandbox", "funding_source": "CFT", "txn_kind": "pay",
        "amount": "10.00", "amount_fen": 1000, "currency": "CNY", "state": "paid", "previous_state": "pending",
        "reason": "test", "code_masked": t.code_masked, "platform_txn_id": "42", "source": "scan",
        "business_date": "2026-11-29", "created_at": "2026-11-29T04:00:00.000Z", "at": "2026-11-29T04:00:00.000Z"}
    raw = (journal.state_dir / Journal.FILENAME).read_bytes()
    assert b"134567890123400001" not in raw and "134567890123400001" not in json.dumps(journal.events())


@pytest.mark.parametrize("moves, kinds", [
    ([(State.PAID, {})], ["pay", "pay"]),
    ([(State.UNKNOWN, {}), (State.REVERSED, {})], ["pay", "pay", "pay"]),
    ([(State.PAID, {}), (State.CANCEL_REQUESTED, {}), (State.CANCELLED, {})], ["pay", "pay", "cancel", "cancel"]),
    ([(State.PAID, {}), (State.CANCEL_REQUESTED, {}), (State.PAID, {})], ["pay", "pay", "cancel", "cancel"]),
    ([(State.PAID, {}), (State.CANCEL_REQUESTED, {}), (State.REFUNDED, {})], ["pay", "pay", "cancel", "refund"]),
    ([(State.DEFERRED, {"auth_code": "134567890123400001"}), (State.CANCELLED, {})], ["pay", "pay", "cancel"]),
])
def test_txn_kind_names_the_operation_of_each_change(journal, moves, kinds):
    t = pay(journal, 1, *moves)
    assert [e["txn_kind"] for e in journal.events(t.txn_id)] == kinds


def test_claim_counts_attempts_and_ack_marks_sent_once(journal, clock):
    for n in range(5):
        pay(journal, n)
    first = journal.claim(limit=3)
    assert [(r.seq, r.attempts) for r in first] == [(1, 1), (2, 1), (3, 1)]
    assert [r.seq for r in journal.claim(after_seq=3)] == [4, 5]
    clock.advance(seconds=1)
    assert journal.ack([1, 3]) == 2 and journal.ack([3]) == 0
    again = journal.claim()
    assert [(r.seq, r.attempts) for r in again] == [(2, 2), (4, 2), (5, 2)]
    state = journal.outbox_state()
    assert (state.backlog, state.oldest_queued_seq, state.last_seq) == (3, 2, 5)
    assert (state.last_ack_seq, state.last_ack_at) == (3, "2026-11-29T04:00:01.000Z")
    journal.ack([2])  # an older ack never moves last_ack back
    assert journal.outbox_state().last_ack_seq == 3


def test_a_first_claim_rewrites_no_row_and_only_claims_again_count(journal):
    for n in range(4):
        pay(journal, n, (State.PAID, {}))
    journal.claim(limit=8)

    def stored():
        return dict(journal.db.execute_sql("SELECT seq, attempts FROM outbox").fetchall())

    assert stored() == {seq: 0 for seq in range(1, 9)}  # no page written twice by a plain drain
    assert [r.attempts for r in journal.claim(after_seq=6)] == [2, 2]
    pay(journal, 9, (State.PAID, {}))  # seqs 9, 10: never claimed
    assert [(r.seq, r.attempts) for r in journal.claim(after_seq=6)] == [(7, 3), (8, 3), (9, 1), (10, 1)]
    assert stored() == {**{seq: 0 for seq in range(1, 7)}, 7: 2, 8: 2, 9: 0, 10: 0}


def test_prune_takes_only_rows_acknowledged_long_enough_ago_and_seq_is_never_reused(journal, clock):
    for n in range(4):
        pay(journal, n)
    journal.ack([1, 2])
    clock.advance(days=10)
    journal.ack([3])
    assert journal.prune(keep_days=30) == 0
    clock.advance(days=25)  # rows 1-2 sent 35 days ago, row 3 25 days ago, row 4 still queued (35 days old)
    assert journal.prune(keep_days=30) == 2
    assert [r.seq for r in journal.claim()] == [4]
    journal.ack([3, 4])
    clock.advance(days=31)
    assert journal.prune(keep_days=30) == 2 and journal.events() == []
    pay(journal, 9)
    assert [r.seq for r in journal.claim()] == [5]


def test_seqs_stay_unique_and_gapless_under_concurrent_writers(tmp_path):
    journals = [Journal(tmp_path, "S0001", "L01") for _ in range(4)]

    def work(i):
        for n in range(10):
            pay(journals[i], i * 100 + n, (State.PAID, {}))
        journals[i].lane_event("fault", {"source": "scanner", "reason": f"t{i}"})
        journals[i].close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    j = Journal(tmp_path, "S0001", "L01")
    assert [json.loads(r.payload)["seq"] for r in j.claim(limit=1000)] == list(range(1, 85))
    j.close()


DAY_CASES = [  # (moves, payment_type, funding) -> the totals row's numbers
    ([(State.PAID, {"funding_source": "CFT"})], "wechat", dict(count=1, amount_fen=1000, declined=0, cancelled=0,
                                                              cancelled_amount_fen=0, open=0)),
    ([(State.DECLINED, {})], "wechat", dict(count=0, amount_fen=0, declined=1, cancelled=0, cancelled_amount_fen=0,
                                            open=0)),
    ([(State.UNKNOWN, {}), (State.REVERSED, {})], "alipay", dict(count=0, amount_fen=0, declined=1, cancelled=0,
                                                                 cancelled_amount_fen=0, open=0)),
    ([(State.PAID, {}), (State.CANCEL_REQUESTED, {})], "alipay", dict(count=1, amount_fen=1000, declined=0,
                                                                     cancelled=0, cancelled_amount_fen=0, open=0)),
    ([(State.PAID, {}), (State.CANCEL_REQUESTED, {}), (State.REFUNDED, {})], "alipay",
     dict(count=0, amount_fen=0, declined=0, cancelled=1, cancelled_amount_fen=1000, open=0)),
    ([(State.UNKNOWN, {})], "wechat", dict(count=0, amount_fen=0, declined=0, cancelled=0, cancelled_amount_fen=0,
                                          open=1)),
]


@pytest.mark.parametrize("moves, payment_type, expected", DAY_CASES)
def test_daily_totals_count_each_payment_by_its_current_state(journal, moves, payment_type, expected):
    pay(journal, 1, *moves, payment_type=payment_type)
    [row] = journal.daily("2026-11-29")["totals"]
    assert {k: row[k] for k in expected} == expected and row["payment_type"] == payment_type


def test_daily_groups_by_type_and_funding_source_and_counts_only_its_own_day(journal, clock):
    pay(journal, 1, (State.PAID, {"funding_source": "CFT"}), amount=100)
    pay(journal, 2, (State.PAID, {"funding_source": "CFT"}), amount=250)
    pay(journal, 3, (State.PAID, {}), amount=7)
    pay(journal, 4, (State.PAID, {}), amount=5, payment_type="alipay")
    clock.advance(days=1)
    pay(journal, 5, (State.PAID, {"funding_source": "CFT"}), amount=9999)
    daily = journal.daily("2026-11-29")
    assert [(r["payment_type"], r["funding_source"], r["count"], r["amount"]) for r in daily["totals"]] == [
        ("alipay", None, 1, "0.05"), ("wechat", None, 1, "0.07"), ("wechat", "CFT", 2, "3.50")]
    assert daily["as_of_seq"] == 10 and daily["closed"] is False and daily["business_date"] == "2026-11-29"


def test_the_business_date_follows_the_store_zone_and_cutoff(tmp_path, clock):
    clock.at = datetime(2026, 11, 29, 17, 30, tzinfo=timezone.utc)  # 01:30 on the 30th in Shanghai
    j = Journal(tmp_path, "S0001", "L01", clock=clock, day_cutoff_hour=2)
    assert pay(j, 1).business_date == "2026-11-29" and j.business_date_now() == "2026-11-29"
    j.close()


def test_each_past_day_is_closed_once_and_today_never(journal, clock):
    pay(journal, 1, (State.PAID, {}))
    clock.advance(days=1)
    pay(journal, 2, (State.DECLINED, {}))
    clock.advance(days=2)  # the 1st: nothing on the 30th... closes only days with payments
    assert journal.close_days(before="2026-11-30") == ["2026-11-29"]
    assert journal.close_days(before="2026-12-02") == ["2026-11-30"]
    assert journal.close_days(before="2026-12-02") == []
    closes = [r for r in journal.claim(limit=100) if r.kind == "day_close"]
    assert [(r.topic, json.loads(r.payload)["business_date"]) for r in closes] == [
        ("daily", "2026-11-29"), ("daily", "2026-11-30")]
    first = json.loads(closes[0].payload)
    assert first["closed"] is True and first["seq"] == closes[0].seq and first["totals"][0]["count"] == 1


def test_new_payments_are_refused_when_the_state_dir_nears_full_and_nothing_changes(tmp_path, clock):
    j = Journal(tmp_path, "S0001", "L01", clock=clock)
    t = pay(j, 1)
    j.close()
    j = Journal(tmp_path, "S0001", "L01", clock=clock, min_free_bytes=2**62)
    before = journal_snapshot(j)
    with pytest.raises(JournalFull, match="nearly full"):
        pay(j, 2)
    assert journal_snapshot(j) == before
    j.transition(t.txn_id, State.PAID, "SUCCESS")  # payments already taken still end
    j.close()


# --- migration of a journal written by the released schema 2 -------------------------------------


@pytest.fixture
def v2_dir(tmp_path):
    return Path(shutil.copytree(V2_JOURNAL, tmp_path / "state"))


def _v2_rows(state_dir):
    conn = sqlite3.connect(state_dir / Journal.FILENAME)
    try:
        payments = conn.execute('SELECT * FROM payment ORDER BY id').fetchall()
        events = conn.execute("SELECT event_id, payload FROM outbox ORDER BY id").fetchall()
        return payments, events, conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_a_released_schema_2_journal_migrates_without_loss(v2_dir):
    payments, events, version = _v2_rows(v2_dir)
    assert version == 2 and len(payments) == 8 and len(events) == 22
    ro = Journal(v2_dir, "S0001", "L01", readonly=True)  # a reader sees it as it is and changes nothing
    assert len(ro.events()) == 22 and len(ro.recent()) == 8
    with pytest.raises(JournalError, match="schema 2"):
        ro.outbox_state()
    ro.close()
    assert _v2_rows(v2_dir)[2] == 2

    j = Journal(v2_dir, "S0001", "L01")
    new_payments = sqlite3.connect(v2_dir / Journal.FILENAME).execute("SELECT * FROM payment ORDER BY id").fetchall()
    assert [row[:-1] for row in new_payments] == payments  # every column kept, business_date added last
    assert [row[-1] for row in new_payments] == ["2026-11-27"] * 5 + ["2026-11-28"] * 3  # Shanghai midnight
    rows = j.claim(limit=100)
    assert [r.seq for r in rows] == list(range(1, 23)) and [r.event_id for r in rows] == [e for e, _ in events]
    for r, (_, old_text) in zip(rows, events):
        old, new = json.loads(old_text), json.loads(r.payload)
        assert {k: v for k, v in old.items() if k != "type"}.items() <= new.items()
        assert (new["kind"], new["version"], new["seq"], new["currency"]) == ("txn", 2, r.seq, "CNY")
        assert new["business_date"] == new_payments[new["txn_id"] - 1][-1]
    a5 = [json.loads(r.payload) for r in rows if json.loads(r.payload)["order"] == "A5"]
    assert [e["txn_kind"] for e in a5] == ["pay", "pay", "cancel", "refund"]
    assert j.by_order("A7")[0].auth_code == "134567890123450007"  # deferred: still forwardable
    assert j.outbox_state().last_seq == 22
    t = j.open_payment(order="B1", amount_fen=100, payment_type="wechat", platform="sandbox",
                       code="134567890123459999")
    assert j.events(t.txn_id)[0]["seq"] == 23
    assert [(r["payment_type"], r["funding_source"], r["count"], r["declined"], r["cancelled"])
            for r in j.daily("2026-11-27")["totals"]] == [
        ("alipay", "ALIPAYACCOUNT", 1, 0, 0), ("wechat", None, 0, 1, 1), ("wechat", "CFT", 1, 0, 0),
        ("wechat", "CMB_DEBIT", 0, 0, 1)]
    j.close()
    conn = sqlite3.connect(v2_dir / Journal.FILENAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {r[1] for r in conn.execute("PRAGMA index_list(outbox)")} >= {"outbox_event_id", "outbox_seq",
                                                                          "outbox_queued"}
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'outbox_v2'").fetchone()[0] == 0
    conn.close()

"""The journal's hot path in plain SQL (schema 4): the statements name the tables' columns, the
queries find their indexes, cached statements outlive a schema change, a failed commit leaves neither the payment nor its outbox row, and the counters that are no longer
written (day numbers, outbox seqs) still never repeat."""

import dataclasses
import shutil
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from appliance import failpoints
from appliance import journal as jmod
from appliance.journal import SCHEMA_VERSION, Journal, State, Txn

V2_JOURNAL = Path(__file__).parent / "data" / "journal_v2"
AT = datetime(2026, 11, 29, 4, 0, tzinfo=timezone.utc)


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path, "S0001", "L01", clock=lambda: AT)
    yield j
    j.close()


def _pay(journal, n: int, *moves):
    t = journal.open_payment(order=f"O{n}", amount_fen=100 + n, payment_type="wechat", platform="sandbox",
                             code=f"1345678901234{n:05d}")
    for to in moves:
        t = journal.transition(t.txn_id, to, "test", platform_txn_id=f"42{n}" if to is State.PAID else None)
    return t


def _conn(journal) -> sqlite3.Connection:
    return sqlite3.connect(journal.path)


def _columns(conn, table) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _inserted(sql: str) -> list[str]:
    return [c.strip().strip('"') for c in sql.split("(", 1)[1].split(")", 1)[0].split(",")]


def test_the_raw_statements_name_exactly_the_columns_created(journal):
    conn = _conn(journal)
    payment, outbox = _columns(conn, "payment"), _columns(conn, "outbox")
    assert [c.strip('"') for c in jmod._TXN_COLUMNS][1:] == [f.name for f in dataclasses.fields(Txn)][1:]
    assert jmod._TXN_COLUMNS[0] == "id" and sorted(c.strip('"') for c in jmod._TXN_COLUMNS) == sorted(
        set(payment) - {"code_digest"})  # the digest is never read back into a Txn
    assert sorted(_inserted(jmod._INSERT_PAYMENT)) == sorted(set(payment) - {"id"})
    assert sorted(_inserted(jmod._INSERT_OUTBOX)) == sorted(set(outbox) - {"id"})
    conn.close()


def test_a_raw_payment_reads_back_by_column_name_as_written(journal):
    t = _pay(journal, 1, State.PAID)
    conn = _conn(journal)
    conn.row_factory = sqlite3.Row  # each value by its column's name, not by the statements' order
    row = conn.execute("SELECT * FROM payment WHERE id = ?", (t.txn_id,)).fetchone()
    assert (row["out_trade_no"], row["order"], row["amount_fen"], row["state"], row["platform_txn_id"],
            row["business_date"], row["attempts"], row["next_attempt_at"], row["retry_note"], row["source"],
            row["auth_code"]) == (t.out_trade_no, "O1", 101, "paid", "421", "2026-11-29", 0, 0.0, "", "scan", None)
    assert journal.get(t.txn_id) == t and journal.recent() == [t] and journal.by_order("O1") == [t]
    event = conn.execute("SELECT * FROM outbox WHERE seq = 2").fetchone()
    assert (event["txn_id"], event["kind"], event["topic"], event["status"], event["attempts"], event["sent_at"]) == (
        t.txn_id, "txn", "txn", "queued", 0, None)
    conn.close()


@pytest.mark.parametrize("query, params, index", [
    (jmod._TAKEN_ORDER, ("O1",), "payment_live_order"),
    (jmod._CODE_USED, ("x",), "payment_code_once"),
    (jmod._DAY_LAST_NUMBER, ("a", "b"), "payment_out_trade_no"),
    (f"SELECT id FROM payment WHERE state IN {jmod._OPEN_IN} ORDER BY id", (), "payment_open"),
    ("SELECT count(*) FROM payment WHERE state IN " + jmod._OPEN_IN + " AND state = ?", ("deferred",),
     "payment_open"),
    ("SELECT id FROM outbox WHERE status = 'sent' AND sent_at < ?", ("x",), "outbox_sent"),
    (jmod._LAST_SEQ, (), "outbox_seq"),
    (f"SELECT state, count(*) FROM payment WHERE state IN {jmod._OPEN_IN} GROUP BY state", (), "payment_open"),
])
def test_each_hot_query_finds_its_index(journal, query, params, index):
    conn = _conn(journal)
    plan = " ".join(r[-1] for r in conn.execute(f"EXPLAIN QUERY PLAN {query}", params))
    conn.close()
    assert f"INDEX {index}" in plan, plan


def test_a_payment_writes_no_index_it_does_not_need(journal):
    conn = _conn(journal)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert not names & set(jmod._DROPPED_INDEXES)
    assert {"payment_open", "outbox_sent", "payment_code_once", "payment_live_order", "outbox_queued"} <= names


def test_cached_statements_outlive_a_migration_by_another_process(tmp_path):
    shutil.copytree(V2_JOURNAL, tmp_path, dirs_exist_ok=True)
    reader = Journal(tmp_path, "S0001", "L01", readonly=True)
    before = reader.recent()  # the reader's statements are compiled against schema 2
    assert reader.schema == 2 and len(before) == 8 and reader.get(before[0].txn_id) == before[0]
    writer = Journal(tmp_path, "S0001", "L01")  # migrates to SCHEMA_VERSION under the reader
    new = writer.open_payment(order="B1", amount_fen=100, payment_type="wechat", platform="sandbox",
                              code="134567890123459999")
    after = reader.recent()
    assert after[0] == dataclasses.replace(new, business_date=None)  # the reader's view of schema 2
    assert after[1:] == before and reader.get(new.txn_id).out_trade_no == new.out_trade_no
    conn = sqlite3.connect(tmp_path / Journal.FILENAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    # and a writer's own cached statements survive another connection changing the schema
    conn = sqlite3.connect(tmp_path / Journal.FILENAME)
    conn.execute("CREATE INDEX extra ON payment (platform)")
    conn.close()
    moved = writer.transition(new.txn_id, State.PAID, "SUCCESS")
    assert writer.get(new.txn_id) == moved and moved.state is State.PAID
    reader.close()
    writer.close()


@pytest.mark.parametrize("point", ["journal.open.before_commit", "journal.to_paid.before_commit"])
def test_a_failed_commit_leaves_neither_the_payment_change_nor_its_outbox_row(journal, point):
    _pay(journal, 1, State.PAID)
    pending = _pay(journal, 2)
    before = _snapshot(journal)

    def fail(name):
        if name == point:
            raise OSError("the commit failed")
    failpoints.set_hook(fail)
    try:
        with pytest.raises(OSError, match="the commit failed"):
            if point == "journal.open.before_commit":
                _pay(journal, 3)
            else:
                journal.transition(pending.txn_id, State.PAID, "SUCCESS")
    finally:
        failpoints.set_hook(None)
    assert _snapshot(journal) == before and not journal.db.connection().in_transaction
    assert journal.get(pending.txn_id).state is State.PENDING
    again = _pay(journal, 3, State.PAID)  # the journal goes on; no seq was lost or given twice
    assert [e["seq"] for e in journal.events()] == [1, 2, 3, 4, 5] and again.out_trade_no.endswith("000003")


def _snapshot(journal):
    conn = _conn(journal)
    try:
        return (conn.execute("SELECT * FROM payment ORDER BY id").fetchall(),
                conn.execute("SELECT * FROM outbox ORDER BY id").fetchall(),
                conn.execute("SELECT * FROM meta ORDER BY key").fetchall())
    finally:
        conn.close()


def test_outbox_seqs_continue_after_pruning_emptied_the_outbox(tmp_path):
    now = [AT]
    j = Journal(tmp_path, "S0001", "L01", clock=lambda: now[0])
    for n in range(3):
        _pay(j, n, State.PAID)
    assert j.ack(range(1, 7)) == 6
    now[0] = AT.replace(day=30)
    assert j.prune(keep_days=0.5) == 6 and j.outbox_state().backlog == 0
    assert j.outbox_state().last_seq == 6 and j.daily("2026-11-29")["as_of_seq"] == 6
    j.close()
    j = Journal(tmp_path, "S0001", "L01", clock=lambda: now[0])
    assert j.lane_event("started", {}).seq == 7 and _pay(j, 9).txn_id == 4
    assert [e["seq"] for e in j.events()] == [7, 8]
    j.close()


def test_out_trade_no_numbers_continue_from_a_day_counted_before_schema_4(journal):
    first = _pay(journal, 1)
    conn = _conn(journal)
    with conn:  # as a schema-3 journal left it: the day's counter ahead of its payments' numbers
        conn.execute("INSERT INTO day_sequence (day, last) VALUES ('20261129', 41)")
    conn.close()
    second, third = _pay(journal, 2), _pay(journal, 3)
    assert [t.out_trade_no[-6:] for t in (first, second, third)] == ["000001", "000042", "000043"]


def test_open_counts_are_the_open_part_of_counts(journal):
    _pay(journal, 1, State.PAID)
    _pay(journal, 2, State.UNKNOWN)
    _pay(journal, 3)
    _pay(journal, 4, State.DECLINED)
    assert journal.counts() == {"paid": 1, "unknown": 1, "pending": 1, "declined": 1}
    assert journal.open_counts() == {"unknown": 1, "pending": 1}


def test_a_thread_that_defers_checkpoints_gets_them_when_due_and_at_the_latest_limit(journal):
    size = journal.path.stat().st_size  # journal.sqlite itself changes only when a checkpoint copies into it
    journal.checkpoint_if_due()  # a thread that does not defer: nothing to do
    journal.defer_checkpoints()
    for n in range(jmod.CHECKPOINT_EVERY_COMMITS // 2 - 1):  # two commits each
        _pay(journal, n, State.PAID)
    journal.checkpoint_if_due()
    assert journal.path.stat().st_size == size  # not due yet
    _pay(journal, 100, State.PAID)
    journal.checkpoint_if_due()
    assert journal.path.stat().st_size > size
    size = journal.path.stat().st_size
    for n in range(200, 200 + jmod.CHECKPOINT_AT_LATEST_COMMITS // 2 - 1):  # ~2,000 WAL pages: SQLite's own
        _pay(journal, n, State.PAID)                                       # would have checkpointed at 1,000
    assert journal.path.stat().st_size == size
    _pay(journal, 999, State.PAID)  # its second commit is the latest one allowed
    assert journal.path.stat().st_size > size


def _counters(path):
    conn = sqlite3.connect(path / Journal.FILENAME)
    try:
        seq = conn.execute("SELECT value FROM meta WHERE key = 'outbox_seq'").fetchone()
        return (int(seq[0]) if seq else None, dict(conn.execute("SELECT day, last FROM day_sequence")),
                conn.execute("SELECT max(seq) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def test_the_counters_older_versions_number_from_are_brought_up_to_date_at_open_and_close(tmp_path):
    """An older version put back on the lane reads meta's outbox_seq and the day's day_sequence for
    its next numbers: they must not be behind what the tables hold, or it would refuse everything."""
    j = Journal(tmp_path, "S0001", "L01", clock=lambda: AT)
    _pay(j, 1, State.PAID)
    _pay(j, 2)
    j.lane_event("started", {})
    assert _counters(tmp_path) == (None, {}, 4)  # nothing written per payment
    j.close()
    assert _counters(tmp_path) == (4, {"20261129": 2}, 4)
    j = Journal(tmp_path, "S0001", "L01", clock=lambda: AT)
    _pay(j, 3)  # and the process dies: no close
    assert _counters(tmp_path) == (4, {"20261129": 2}, 5)
    again = Journal(tmp_path, "S0001", "L01", clock=lambda: AT)  # the next start
    assert _counters(tmp_path) == (5, {"20261129": 3}, 5)
    again.close()
    j.close()
    ro = Journal(tmp_path, "S0001", "L01", readonly=True)
    ro.close()  # a reader writes nothing
    assert _counters(tmp_path) == (5, {"20261129": 3}, 5)


def test_only_the_thread_that_opened_the_journal_syncs_the_counters_when_it_closes(tmp_path):
    j = Journal(tmp_path, "S0001", "L01", clock=lambda: AT)
    t = _pay(j, 1)

    def request():  # as the control socket's handler threads do: read, then close their connection
        assert j.get(t.txn_id) == t
        j.close()
    worker = threading.Thread(target=request)
    worker.start()
    worker.join()
    assert _counters(tmp_path) == (None, {}, 1)  # no write for a request's close
    j.close()
    assert _counters(tmp_path) == (1, {"20261129": 1}, 1)

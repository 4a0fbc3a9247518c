"""appliance.hq.store: idempotent writes on SQLite and on PostgreSQL, the rules of `lane` and `daily`,
bounded rejects, and database errors translated."""

from __future__ import annotations

import sys

import pytest

from appliance.errors import ConfigError
from appliance.hq.store import EXCERPT_CHARS, Store, StoreError, StoreUnavailable, excerpt, redacted
from test_schemas import DAILY, EID, LANE, STATUS, TXN, WILL, changed

AT = "2026-12-01T05:00:00.000Z"


@pytest.fixture
def store(hq_db_url):
    s = Store(hq_db_url)
    yield s
    s.close()


def test_an_event_is_stored_once_by_its_event_id(store):
    with store.atomic():
        store.add_event(TXN, AT)
        store.add_event(changed(TXN, seq=99, state="declined"), AT)  # a redelivery cannot change it
    with store.atomic():
        store.add_event(TXN, AT)
    rows = list(store.Event.select())
    assert len(rows) == 1 and (rows[0].seq, rows[0].state, rows[0].amount_fen) == (7, "paid", 1250)
    assert (rows[0].out_trade_no, rows[0].funding_source, rows[0].txn_kind) == (TXN["out_trade_no"], "CMB_DEBIT",
                                                                                 "pay")


def test_a_recreated_journal_may_repeat_a_seq_with_new_event_ids(store):
    store.add_event(TXN, AT)
    store.add_event(changed(TXN, event_id="f" * 32, out_trade_no="S0001_L01_20261201100000000001"), AT)
    store.add_event(changed(LANE, event_id="e" * 32, seq=7), AT)
    E = store.Event
    assert E.select().where(E.seq == 7).count() == 3
    assert sorted(r.kind for r in E.select()) == ["lane", "txn", "txn"]
    assert store.Event.get(E.kind == "lane").state == "fault"  # a lane event keeps its name in `state`


def test_a_lane_keeps_its_last_status_even_when_the_will_is_older(store):
    store.set_status(changed(STATUS, backlog=4, at="2026-12-01T05:00:00.000Z"), AT)
    store.set_status(changed(WILL, at="2026-12-01T04:00:00.000Z"), AT)  # the Will: the connect time
    lane = store.Lane.get()
    assert (lane.state, lane.at, lane.backlog) == ("offline", "2026-12-01T04:00:00.000Z", None)
    store.set_status(changed(STATUS, terminal_id="L02"), AT)
    assert store.Lane.select().count() == 2


@pytest.mark.parametrize("kept, then, expect_seq", [
    (changed(DAILY, as_of_seq=5), changed(DAILY, as_of_seq=9), 9),       # newer totals replace
    (changed(DAILY, as_of_seq=9), changed(DAILY, as_of_seq=5), 9),       # older ones (late redelivery) do not
    (changed(DAILY, as_of_seq=9, at="2026-12-01T05:00:00.000Z"),
     changed(DAILY, as_of_seq=9, at="2026-12-01T05:00:01.000Z"), 9),
    (changed(DAILY, as_of_seq=5), changed(DAILY, as_of_seq=5, closed=True, event_id=EID, seq=6), 5),
    (changed(DAILY, as_of_seq=5, closed=True, event_id=EID, seq=6), changed(DAILY, as_of_seq=8), 5),  # closed stays
])
def test_a_lanes_day_totals_are_replaced_only_by_newer_ones(store, kept, then, expect_seq):
    store.set_daily(kept, AT)
    store.set_daily(then, AT)
    row = store.Daily.get()
    newest = then if (then["closed"], then["as_of_seq"], then["at"]) >= (kept["closed"], kept["as_of_seq"],
                                                                          kept["at"]) else kept
    assert (row.as_of_seq, row.closed, row.at) == (expect_seq, newest["closed"], newest["at"])
    assert store.Daily.select().count() == 1


def test_a_reject_keeps_a_bounded_masked_excerpt(store):
    code = "134567890123456789"
    store.add_reject("lanes/S0001/L01/txn", "$.code_masked: too long", f'{{"code_masked":"{code}"}}'.encode()
                     + b"x" * 10_000, AT)
    store.add_reject("lanes/S0001/L01/txn", "$: not UTF-8", b"\xff\xfe" * 50, AT)
    first, second = store.Reject.select().order_by(store.Reject.id)
    assert code not in first.payload and "1345" in first.payload and len(first.payload) <= EXCERPT_CHARS
    assert first.reason == "$.code_masked: too long" and first.topic == "lanes/S0001/L01/txn"
    assert "\ufffd" in second.payload


def test_excerpt_is_bounded_whatever_the_bytes():
    assert len(excerpt("汉".encode() * 10_000)) <= EXCERPT_CHARS
    assert excerpt(b'{"a":1}') == '{"a":1}'


def test_tables_are_created_once_and_reopened(hq_db_url):
    Store(hq_db_url).close()
    s = Store(hq_db_url)  # again: nothing to create, nothing lost
    s.add_event(TXN, AT)
    s.close()
    s = Store(hq_db_url, create=False)
    assert s.Event.select().count() == 1
    s.close()


def test_a_database_that_cannot_be_reached_is_unavailable_without_its_password():
    s = Store("postgresql://postgres:s3cret@127.0.0.1:1/nowhere", create=False)
    with pytest.raises(StoreUnavailable) as e, s.guard():
        s.Event.select().count()
    assert "s3cret" not in str(e.value) and "postgres:***@127.0.0.1:1/nowhere" in str(e.value)
    assert e.value.retryable and isinstance(e.value, StoreError)


def test_a_refused_statement_is_a_store_error(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'hq.sqlite'}")
    with pytest.raises(StoreError) as e, s.guard():
        s.db.execute_sql("INSERT INTO event (event_id) VALUES (NULL)")
    assert not isinstance(e.value, StoreUnavailable) and "IntegrityError" in str(e.value)


@pytest.mark.parametrize("url, reason", [
    ("mysql://root@127.0.0.1/hq", "must be a sqlite:///path or postgresql://"),
    ("hq.sqlite", "must be a sqlite:///path or postgresql://"),
    ("sqlite:///", "a sqlite URL needs a path"),
])
def test_a_url_it_cannot_use_is_a_config_error(url, reason):
    with pytest.raises(ConfigError, match=reason) as e:
        Store(url)
    assert e.value.key == "hq.db"


def test_postgresql_without_the_hq_extra_is_a_config_error(monkeypatch):
    """The lane's image installs no psycopg2 (image/requirements.lock): say which extra brings it."""
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # import psycopg2 raises ImportError, as where it is absent
    with pytest.raises(ConfigError, match=r"lane-appliance\[hq\]") as e:
        Store("postgresql://hq:s3cret@127.0.0.1:1/hq")
    assert e.value.key == "hq.db" and "s3cret" not in str(e.value)


def test_a_reader_does_not_create_a_missing_sqlite_file(tmp_path):
    with pytest.raises(ConfigError, match="no head-office database at"):
        Store(f"sqlite:///{tmp_path / 'typo.sqlite'}", create=False)
    assert not (tmp_path / "typo.sqlite").exists()


def test_redacted_hides_only_the_password():
    assert redacted("postgresql://hq:pw@db:5432/hq") == "postgresql://hq:***@db:5432/hq"
    assert redacted("sqlite:////var/lib/hq.sqlite") == "sqlite:////var/lib/hq.sqlite"

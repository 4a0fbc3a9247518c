import dataclasses
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from appliance.errors import IllegalTransition, JournalLost, Refused
from appliance.journal import OPEN_STATES, SCHEMA_VERSION, TRANSITIONS, Journal, State, Txn

CODE = "134567890123456789"


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path, "S0001", "L01")
    yield j
    j.close()


def _open(journal, order=None, code=CODE, amount=1234):
    return journal.open_payment(order=order or f"O{code[-6:]}", amount_fen=amount, payment_type="wechat", platform="sandbox", code=code)


def test_sqlite_is_wal_with_full_sync(journal):
    assert journal.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert journal.db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_out_trade_no_is_unique_valid_for_both_platforms_and_sequenced(journal):
    nos = [_open(journal, order=f"A{i}", code=f"13456789012345{i:04d}").out_trade_no for i in range(25)]
    assert len(set(nos)) == 25
    for no in nos:
        assert re.fullmatch(r"[A-Za-z0-9_]{6,32}", no)  # WeChat: <=32 [A-Za-z0-9_-|*]; Alipay: <=64 [A-Za-z0-9_]
    assert nos[0].startswith("S0001_L01_") and nos[0].endswith("000001") and nos[-1].endswith("000025")


def test_sequence_restarts_each_day_but_numbers_stay_unique(tmp_path):
    day = [datetime(2026, 11, 26, 23, 59, tzinfo=timezone.utc)]
    j = Journal(tmp_path, "S0001", "L01", clock=lambda: day[0])
    a = _open(j, code="134567890123450001")
    day[0] += timedelta(minutes=2)
    b = _open(j, code="134567890123450002")
    assert "20261126" in a.out_trade_no and a.out_trade_no.endswith("000001")
    assert "20261127" in b.out_trade_no and b.out_trade_no.endswith("000001")
    j.close()


def test_longest_ids_fit_wechat_limit(tmp_path):
    j = Journal(tmp_path, "ABCDEFGH", "WXYZ")
    assert len(_open(j).out_trade_no) <= 32
    j.close()


def test_recreated_journal_gets_a_new_epoch(tmp_path):
    a = Journal(tmp_path / "a", "S0001", "L01")
    b = Journal(tmp_path / "b", "S0001", "L01")
    # Two fresh journals (an SD card replaced) must not reuse a day's numbers; the epoch differs
    # with probability 1 - 1/36^3.
    na, nb = _open(a).out_trade_no, _open(b).out_trade_no
    assert na != nb
    a.close()
    b.close()


ALL = list(State)


@pytest.mark.parametrize("start", [s for s in ALL])
@pytest.mark.parametrize("to", ALL)
def test_transition_table_is_enforced(journal, start, to):
    txn = _open(journal)
    path = {State.PENDING: [], State.PAID: [State.PAID], State.DECLINED: [State.DECLINED],
            State.UNKNOWN: [State.UNKNOWN], State.REVERSED: [State.UNKNOWN, State.REVERSED],
            State.DEFERRED: [State.DEFERRED], State.CANCEL_REQUESTED: [State.PAID, State.CANCEL_REQUESTED],
            State.CANCELLED: [State.PAID, State.CANCEL_REQUESTED, State.CANCELLED],
            State.REFUNDED: [State.PAID, State.CANCEL_REQUESTED, State.REFUNDED]}[start]
    for s in path:
        journal.transition(txn.txn_id, s, auth_code=CODE if s is State.DEFERRED else None)
    before = len(journal.events())
    kwargs = {"auth_code": CODE} if to is State.DEFERRED else {}
    if to in TRANSITIONS[start]:
        assert journal.transition(txn.txn_id, to, "why", **kwargs).state == to
        assert len(journal.events()) == before + 1
    else:
        with pytest.raises(IllegalTransition):
            journal.transition(txn.txn_id, to, "why", **kwargs)
        assert len(journal.events()) == before
        assert journal.get(txn.txn_id).state == start


def test_each_transition_writes_one_outbox_event_with_the_state(journal):
    txn = _open(journal)
    journal.transition(txn.txn_id, State.UNKNOWN, "USERPAYING")
    journal.transition(txn.txn_id, State.PAID, "SUCCESS", platform_txn_id="42")
    events = journal.events(txn.txn_id)
    assert [(e["previous_state"], e["state"]) for e in events] == [(None, "pending"), ("pending", "unknown"),
                                                                   ("unknown", "paid")]
    assert len({e["event_id"] for e in events}) == 3
    assert events[-1]["platform_txn_id"] == "42" and events[-1]["amount"] == "12.34"
    assert all(CODE not in str(e) for e in events)


def test_full_code_is_kept_only_while_deferred(journal):
    txn = _open(journal)
    with pytest.raises(IllegalTransition):
        journal.transition(txn.txn_id, State.DEFERRED)  # deferring needs the code
    journal.transition(txn.txn_id, State.DEFERRED, auth_code=CODE)
    assert journal.get(txn.txn_id).auth_code == CODE
    journal.transition(txn.txn_id, State.PENDING, "forwarded")
    assert journal.get(txn.txn_id).auth_code is None
    raw = sqlite3.connect(journal.path).execute("SELECT group_concat(auth_code) FROM payment").fetchone()[0]
    assert raw is None


def test_full_code_never_in_the_file_for_a_normal_payment(journal):
    txn = _open(journal)
    journal.transition(txn.txn_id, State.PAID)
    journal.close()
    for name in ("journal.sqlite", "journal.sqlite-wal"):
        p = journal.path.parent / name
        if p.exists():
            assert CODE.encode() not in p.read_bytes()


def _files_holding(state_dir, code: str) -> list[str]:
    """The journal files (database, WAL, shared memory) whose bytes contain the code."""
    return sorted(p.name for p in state_dir.glob("journal.sqlite*") if code.encode() in p.read_bytes())


def _defer_then(journal, to: State, retries: int = 3):
    """A payment accepted offline, retried a few times (each retry rewrites its row), then moved on."""
    txn = _open(journal)
    journal.transition(txn.txn_id, State.DEFERRED, auth_code=CODE)
    for _ in range(retries):
        journal.schedule(txn.txn_id, 0.0, "still offline")
    return journal.transition(txn.txn_id, to, "done")


@pytest.mark.parametrize("to", [State.PENDING, State.DECLINED, State.CANCELLED])
def test_an_erased_code_is_in_no_journal_file_while_other_connections_are_open(journal, to):
    other = Journal(journal.state_dir, "S0001", "L01")  # another writer, idle
    reader = Journal(journal.state_dir, "S0001", "L01", readonly=True)
    assert reader.recent() == []  # its connection is open
    raw = sqlite3.connect(journal.path)  # and an idle raw connection
    raw.execute("SELECT COUNT(*) FROM payment").fetchone()
    _defer_then(journal, to)
    assert _files_holding(journal.state_dir, CODE) == []
    assert (journal.state_dir / "journal.sqlite-wal").stat().st_size == 0  # truncated, not just reset
    raw.close()
    reader.close()
    other.close()


def test_a_scrub_kept_from_finishing_by_a_reader_is_done_at_the_next_chance(journal):
    reader = sqlite3.connect(journal.path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM payment").fetchone()  # holds a snapshot older than the erasure
    _defer_then(journal, State.DECLINED)
    assert _files_holding(journal.state_dir, CODE) == ["journal.sqlite-wal"]  # what the scrub is for
    assert journal.scrub() is False
    reader.execute("COMMIT")
    assert journal.scrub() is True
    assert _files_holding(journal.state_dir, CODE) == []
    reader.close()


def test_a_process_killed_between_an_erasure_and_its_scrub_is_scrubbed_at_the_next_open(tmp_path):
    """Crash point 6 is `journal.to_declined.after_commit`: the code is erased from the table, not yet
    from the WAL. The next writer to open the journal scrubs it."""
    script = ("import sys; from pathlib import Path; from appliance.journal import Journal, State\n"
              "j = Journal(Path(sys.argv[1]), 'S0001', 'L01')\n"
              "t = j.open_payment(order='A1', amount_fen=1, payment_type='wechat', platform='sandbox', code=sys.argv[2])\n"
              "j.transition(t.txn_id, State.DEFERRED, auth_code=sys.argv[2])\n"
              "j.transition(t.txn_id, State.DECLINED, 'too old')\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path), CODE], env={**os.environ, "APPLIANCE_CRASH_AT": "6"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _files_holding(tmp_path, CODE) == ["journal.sqlite-wal"]
    j = Journal(tmp_path, "S0001", "L01")
    assert j.recent()[0].state is State.DECLINED and j.recent()[0].auth_code is None
    assert _files_holding(tmp_path, CODE) == []
    j.close()


def test_any_text_has_a_digest(journal):
    assert not journal.code_used("13\ud800456789")  # a lone surrogate, e.g. from a JSON command
    assert journal.digest("a\udfff") != journal.digest("a")


def test_code_used_by_digest(journal):
    assert not journal.code_used(CODE)
    _open(journal)
    assert journal.code_used(CODE)
    assert not journal.code_used(CODE[:-1] + "0")
    key = journal.state_dir / "code-digest.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_queries(journal):
    a = _open(journal, order="A1", code="134567890123450001")
    b = _open(journal, order="A2", code="134567890123450002")
    journal.transition(a.txn_id, State.PAID)
    assert [t.txn_id for t in journal.open_txns()] == [b.txn_id]
    assert {t.state for t in journal.open_txns()} <= OPEN_STATES
    assert [t.txn_id for t in journal.recent()] == [b.txn_id, a.txn_id]
    assert [t.txn_id for t in journal.recent(states=[State.PAID])] == [a.txn_id]
    assert [t.txn_id for t in journal.by_order("A2")] == [b.txn_id]
    journal.transition(b.txn_id, State.DEFERRED, auth_code="134567890123450002")
    assert journal.deferred_totals() == (1, 1234)


def test_schedule_counts_attempts_without_events(journal):
    txn = _open(journal)
    n = len(journal.events())
    journal.schedule(txn.txn_id, 123.0)
    t = journal.get(txn.txn_id)
    assert (t.attempts, t.next_attempt_at, len(journal.events())) == (1, 123.0, n)


def test_reopen_keeps_everything(tmp_path):
    j = Journal(tmp_path, "S0001", "L01")
    txn = _open(j)
    j.close()
    j2 = Journal(tmp_path, "S0001", "L01")
    assert j2.get(txn.txn_id) == txn and j2.code_used(CODE)
    assert _open(j2, code="134567890123450009").out_trade_no[:-6] == txn.out_trade_no[:-6]
    j2.close()


def test_two_processes_opening_a_new_journal_at_once_agree_on_the_code_key(tmp_path):
    import subprocess
    import sys

    script = ("import sys; from appliance.journal import Journal; "
              "j = Journal(sys.argv[1], 'S0001', 'L01'); print(j.digest('134567890123456789')); j.close()")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    digests = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(digests) == 1 and len(next(iter(digests))) == 40
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".code-digest")] == []


def test_unusable_state_dir_is_a_clear_error(tmp_path):
    from appliance.errors import ApplianceError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ApplianceError, match="cannot open the journal"):
        Journal(blocker / "state", "S0001", "L01")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "journal.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ApplianceError, match="cannot be read"):
        Journal(damaged, "S0001", "L01")


# --- the file under a running writer --------------------------------------------------------


def _unlink(j):
    j.path.unlink()


def _replace(j):
    other = j.path.with_name("other.sqlite")
    other.write_bytes(j.path.read_bytes())
    os.rename(other, j.path)


def _truncate(j):
    os.truncate(j.path, 0)


@pytest.mark.parametrize("damage", [_unlink, _replace, _truncate], ids=["deleted", "replaced", "emptied"])
def test_a_journal_file_changed_under_the_writer_stops_every_write(journal, damage):
    txn = _open(journal)
    damage(journal)
    with pytest.raises(JournalLost, match="no more payments"):
        _open(journal, code="134567890123450001")
    with pytest.raises(JournalLost):
        journal.transition(txn.txn_id, State.PAID)
    with pytest.raises(JournalLost):
        journal.schedule(txn.txn_id, 0.0)


# --- duplicates are refused inside the transaction that opens a payment ----------------------


def _race(tmp_path, kwargs_list):
    """Open payments from several writers (own connections, own threads) released at one instant."""
    _open(Journal(tmp_path, "S0001", "L01"), code="134567890123450000")  # create the journal first
    journals = [Journal(tmp_path, "S0001", "L01") for _ in kwargs_list]
    barrier = threading.Barrier(len(journals))
    outcomes = [None] * len(journals)

    def attempt(i):
        barrier.wait()
        try:
            outcomes[i] = journals[i].open_payment(payment_type="wechat", platform="sandbox", amount_fen=100,
                                                   **kwargs_list[i])
        except Refused as e:
            outcomes[i] = e
        finally:
            journals[i].close()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(journals))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes


@pytest.mark.parametrize("round_", range(15))
def test_same_order_two_codes_at_once_opens_one_payment(tmp_path, round_):
    outcomes = _race(tmp_path, [{"order": "O1", "code": f"1345678901234{i:05d}"} for i in range(1, 4)])
    assert sum(isinstance(o, Txn) for o in outcomes) == 1
    assert all("order O1" in str(o) for o in outcomes if isinstance(o, Refused))


@pytest.mark.parametrize("round_", range(15))
def test_same_code_two_orders_at_once_opens_one_payment(tmp_path, round_):
    outcomes = _race(tmp_path, [{"order": f"O{i}", "code": CODE} for i in range(3)])
    assert sum(isinstance(o, Txn) for o in outcomes) == 1
    assert all("already used" in str(o) for o in outcomes if isinstance(o, Refused))


def test_unique_indexes_hold_even_against_a_raw_insert(journal):
    txn = _open(journal, order="A1")
    conn = sqlite3.connect(journal.path)
    row = conn.execute("SELECT * FROM payment WHERE id=?", (txn.txn_id,)).fetchone()
    cols = [d[0] for d in conn.execute("SELECT * FROM payment").description]
    doc = dict(zip(cols, row))
    for change in ({"out_trade_no": "x1", "code_digest": "other"}, {"out_trade_no": "x2", "order": "A2"}):
        values = {**doc, **change, "id": None}
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(f"INSERT INTO payment ({','.join(repr(c) for c in cols)}) VALUES ({','.join('?' * len(cols))})",
                         [values[c] for c in cols])
    conn.rollback()
    journal.transition(txn.txn_id, State.DECLINED)
    assert _open(journal, order="A1", code="134567890123450001").state is State.PENDING  # a declined order is free
    conn.close()


# --- schema migration: a journal written before `funding_source` (schema 1, user_version 0) ---


V2_JOURNAL = Path(__file__).parent / "data" / "journal_v2"  # written by the released schema 2 (make_journal_v2.py)


def _copy_of_v2(state_dir: Path) -> Path:
    shutil.copytree(V2_JOURNAL, state_dir, dirs_exist_ok=True)
    return state_dir


def _schema_1_journal(state_dir) -> list[Txn]:
    """A journal as the code before schema 2 wrote it: no funding_source column, user_version 0.
    Made from the schema-2 journal by taking the column out again."""
    conn = sqlite3.connect(_copy_of_v2(state_dir) / Journal.FILENAME, isolation_level=None)
    conn.execute("ALTER TABLE payment DROP COLUMN funding_source")
    conn.execute("PRAGMA user_version = 0")
    conn.close()
    ro = Journal(state_dir, "S0001", "L01", readonly=True)
    txns = ro.recent()
    ro.close()
    return txns


def _columns(state_dir) -> tuple[int, set[str]]:
    conn = sqlite3.connect(state_dir / Journal.FILENAME)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        return version, {r[1] for r in conn.execute("PRAGMA table_info(payment)")}
    finally:
        conn.close()


def test_a_new_journal_has_the_current_schema(journal):
    version, columns = _columns(journal.state_dir)
    assert version == SCHEMA_VERSION and {"funding_source", "business_date"} <= columns


def test_a_schema_1_journal_is_read_as_it_is_and_migrated_by_a_writer_without_losing_rows(tmp_path):
    before = _schema_1_journal(tmp_path)
    assert _columns(tmp_path)[0] == 0 and "funding_source" not in _columns(tmp_path)[1]
    ro = Journal(tmp_path, "S0001", "L01", readonly=True)  # reads the old schema, changes nothing
    assert ro.recent() == before and all(t.funding_source is None for t in before)
    assert ro.events()[-1]["state"] == "reversed"
    ro.close()
    assert _columns(tmp_path)[0] == 0

    j = Journal(tmp_path, "S0001", "L01")
    assert _columns(tmp_path)[0] == SCHEMA_VERSION and "funding_source" in _columns(tmp_path)[1]
    assert [dataclasses.replace(t, business_date=None) for t in j.recent()] == before and len(j.events()) == 22
    assert j.by_order("A1")[0].platform_txn_id == "4200001"
    txn = _open(j, code="134567890123450003")
    moved = j.transition(txn.txn_id, State.PAID, "SUCCESS", platform_txn_id="4200003", funding_source="CFT")
    assert moved.funding_source == "CFT" and j.events()[-1]["funding_source"] == "CFT"
    j.close()
    again = Journal(tmp_path, "S0001", "L01")  # a second open finds nothing to do
    assert _columns(tmp_path)[0] == SCHEMA_VERSION and len(again.recent()) == len(before) + 1
    again.close()


def test_writers_opening_a_schema_1_journal_at_once_migrate_it_once(tmp_path):
    before = _schema_1_journal(tmp_path)
    script = ("import sys; from appliance.journal import Journal; "
              "j = Journal(sys.argv[1], 'S0001', 'L01'); print(len(j.recent())); j.close()")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert {o.strip() for o, _ in outs} == {str(len(before))}
    assert _columns(tmp_path)[0] == SCHEMA_VERSION and "funding_source" in _columns(tmp_path)[1]


def test_funding_source_is_kept_by_later_moves_and_sent_to_head_office(journal):
    txn = _open(journal)
    journal.transition(txn.txn_id, State.PAID, "SUCCESS", platform_txn_id="42", funding_source="CMB_DEBIT")
    later = journal.transition(txn.txn_id, State.CANCEL_REQUESTED, "cancel card")
    assert later.funding_source == "CMB_DEBIT" and later.as_dict()["funding_source"] == "CMB_DEBIT"
    assert [e["funding_source"] for e in journal.events(txn.txn_id)] == [None, "CMB_DEBIT", "CMB_DEBIT"]

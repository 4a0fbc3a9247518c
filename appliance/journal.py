"""The journal: every payment and every state change, durable on the Pi before anything else.

SQLite, WAL mode, `synchronous=FULL`: a transition that returned is on disk and survives power
loss. All of it is plain SQL on the thread's sqlite3 connection (the sqlite3 module keeps each
connection's statements compiled; see `_TXN_COLUMNS`), with no ORM on the lane: peewee, which
created the schema up to schema 4, costs 7 MB resident (issue 10), and tests/test_journal_schema.py
holds the schema created here to the one it created. Each transition writes its head-office event (an outbox row) in the same transaction, so a state change
and its event can never diverge.

The outbox is head office's queue (schema 3). Every row gets the lane's next `seq` (strictly
increasing, never reused: the outbox's highest + 1, and `prune` keeps a floor in `meta` so that an
outbox it emptied cannot bring an old number back) and the exact JSON text that goes on the wire,
so a row sent twice is the same message twice and head office de-duplicates it by `event_id`. The
uplink `claim`s queued rows in seq order and `ack`s them once the broker acknowledged them, each a
batch in one commit; `prune` deletes rows acknowledged some days ago and never a queued one. Rows
of no payment fit in too: lane events (`lane_event`) and each business day's closing totals
(`close_days`). A state dir nearly full (`min_free_bytes`) refuses new payments instead: the queue
is bounded by the disk alone, and nothing is ever dropped.

States and the only legal moves (anything else raises IllegalTransition):

    pending ─┬─> paid ──> cancel_requested ─┬─> cancelled    (reversed/closed by the platform)
             ├─> declined                   ├─> refunded     (paid back by a refund)
             ├─> unknown ─┬─> paid          └─> paid         (platform refused the cancel)
             │            ├─> declined
             │            └─> reversed
             └─> deferred  (platform unreachable, nothing sent, offline policy allows)
    deferred ─┬─> pending   (forwarded once the platform is back)
              ├─> declined  (refused or expired before forwarding)
              └─> cancelled (cancelled before forwarding)

Payment codes are bearer tokens. The journal keeps the masked code and an HMAC digest (to refuse
a code that was already used) for ever, and the full code only while the payment is `deferred`,
because forwarding needs it; every transition out of `deferred` erases it.

Erased means gone from the files, not only from the table. `secure_delete` zeroes what SQLite frees
inside journal.sqlite, but the WAL (journal.sqlite-wal) keeps the page images of earlier
transactions, the deferred payment's row with its code among them, until a checkpoint has copied
newer images into the database file and later writes have overwritten those frames: days away, or
never (the WAL file does not shrink). So the transition that erases a code then scrubs (`scrub()`):
a TRUNCATE checkpoint copies the newest page images into journal.sqlite and cuts the WAL to zero
bytes (the -shm file holds only an index of the WAL, no row data). The guarantee: once a transition
out of `deferred` has returned and a scrub after it succeeded (as a rule the one the transition
itself runs), no byte of journal.sqlite, -wal or -shm holds that code. A scrub needs a moment when
no other connection writes or reads an older snapshot; it waits up to SCRUB_WAIT_S for one and
otherwise is left to the next chance: the next transition out of `deferred`, every pass of the
running service's resolver (`scrub()` is cheap when nothing is due), `close()`, and the next
writer's open, which also covers a process killed between an erasure and its scrub. Nothing is
promised below the files (blocks the filesystem freed, flash wear levelling).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import json
import logging
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import quote

from appliance import failpoints, statedir
from appliance.business_day import business_date
from appliance.errors import (IllegalTransition, JournalError, JournalFull, JournalIntegrityError, JournalLost,
                              Refused)
from appliance.money import format_amount
from appliance.redact import mask

log = logging.getLogger(__name__)

#: How long a write waits for another connection's write to finish.
BUSY_TIMEOUT_S = 10.0
#: How long a scrub waits for other connections to leave older snapshots before leaving it for later.
SCRUB_WAIT_S = 0.25
#: A thread that defers its checkpoints (`defer_checkpoints`: the till's) has the WAL checkpointed
#: by `checkpoint_if_due` once it made this many commits (a payment's two write about 21 WAL pages:
#: some 800 pages, near SQLite's own 1,000-page default) ...
CHECKPOINT_EVERY_COMMITS = 40
#: ... and inline, at the end of a commit, once it made this many without one.
CHECKPOINT_AT_LATEST_COMMITS = 200


class State(StrEnum):
    PENDING = "pending"
    PAID = "paid"
    DECLINED = "declined"
    UNKNOWN = "unknown"
    REVERSED = "reversed"
    DEFERRED = "deferred"
    CANCEL_REQUESTED = "cancel_requested"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.PENDING: frozenset({S.PAID, S.DECLINED, S.UNKNOWN, S.DEFERRED}),
    S.UNKNOWN: frozenset({S.PAID, S.DECLINED, S.REVERSED}),
    S.DEFERRED: frozenset({S.PENDING, S.DECLINED, S.CANCELLED}),
    S.PAID: frozenset({S.CANCEL_REQUESTED}),
    S.CANCEL_REQUESTED: frozenset({S.CANCELLED, S.REFUNDED, S.PAID}),
    S.DECLINED: frozenset(),
    S.REVERSED: frozenset(),
    S.CANCELLED: frozenset(),
    S.REFUNDED: frozenset(),
}
#: States the resolver still has to drive to an end.
OPEN_STATES = frozenset({S.PENDING, S.UNKNOWN, S.DEFERRED, S.CANCEL_REQUESTED})


@dataclass(frozen=True)
class Txn:
    """One payment as journaled. `auth_code` is set only while the payment is deferred."""

    txn_id: int
    out_trade_no: str
    order: str
    amount_fen: int
    payment_type: str
    platform: str
    code_masked: str
    state: State
    reason: str
    platform_txn_id: str | None
    created_at: str
    updated_at: str
    attempts: int
    next_attempt_at: float
    retry_note: str
    source: str
    funding_source: str | None = None  # WeChat bank_type, Alipay fund channels, ... (Outcome.funding_source)
    business_date: str | None = None  # YYYY-MM-DD, the store's day it was opened (None: a journal of schema < 3)
    auth_code: str | None = field(default=None, repr=False)  # a bearer token: never in a repr

    def as_dict(self) -> dict:
        """The public view (CLI, head office): no digest, no code beyond its mask."""
        return {"txn_id": self.txn_id, "out_trade_no": self.out_trade_no, "order": self.order,
                "amount": format_amount(self.amount_fen), "amount_fen": self.amount_fen,
                "payment_type": self.payment_type, "platform": self.platform,
                "code_masked": self.code_masked, "state": str(self.state), "reason": self.reason,
                "platform_txn_id": self.platform_txn_id, "funding_source": self.funding_source,
                "business_date": self.business_date, "created_at": self.created_at,
                "updated_at": self.updated_at, "source": self.source}


@dataclass(frozen=True)
class OutboxRow:
    """One queued head-office event: `payload` is the exact JSON text to publish on `topic`
    (the level under `{prefix}/{store}/{terminal}/`)."""

    seq: int
    event_id: str
    kind: str  # txn | lane | day_close
    topic: str  # txn | event | daily
    payload: str
    attempts: int
    created_at: str


@dataclass(frozen=True)
class OutboxState:
    """The outbox queue at a glance: what waits, and what the broker acknowledged last."""

    backlog: int
    oldest_queued_seq: int | None
    oldest_queued_at: str | None
    last_seq: int
    last_ack_seq: int | None
    last_ack_at: str | None


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: The journal's schema version, in SQLite's `PRAGMA user_version`. 0 (never set) is the first
#: schema; 2 added `payment.funding_source` and the unique indexes `payment_live_order` and
#: `payment_code_once`; 3 made the outbox a queue (seq, topic, version, business date, send
#: status and attempts; rows of no payment) and added `payment.business_date`; 4 keeps the indexes a
#: payment's two commits must write to those its queries use (`_HOT_PATH_INDEXES`). `_migrate` brings
#: an older journal forward on a writer's open; a reader opens any of them as it is.
SCHEMA_VERSION = 4

#: Versions of the payloads the outbox holds, by kind (docs/mqtt.md; appliance/schemas/).
PAYLOAD_VERSIONS = {"txn": 2, "lane": 1, "day_close": 1}
#: Where each kind of outbox row is published, under `{prefix}/{store}/{terminal}/`.
TOPICS = {"txn": "txn", "lane": "event", "day_close": "daily"}
CURRENCY = "CNY"


#: The tables and their indexes as a new journal gets them (schema 4), in that order: the SQL
#: peewee's models generated, kept word for word (tests/test_journal_schema.py). The columns have
#: no SQL defaults: every INSERT names them all.
#:
#: meta: journal-wide facts: the epoch that keeps out_trade_no unique across journal re-creation,
#: the floor of the outbox's seqs (`outbox_seq`, see `_last_seq`), the last acknowledged one, the
#: last business day closed. day_sequence: each day's last out_trade_no number, as journals before
#: schema 4 kept it; since then the numbers are read from the payments themselves (`_next_number`)
#: and this is only read. payment: one row per payment; `next_attempt_at` is wall-clock epoch
#: seconds, for display only (see inflight.py), `retry_note` why the last attempt changed nothing.
_TABLES = (
    'CREATE TABLE "day_sequence" ("day" VARCHAR(255) NOT NULL PRIMARY KEY, "last" INTEGER NOT NULL)',
    'CREATE TABLE "meta" ("key" VARCHAR(255) NOT NULL PRIMARY KEY, "value" VARCHAR(255) NOT NULL)',
    'CREATE TABLE "payment" ("id" INTEGER NOT NULL PRIMARY KEY, "out_trade_no" VARCHAR(255) NOT NULL, '
    '"order" VARCHAR(255) NOT NULL, "amount_fen" INTEGER NOT NULL, "payment_type" VARCHAR(255) NOT NULL, '
    '"platform" VARCHAR(255) NOT NULL, "code_masked" VARCHAR(255) NOT NULL, "code_digest" VARCHAR(255) NOT NULL, '
    '"auth_code" VARCHAR(255), "state" VARCHAR(255) NOT NULL, "reason" VARCHAR(255) NOT NULL, '
    '"platform_txn_id" VARCHAR(255), "funding_source" VARCHAR(255), "business_date" VARCHAR(255) NOT NULL, '
    '"created_at" VARCHAR(255) NOT NULL, "updated_at" VARCHAR(255) NOT NULL, "attempts" INTEGER NOT NULL, '
    '"next_attempt_at" REAL NOT NULL, "retry_note" VARCHAR(255) NOT NULL, "source" VARCHAR(255) NOT NULL)',
    'CREATE UNIQUE INDEX "payment_out_trade_no" ON "payment" ("out_trade_no")',
    'CREATE INDEX "payment_order" ON "payment" ("order")',
    'CREATE INDEX "payment_business_date" ON "payment" ("business_date")',
)
#: Head office's events (schema 3), a queue in `seq` order: queued until the broker acknowledged
#: them, then sent, and pruned some days later. `seq` is per lane, strictly increasing, never
#: reused; `event_id` is head office's de-duplication key; `txn_id` is NULL for a row of no payment;
#: `kind` txn | lane | day_close, `topic` txn | event | daily, `version` of the payload's shape,
#: `payload` the JSON text published, byte for byte; `status` queued | sent; `attempts` the times
#: claimed again after the first (re-sends); `sent_at` indexed once set (outbox_sent).
_OUTBOX_TABLE = (
    'CREATE TABLE "outbox" ("id" INTEGER NOT NULL PRIMARY KEY, "seq" INTEGER NOT NULL, '
    '"event_id" VARCHAR(255) NOT NULL, "txn_id" INTEGER, "kind" VARCHAR(255) NOT NULL, '
    '"topic" VARCHAR(255) NOT NULL, "version" INTEGER NOT NULL, "payload" TEXT NOT NULL, '
    '"business_date" VARCHAR(255) NOT NULL, "created_at" VARCHAR(255) NOT NULL, "status" VARCHAR(255) NOT NULL, '
    '"attempts" INTEGER NOT NULL, "sent_at" VARCHAR(255), FOREIGN KEY ("txn_id") REFERENCES "payment" ("id"))',
    'CREATE UNIQUE INDEX "outbox_seq" ON "outbox" ("seq")',
    'CREATE UNIQUE INDEX "outbox_event_id" ON "outbox" ("event_id")',
)


#: States in which a payment holds its order: no second payment may be opened for it.
LIVE_STATES = frozenset({S.PENDING, S.UNKNOWN, S.DEFERRED, S.PAID, S.CANCEL_REQUESTED})
_LIVE_ORDER_INDEX = ('CREATE UNIQUE INDEX IF NOT EXISTS payment_live_order ON payment ("order") WHERE state IN ('
                     + ", ".join(f"'{s}'" for s in sorted(LIVE_STATES)) + ")")
_CODE_ONCE_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS payment_code_once ON payment (code_digest)"
_QUEUED_INDEX = "CREATE INDEX IF NOT EXISTS outbox_queued ON outbox (seq) WHERE status = 'queued'"
#: Schema 4. Every index a commit touches costs a page written to the WAL (and synced): a payment's
#: open wrote 19 pages, its move to paid 11, where a raw single-row commit writes one. So the
#: indexes are those the queries need, no more. The unique payment_code_once serves the code
#: lookups, so the plain payment_code_digest went; open_txns finds open payments in payment_open,
#: which holds only those (a payment leaves it at its end instead of moving to another page of a
#: state index); prune finds acknowledged rows in outbox_sent, which a row enters when it is
#: acknowledged (a batch, by the uplink) instead of as NULL at its insert; and outbox_txn_id went:
#: no query of the lane's looks events up by payment but `events(txn_id)` (the CLI's, a scan of
#: the outbox, which pruning keeps short) and payments are never deleted, so the foreign key needs
#: no index either. Durability is untouched: the same rows, in the same transactions.
_OPEN_IN = "(" + ", ".join(f"'{s}'" for s in sorted(OPEN_STATES)) + ")"
_OPEN_INDEX = f"CREATE INDEX IF NOT EXISTS payment_open ON payment (state) WHERE state IN {_OPEN_IN}"
_SENT_INDEX = "CREATE INDEX IF NOT EXISTS outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL"
_HOT_PATH_INDEXES = (_OPEN_INDEX, _SENT_INDEX)
_DROPPED_INDEXES = ("payment_code_digest", "payment_state", "outbox_sent_at", "outbox_txn_id")

# The hot path (a payment opened, moved, read) in plain SQL on this thread's sqlite3 connection,
# which keeps its last 128 statements compiled (an ORM built a payment's select anew on every call:
# about 125 µs); tests/test_journal_sql.py holds the statements to the schema.

#: A payment's columns in the order of Txn's fields; `_txn_select` leaves out what an old schema lacks.
_TXN_COLUMNS = ("id", "out_trade_no", '"order"', "amount_fen", "payment_type", "platform", "code_masked", "state",
                "reason", "platform_txn_id", "created_at", "updated_at", "attempts", "next_attempt_at", "retry_note",
                "source", "funding_source", "business_date", "auth_code")
_LIVE_IN = "(" + ", ".join(f"'{s}'" for s in sorted(LIVE_STATES)) + ")"  # as in payment_live_order, to use it
_TAKEN_ORDER = f'SELECT id, state FROM payment WHERE "order" = ? AND state IN {_LIVE_IN} LIMIT 1'
_CODE_USED = "SELECT id FROM payment WHERE code_digest = ? LIMIT 1"
_DAY_SEQ = "SELECT last FROM day_sequence WHERE day = ?"
_DAY_LAST_NUMBER = "SELECT max(out_trade_no) FROM payment WHERE out_trade_no BETWEEN ? AND ?"
_LAST_SEQ = "SELECT max(seq) FROM outbox"
_DAY_NUMBERS = f"SELECT ({_DAY_LAST_NUMBER}), ({_DAY_SEQ})"  # one statement for both
_LAST_SEQ_OR_FLOOR = (f"SELECT max(coalesce(({_LAST_SEQ}), 0), "
                      "coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'outbox_seq'), 0))")
_INSERT_PAYMENT = ('INSERT INTO payment (out_trade_no, "order", amount_fen, payment_type, platform, code_masked, '
                   "code_digest, auth_code, state, reason, platform_txn_id, funding_source, business_date, "
                   "created_at, updated_at, attempts, next_attempt_at, retry_note, source) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, '', NULL, NULL, ?, ?, ?, 0, 0.0, '', ?)")
_MOVE_PAYMENT = ("UPDATE payment SET state = ?, reason = ?, updated_at = ?, attempts = 0, next_attempt_at = 0.0, "
                 "retry_note = '', platform_txn_id = ?, funding_source = ?, auth_code = ? WHERE id = ?")
_META_GET = "SELECT value FROM meta WHERE key = ?"
_META_SET = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
_CLAIM = ("SELECT seq, event_id, kind, topic, payload, attempts, created_at FROM outbox "
          "WHERE status = 'queued' AND seq > ? ORDER BY seq LIMIT ?")


def _in(states: Iterable[State]) -> str:
    """`states` as the list of an SQL IN term."""
    return "(" + ", ".join(f"'{s}'" for s in sorted(states)) + ")"


def _count_in(states: Iterable[State]) -> str:
    return f"sum(CASE WHEN state IN {_in(states)} THEN 1 ELSE 0 END)"


def _amount_in(states: Iterable[State]) -> str:
    return f"sum(CASE WHEN state IN {_in(states)} THEN amount_fen ELSE 0 END)"


#: A business day's totals by payment type and funding source: payments held (paid, a cancel
#: requested) and their amount, ended (declined, reversed), cancelled (cancelled, refunded) and
#: their amount, still open (pending, unknown, deferred).
_HELD, _CANCELLED = (S.PAID, S.CANCEL_REQUESTED), (S.CANCELLED, S.REFUNDED)
_DAY_TOTALS = (f"SELECT payment_type, funding_source, {_count_in(_HELD)}, {_amount_in(_HELD)}, "
               f"{_count_in((S.DECLINED, S.REVERSED))}, {_count_in(_CANCELLED)}, {_amount_in(_CANCELLED)}, "
               f"{_count_in((S.PENDING, S.UNKNOWN, S.DEFERRED))} "
               "FROM payment WHERE business_date = ? GROUP BY payment_type, funding_source")
_INSERT_OUTBOX = ("INSERT INTO outbox (seq, event_id, txn_id, kind, topic, version, payload, business_date, "
                  "created_at, status, attempts, sent_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', 0, NULL)")


def _uuid4_hex() -> str:
    """A random (version 4) UUID's 32 hex digits, as `uuid.uuid4().hex` gives them: the uuid module
    brings platform and _uuid with it, for nothing else the lane needs (issue 10)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # variant RFC 4122
    return b.hex()


def _txn_of(row: tuple) -> "Txn":
    """A Txn from a row of `_txn_select`'s columns."""
    return Txn(*row[:7], State(row[7]), *row[8:])


def _init_schema(path: Path) -> None:
    """Create the tables and indexes in a new, empty database file, in one transaction."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for statement in (*_TABLES, *_OUTBOX_TABLE, _LIVE_ORDER_INDEX, _CODE_ONCE_INDEX, _QUEUED_INDEX,
                          *_HOT_PATH_INDEXES):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    finally:
        conn.close()  # uncommitted, the transaction goes with the connection


def _payment_columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(payment)").fetchall()}


def _schema_of(conn: sqlite3.Connection) -> int:
    """The schema a journal file holds (its `PRAGMA user_version`; 0 is schema 1)."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _migrate(conn: sqlite3.Connection, day_of: Callable[[str], str]) -> None:
    """Bring a journal written by an older version to SCHEMA_VERSION, keeping every row.

    `day_of(created_at)` gives the business date of a journaled time, for the rows written before
    business dates were kept. Idempotent and safe against a second process doing the same: the
    check and the change are one BEGIN IMMEDIATE transaction, so the second one finds the work done."""
    if _schema_of(conn) >= SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _schema_of(conn)
        if version < 2:
            if "funding_source" not in _payment_columns(conn):
                conn.execute("ALTER TABLE payment ADD COLUMN funding_source VARCHAR(255)")
            conn.execute(_LIVE_ORDER_INDEX)  # fails on a journal that already charged twice
            conn.execute(_CODE_ONCE_INDEX)
        if version < 3:
            _migrate_to_outbox_queue(conn, day_of)
        if version < 4:
            for index in _DROPPED_INDEXES:
                conn.execute(f"DROP INDEX IF EXISTS {index}")
            for index in _HOT_PATH_INDEXES:
                conn.execute(index)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    log.info("journal schema migrated from version %d to %d", version, SCHEMA_VERSION)


def _migrate_to_outbox_queue(conn: sqlite3.Connection, day_of: Callable[[str], str]) -> None:
    """Schema 3: payments get their business date; the outbox table is rebuilt as a queue. Every
    event of schema 2 (none was ever sent: nothing sent them) is kept with its event_id, queued in
    its commit order, its payload rewritten in today's `txn` shape from what it recorded."""
    conn.execute("ALTER TABLE payment ADD COLUMN business_date VARCHAR(255)")
    payments = {}
    for pid, created_at in conn.execute("SELECT id, created_at FROM payment").fetchall():
        payments[pid] = (created_at, day_of(created_at))
        conn.execute("UPDATE payment SET business_date = ? WHERE id = ?", (payments[pid][1], pid))
    old = conn.execute("SELECT id, event_id, txn_id, payload, created_at, sent_at FROM outbox ORDER BY id").fetchall()
    conn.execute("ALTER TABLE outbox RENAME TO outbox_v2")
    for index in ("outbox_event_id", "outbox_txn_id", "outbox_sent_at"):  # schema 2's, bound to the old table
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    for statement in _OUTBOX_TABLE:
        conn.execute(statement)
    conn.execute(_QUEUED_INDEX)
    conn.execute("CREATE INDEX IF NOT EXISTS payment_business_date ON payment (business_date)")
    for seq, (_, event_id, txn_id, payload, created_at, sent_at) in enumerate(old, start=1):
        was = json.loads(payload)
        created, day = payments[txn_id]
        now = {**{k: v for k, v in was.items() if k != "type"}, "kind": "txn", "version": PAYLOAD_VERSIONS["txn"],
               "seq": seq, "funding_source": was.get("funding_source"), "currency": CURRENCY,
               "txn_kind": txn_kind(was["state"], was.get("previous_state")), "business_date": day,
               "created_at": created}
        conn.execute("INSERT INTO outbox (seq, event_id, txn_id, kind, topic, version, payload, business_date, "
                     "created_at, status, attempts, sent_at) VALUES (?, ?, ?, 'txn', ?, ?, ?, ?, ?, ?, 0, ?)",
                     (seq, event_id, txn_id, TOPICS["txn"], PAYLOAD_VERSIONS["txn"], _json(now), day, created_at,
                      "sent" if sent_at else "queued", sent_at))
    conn.execute("DROP TABLE outbox_v2")
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('outbox_seq', ?)", (str(len(old)),))


class _Connections:
    """A journal's SQLite connections, one per thread (a sqlite3 connection stays in the thread
    that made it), each opened at its thread's first use with the journal's PRAGMAs, in autocommit
    mode: every transaction is an explicit BEGIN. `timeout` is how long a statement waits for
    another connection's lock, in seconds."""

    def __init__(self, database: str, *, uri: bool = False, timeout: float = 5.0,
                 pragmas: tuple[tuple[str, object], ...] = ()):
        self.database = database
        self.uri = uri
        self.timeout = timeout
        self.pragmas = pragmas
        self._local = threading.local()

    def connect(self) -> sqlite3.Connection:
        """Open this thread's connection (closing one it had)."""
        self.close()
        conn = sqlite3.connect(self.database, timeout=self.timeout, isolation_level=None, uri=self.uri)
        try:
            for name, value in self.pragmas:
                conn.execute(f"PRAGMA {name} = {value}")
        except BaseException:
            conn.close()
            raise
        self._local.conn = conn
        return conn

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened if it has none."""
        conn = getattr(self._local, "conn", None)
        return conn if conn is not None else self.connect()

    def is_closed(self) -> bool:
        return getattr(self._local, "conn", None) is None

    def close(self) -> None:
        """Close this thread's connection, if open (an open transaction is rolled back)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

    def execute_sql(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        return self.connection().execute(sql, params)

    @contextmanager
    def snapshot(self):
        """Reads from one snapshot: a read transaction, or the caller's if one is open. Yields the
        connection."""
        conn = self.connection()
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")  # it only read


def txn_kind(state: str, previous_state: str | None) -> str:
    """The operation a payment's state change belongs to, as head office counts it (docs/mqtt.md)."""
    if state == S.REFUNDED:
        return "refund"
    if state in (S.CANCEL_REQUESTED, S.CANCELLED) or (state == S.PAID and previous_state == S.CANCEL_REQUESTED):
        return "cancel"
    return "pay"


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json(payload: dict) -> str:
    """The bytes head office gets: compact, keys sorted, UTF-8 (no escapes)."""
    return _ENCODER.encode(payload)


def _reading(method):
    """Translate SQLite failures of a read into JournalError (JournalFull when the disk is full)."""
    @functools.wraps(method)
    def read(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as e:
            raise _journal_error(e, "read", self.state_dir) from None
    return read


class Journal:
    """The durable store of one lane. Thread-safe: each thread gets its own SQLite connection.

    A writer (the default) opens only a whole journal of this lane, creating one in a state dir
    with no trace of any (see `appliance.statedir`); it raises JournalIntegrityError otherwise.
    Every write first checks that the file it opened is still the one at `path` (not unlinked,
    replaced or truncated) and raises JournalLost if not; a write that fails because the disk is
    full raises JournalFull and leaves the journal as it was.

    `readonly=True` opens for reading only (`appliance journal`, `status`): it never creates or
    changes a file, works on a read-only filesystem, and raises JournalError when there is no
    journal. It skips the identity checks so that a damaged state dir can still be inspected.

    `clock` returns aware UTC datetimes (injectable for tests). Transitions use BEGIN IMMEDIATE
    so that two connections serialise cleanly. `time_zone` and `day_cutoff_hour` give the store's
    business day (`appliance.business_day`), which every payment and outbox row carries.
    `min_free_bytes` is the room a new payment must find on the state dir's filesystem: below it
    `open_payment` refuses (JournalFull), so that the payments already taken, their later
    changes and head office's queue always have room.
    """

    FILENAME = statedir.JOURNAL

    def __init__(self, state_dir: Path, store_id: str, terminal_id: str,
                 clock: Callable[[], datetime] = utc_now, *, readonly: bool = False,
                 time_zone: str = "Asia/Shanghai", day_cutoff_hour: int = 0, min_free_bytes: int = 0):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / self.FILENAME
        self.store_id = store_id
        self.terminal_id = terminal_id
        self.readonly = readonly
        self._clock = clock
        self.time_zone = time_zone
        self.day_cutoff_hour = day_cutoff_hour
        self.min_free_bytes = min_free_bytes
        self._code_key: bytes | None = None
        self._file_id: tuple[int, int] | None = None
        # Scrubs due (erasures) and done, counted so that an erasure during a scrub is not lost. A
        # writer starts with one due: an earlier process may have died before its scrub.
        self._scrub_lock = threading.Lock()
        self._opener = threading.get_ident()
        self._local = threading.local()  # `pending`: commits since this thread's last checkpoint, if it defers
        self._commit_hooks: list[Callable[[], None]] = []
        self._erasures = 0 if readonly else 1
        self._scrubbed = 0
        if readonly:
            self.db = self._open_readonly()
        else:
            identity = statedir.settle(self.state_dir, store_id, terminal_id, _init_schema)
            self._code_key = identity.code_key
            # cache_size: 512 KiB of pages per connection (SQLite's default is 2 MiB, and each thread
            # has its own connection): a lane's reads touch a few index pages, the rest is in the OS's
            # page cache; on a 512 MB Pi the resident size matters more (issue 10).
            self.db = _Connections(str(self.path), timeout=BUSY_TIMEOUT_S, pragmas=(
                ("journal_mode", "wal"), ("synchronous", "full"), ("foreign_keys", 1), ("secure_delete", 1),
                ("cache_size", -512)))
        try:
            conn = self.db.connect()  # kept open: this thread's reads need no new file handles later
            if not readonly:
                _migrate(conn, lambda stamp: self._business_date(datetime.fromisoformat(stamp)))
            # A read-only open never migrates: it may see a journal of any older schema.
            self.schema = SCHEMA_VERSION if not readonly else _schema_of(conn)
            if self.schema < 2 and "funding_source" in _payment_columns(conn):
                self.schema = 2  # written by a schema-1 version that already knew the column
            epoch = conn.execute(_META_GET, ("epoch",)).fetchone()
            if epoch is None:
                raise JournalError(f"the journal in {self.state_dir} has no epoch; it needs a technician")
            self._epoch = epoch[0]
            missing = {"funding_source"} if self.schema < 2 else set()
            missing |= {"business_date"} if self.schema < 3 else set()
            self._txn_select = "SELECT " + ", ".join(f"NULL AS {c}" if c in missing else c
                                                     for c in _TXN_COLUMNS) + " FROM payment"
            if not readonly:
                st = os.stat(self.path)
                self._file_id = (st.st_dev, st.st_ino)
                self.sync_counters()  # after a crash, before an older version could be put back
        except sqlite3.IntegrityError as e:
            raise JournalIntegrityError(f"the journal in {self.state_dir} holds an order paid twice or a code "
                                        f"used twice ({e}); it needs a technician") from None
        except (OSError, sqlite3.DatabaseError) as e:
            raise JournalError(f"cannot open the journal in {self.state_dir}: {e}") from None
        self.scrub()

    def _open_readonly(self) -> _Connections:
        if not self.path.is_file():
            raise JournalError(f"there is no journal in {self.state_dir} (the service has not run there yet)")
        uri = f"file:{quote(str(self.path))}?mode=ro"
        probe = _Connections(uri, uri=True)
        try:
            probe.connect().execute("SELECT 1 FROM meta LIMIT 1")
        except sqlite3.DatabaseError as e:
            # On a read-only filesystem SQLite cannot make the -shm file a WAL reader needs. With no
            # -wal file left and no writer possible there, the file alone is the whole journal.
            writable = os.access(self.state_dir, os.W_OK)
            if writable or self.path.with_name(self.FILENAME + "-wal").exists():
                raise JournalError(f"cannot read the journal {self.path}: {e}") from None
            uri += "&immutable=1"
        finally:
            probe.close()
        return _Connections(uri, uri=True)

    def close(self) -> None:
        """Close this thread's connection (after a last try at a due scrub; in the thread that
        opened the journal, which closes it last, with the old counters brought up to date: other
        threads close theirs after each request, the control socket's for one). Idempotent."""
        if not self.db.is_closed():
            self.scrub()
            if threading.get_ident() == self._opener:
                self.sync_counters()
            self.db.close()

    def sync_counters(self) -> None:
        """Bring the counters that journals before schema 4 kept per payment (meta `outbox_seq`,
        the newest day's `day_sequence`) up to what the tables hold, so that an older version of
        this software put back on the lane numbers on from there, instead of refusing every
        payment and every move on a number already used (the unique indexes would). Done at a
        writer's open and close, not per payment (a page each). Never raises."""
        if self.readonly:
            return
        try:
            if self._counters_behind(self.db.connection()):
                with self._writing("counters") as conn:
                    if self._counters_behind(conn):
                        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('outbox_seq', ?)",
                                     (str(self._last_seq(conn)),))
                        day, n = self._newest_number(conn)
                        conn.execute("INSERT OR REPLACE INTO day_sequence (day, last) VALUES (?, ?)", (day, n))
        except (JournalError, Refused, sqlite3.Error) as e:
            log.debug("journal counters left for later: %s", e)

    def _counters_behind(self, conn: sqlite3.Connection) -> bool:
        floor = conn.execute(_META_GET, ("outbox_seq",)).fetchone()
        if self._last_seq(conn) > (int(floor[0]) if floor else 0):
            return True
        day, n = self._newest_number(conn)
        counted = conn.execute(_DAY_SEQ, (day,)).fetchone() if day else None
        return day is not None and n > (counted[0] if counted else 0)

    @staticmethod
    def _newest_number(conn: sqlite3.Connection) -> tuple[str | None, int]:
        """The UTC day (YYYYMMDD) and number of the newest payment's out_trade_no; (None, 0) if none."""
        row = conn.execute("SELECT created_at, out_trade_no FROM payment ORDER BY id DESC LIMIT 1").fetchone()
        return (row[0][:10].replace("-", ""), int(row[1][-6:])) if row else (None, 0)

    def scrub(self) -> bool:
        """Make the journal's files forget every erased payment code (see the module docstring).

        Returns True when no scrub is due any more, False when other connections kept it from
        finishing within SCRUB_WAIT_S (it is then tried again at the next call). Never raises."""
        with self._scrub_lock:
            target = self._erasures
        if target == self._scrubbed:
            return True
        try:
            self.db.execute_sql(f"PRAGMA busy_timeout = {int(SCRUB_WAIT_S * 1000)}")
            try:
                busy, _, _ = self.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                self.db.execute_sql(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        except sqlite3.DatabaseError as e:
            log.debug("journal scrub left for later: %s", e)
            return False
        if busy:
            log.debug("journal scrub left for later: other connections are reading or writing")
            return False
        with self._scrub_lock:
            self._scrubbed = max(self._scrubbed, target)
            return self._scrubbed == self._erasures

    # --- writing --------------------------------------------------------------------------

    def digest(self, code: str) -> str:
        """The code's HMAC digest. Any str has one: text that is not valid Unicode (a lone
        surrogate from a JSON command, say) is digested by its code points, never refused here."""
        if self._code_key is None:
            raise JournalError("a read-only journal cannot digest payment codes")
        return hmac.new(self._code_key, code.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:40]

    def check_file(self) -> None:
        """Raise JournalLost unless the journal file this writer opened is still at `path`, whole.

        A file unlinked, renamed over or truncated under a running service would take every later
        write with it: the next start would not know what was charged."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self._file_id or st.st_size == 0:
            what = "deleted" if st is None else "emptied" if st.st_size == 0 else "replaced by another file"
            raise JournalLost(f"the journal {self.path} was {what} while in use; no more payments are taken")

    def on_commit(self, hook: Callable[[], None]) -> None:
        """Call `hook()` after every commit through this Journal object (in the committing thread;
        it must not block): how the uplink learns of new outbox rows without polling. Commits of
        other processes are not seen (while the service runs, no other process writes)."""
        self._commit_hooks.append(hook)

    @contextmanager
    def _writing(self, what: str):
        """One BEGIN IMMEDIATE transaction on a checked file; yields this thread's sqlite3
        connection, for the plain statements of the hot path. Disk full becomes JournalFull, and
        whatever SQLite already rolled back by itself is not rolled back twice. `what` names the
        write for the kill harness's crash points on either side of the commit."""
        if self.readonly:
            raise JournalError("the journal was opened read-only")
        self.check_file()
        conn = self.db.connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            failpoints.hit(f"journal.{what}.before_commit")
            conn.execute("COMMIT")
            failpoints.hit(f"journal.{what}.after_commit")
            pending = getattr(self._local, "pending", None)
            for hook in self._commit_hooks:
                hook()
        except BaseException as e:
            if conn.in_transaction:
                try:
                    conn.rollback()
                except sqlite3.Error:
                    pass
            if isinstance(e, sqlite3.IntegrityError):  # a unique index caught what the checks above missed
                raise Refused(f"refused by the journal's uniqueness rules: {e}") from None
            if _disk_full(e) or isinstance(e, sqlite3.OperationalError):
                raise _journal_error(e, "write", self.state_dir) from None
            raise
        if pending is not None:
            self._local.pending = pending + 1
            if pending + 1 >= CHECKPOINT_AT_LATEST_COMMITS:
                self._checkpoint(conn)

    def defer_checkpoints(self) -> None:
        """Leave the WAL's checkpoints out of this thread's commits, to `checkpoint_if_due`.

        SQLite checkpoints inside the commit that takes the WAL past 1,000 pages: copying them into
        journal.sqlite and syncing it takes 1 to 7 ms here, once every 50 payments or so, in the
        middle of one of them. The till calls this in its thread and `checkpoint_if_due` once the
        cashier has seen a result, so that no payment waits for a checkpoint. Durability is not
        touched: a commit is on disk (in the WAL, synced) whether a checkpoint follows or not. Should
        `checkpoint_if_due` not be called, a commit checkpoints after CHECKPOINT_AT_LATEST_COMMITS
        anyway; other threads' connections (resolver, uplink) keep SQLite's own."""
        try:
            self.db.connection().execute("PRAGMA wal_autocheckpoint = 0")
        except sqlite3.Error as e:  # the commits checkpoint as SQLite would
            log.debug("journal checkpoints not deferred: %s", e)
            return
        self._local.pending = 0

    def checkpoint_if_due(self) -> None:
        """Checkpoint the WAL (PASSIVE: never waits for other connections) when this thread defers
        its checkpoints and made CHECKPOINT_EVERY_COMMITS commits since its last; else nothing."""
        pending = getattr(self._local, "pending", None)
        if pending is not None and pending >= CHECKPOINT_EVERY_COMMITS:
            self._checkpoint(self.db.connection())

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """A PASSIVE checkpoint after this thread's commits. Never raises: a checkpoint that fails
        (the disk full, say) leaves the pages in the WAL, where they are as safe, for the next."""
        self._local.pending = 0
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:
            log.debug("journal checkpoint left for later: %s", e)

    def open_payment(self, *, order: str, amount_fen: int, payment_type: str, platform: str,
                     code: str, source: str = "scan") -> Txn:
        """Commit a new payment intent in state pending, or raise Refused, all in one transaction.

        Refused when the order already has a live payment (pending, unknown, deferred, paid,
        cancel_requested) or the code was ever used: checked inside the transaction that opens the
        payment and enforced again by unique indexes, so two writers can never both succeed.
        Allocates the unique out_trade_no: `{store}_{terminal}_{YYYYMMDD}{epoch}{seq:06d}`, at most
        31 characters of [A-Za-z0-9_], valid for WeChat Pay (<= 32) and Alipay (<= 64).
        """
        now = self._clock()
        day = f"{now.year:04d}{now.month:02d}{now.day:02d}"  # UTC; strftime costs 10 times as much
        digest = self.digest(code)
        self._check_room()
        with self._writing("open") as conn:
            self._refuse_taken_order(order, conn)
            used = conn.execute(_CODE_USED, (digest,)).fetchone()
            if used is not None:
                raise Refused(f"payment code {mask(code)} was already used (txn {used[0]}); "
                              "the customer must refresh it")
            prefix = f"{self.store_id}_{self.terminal_id}_{day}{self._epoch}"
            out_trade_no = f"{prefix}{self._next_number(conn, day, prefix):06d}"
            stamp = rfc3339(now)
            masked, bday = mask(code), self._business_date(now)
            txn_id = conn.execute(_INSERT_PAYMENT, (out_trade_no, order, amount_fen, payment_type, platform, masked,
                                                    digest, S.PENDING.value, bday, stamp, stamp, source)).lastrowid
            txn = Txn(txn_id, out_trade_no, order, amount_fen, payment_type, platform, masked, S.PENDING, "", None,
                      stamp, stamp, 0, 0.0, "", source, None, bday)
            self._event(conn, txn, previous=None, at=stamp)
        return txn

    def transition(self, txn_id: int, to: State, reason: str = "", *,
                   platform_txn_id: str | None = None, funding_source: str | None = None,
                   auth_code: str | None = None) -> Txn:
        """Move a payment to `to` and write its outbox event, atomically. Raises IllegalTransition.

        `platform_txn_id` and `funding_source` are stored when given (a later move that does not
        know them keeps what was stored). `auth_code` is required for, and only kept by, a move to
        `deferred`.
        """
        return self.move(txn_id, to, reason, platform_txn_id=platform_txn_id, funding_source=funding_source,
                         auth_code=auth_code)[1]

    def move(self, txn_id: int, to: State, reason: str = "", *,
             platform_txn_id: str | None = None, funding_source: str | None = None,
             auth_code: str | None = None) -> tuple[State, Txn]:
        """`transition`, also returning the state the payment was in: read in the same transaction,
        so a caller that logs "from -> to" needs no read of its own beforehand."""
        to = State(to)
        if (to is S.DEFERRED) != (auth_code is not None):
            raise IllegalTransition("the payment code is kept exactly while a payment is deferred")
        with self._writing(f"to_{to}") as conn:
            row = conn.execute(self._txn_select + " WHERE id = ?", (txn_id,)).fetchone()
            if row is None:
                raise IllegalTransition(f"txn {txn_id} does not exist")
            old = _txn_of(row)
            current = old.state
            if to not in TRANSITIONS[current]:
                raise IllegalTransition(f"txn {txn_id}: {current} -> {to} is not allowed")
            stamp = rfc3339(self._clock())
            new = Txn(old.txn_id, old.out_trade_no, old.order, old.amount_fen, old.payment_type, old.platform,
                      old.code_masked, to, reason[:200], platform_txn_id or old.platform_txn_id, old.created_at,
                      stamp, 0, 0.0, "", old.source, funding_source[:64] if funding_source else old.funding_source,
                      old.business_date, auth_code)
            conn.execute(_MOVE_PAYMENT, (to.value, new.reason, stamp, new.platform_txn_id, new.funding_source,
                                         auth_code, txn_id))
            self._event(conn, new, previous=current, at=stamp)
        if current is S.DEFERRED:  # the code is erased from the table; now from the files
            with self._scrub_lock:
                self._erasures += 1
            self.scrub()
        return current, new

    def schedule(self, txn_id: int, next_attempt_at: float, note: str = "") -> None:
        """Record a resolution attempt that changed nothing, and why (`note`); no outbox event."""
        with self._writing("schedule") as conn:
            conn.execute("UPDATE payment SET attempts = attempts + 1, next_attempt_at = ?, retry_note = ? WHERE id = ?",
                         (next_attempt_at, note[:200], txn_id))

    @staticmethod
    def _next_number(conn: sqlite3.Connection, day: str, prefix: str) -> int:
        """The next number of `day`'s out_trade_nos (`prefix` + 6 digits), inside the caller's
        transaction. Read from the day's highest out_trade_no (payments are never deleted), in the
        unique index that keeps them apart; and from day_sequence, where journals before schema 4
        counted them. Nothing is written for it: a counter row would be one more page per payment."""
        highest, counted = conn.execute(_DAY_NUMBERS, (prefix + "000000", prefix + "999999", day)).fetchone()
        return max(int(highest[-6:]) if highest else 0, counted or 0) + 1

    @staticmethod
    def _last_seq(conn: sqlite3.Connection) -> int:
        """The highest outbox seq ever given out: the outbox's highest, or, when pruning emptied
        it, the floor `prune` keeps in meta (`outbox_seq`), so that no seq is ever given twice. Its
        rows on the hot path write no counter of their own."""
        return conn.execute(_LAST_SEQ_OR_FLOOR).fetchone()[0]

    def _event(self, conn: sqlite3.Connection, txn: Txn, previous: State | None, at: str) -> None:
        public = txn.as_dict()
        del public["updated_at"]
        self._enqueue("txn", txn.business_date, at, txn.txn_id, lambda seq, event_id: {
            **public, "kind": "txn", "version": PAYLOAD_VERSIONS["txn"], "event_id": event_id, "seq": seq,
            "store_id": self.store_id, "terminal_id": self.terminal_id, "currency": CURRENCY,
            "txn_kind": txn_kind(txn.state, previous), "previous_state": str(previous) if previous else None,
            "at": at}, conn)

    def _enqueue(self, kind: str, business_date: str, at: str, txn_id: int | None,
                 payload: Callable[[int, str], dict], conn: sqlite3.Connection | None = None) -> "OutboxRow":
        """Append one outbox row inside the caller's transaction: the next seq, a new event_id,
        `payload(seq, event_id)` as the JSON to publish."""
        conn = conn or self.db.connection()
        seq = self._last_seq(conn) + 1
        event_id = _uuid4_hex()
        text = _json(payload(seq, event_id))
        conn.execute(_INSERT_OUTBOX, (seq, event_id, txn_id, kind, TOPICS[kind], PAYLOAD_VERSIONS[kind], text,
                                      business_date, at))
        return OutboxRow(seq, event_id, kind, TOPICS[kind], text, 0, at)

    def _business_date(self, at: datetime) -> str:
        return business_date(at, self.time_zone, self.day_cutoff_hour).isoformat()

    def business_date_now(self) -> str:
        """Today's business date of this lane ("YYYY-MM-DD"), by the journal's clock."""
        return self._business_date(self._clock())

    def _check_room(self) -> None:
        """Raise JournalFull when the state dir's filesystem has less than min_free_bytes free."""
        if not self.min_free_bytes:
            return
        try:
            st = os.statvfs(self.state_dir)
        except OSError as e:
            raise JournalError(f"cannot check the room left in {self.state_dir}: {e.strerror}") from None
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes:
            raise JournalFull(f"the state dir {self.state_dir} is nearly full ({free // 2**20} MiB free, "
                              f"{self.min_free_bytes // 2**20} MiB kept for payments already taken and head "
                              "office's queue); no new payment until there is room")

    # --- the outbox: head office's queue ---------------------------------------------------

    def claim(self, after_seq: int = 0, limit: int = 100) -> list["OutboxRow"]:
        """The next queued rows with seq > after_seq, in seq order, at most `limit`, each with the
        number of times it has now been claimed (`attempts`). A claimed row stays queued until `ack`.

        One commit. A first claim writes no row: the journal keeps the highest seq ever claimed
        (`claimed_through` in meta), and only a row claimed again (after a reconnect, a restart, a
        refusal) has its stored count of re-sends raised, so a drain does not rewrite every row's
        page twice."""
        through = 0
        with self._writing("claim") as conn:
            rows = conn.execute(_CLAIM, (after_seq, limit)).fetchall()
            if rows:
                done = conn.execute(_META_GET, ("claimed_through",)).fetchone()
                through = int(done[0]) if done else 0
                first, last = rows[0][0], rows[-1][0]
                if first <= through:  # the queued rows in a seq range are exactly those claimed
                    conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE status = 'queued' "
                                 "AND seq BETWEEN ? AND ?", (first, min(last, through)))
                if last > through:
                    conn.execute(_META_SET, ("claimed_through", str(last)))
        return [OutboxRow(seq, event_id, kind, topic, payload, attempts + (2 if seq <= through else 1), created_at)
                for seq, event_id, kind, topic, payload, attempts, created_at in rows]

    def ack(self, seqs: Iterable[int]) -> int:
        """Mark rows sent (the broker acknowledged them), in one commit. Returns how many changed
        (a row acknowledged twice counts once)."""
        seqs = sorted(set(seqs))
        if not seqs:
            return 0
        stamp = rfc3339(self._clock())
        changed = 0
        with self._writing("ack") as conn:
            for first, last in _runs(seqs):  # acknowledgements come in runs of consecutive seqs
                changed += conn.execute("UPDATE outbox SET status = 'sent', sent_at = ? WHERE status = 'queued' "
                                        "AND seq BETWEEN ? AND ?", (stamp, first, last)).rowcount
            last = conn.execute(_META_GET, ("last_ack_seq",)).fetchone()
            if last is None or int(last[0]) < seqs[-1]:
                conn.executemany(_META_SET, (("last_ack_seq", str(seqs[-1])), ("last_ack_at", stamp)))
        return changed

    def prune(self, keep_days: float) -> int:
        """Delete sent rows acknowledged more than `keep_days` ago; never a queued one. Returns
        how many went."""
        cutoff = rfc3339(self._clock() - timedelta(days=keep_days))
        with self._writing("prune") as conn:
            conn.execute(_META_SET, ("outbox_seq", str(self._last_seq(conn))))
            return conn.execute("DELETE FROM outbox WHERE status = 'sent' AND sent_at < ?", (cutoff,)).rowcount

    @_reading
    def outbox_state(self) -> "OutboxState":
        """The queue as the uplink and `appliance sync` report it."""
        if self.schema < 3:
            raise JournalError(f"the journal in {self.state_dir} has schema {self.schema}, older than this "
                               "software's outbox; the service migrates it at its next start")
        with self.db.snapshot() as conn:
            count = conn.execute("SELECT count(*) FROM outbox WHERE status = 'queued'").fetchone()[0]
            oldest = conn.execute("SELECT seq, created_at FROM outbox WHERE status = 'queued' ORDER BY seq LIMIT 1"
                                  ).fetchone()
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            last_seq = self._last_seq(conn)
        last_ack = meta.get("last_ack_seq")
        return OutboxState(backlog=count, oldest_queued_seq=oldest[0] if oldest else None,
                           oldest_queued_at=oldest[1] if oldest else None,
                           last_seq=last_seq,
                           last_ack_seq=int(last_ack) if last_ack else None, last_ack_at=meta.get("last_ack_at"))

    def lane_event(self, event: str, detail: dict) -> "OutboxRow":
        """Queue a lane event that belongs to no payment (started, stopped, fault, fault_cleared).
        `detail` must hold no payment code: it is published as it is."""
        now = self._clock()
        at = rfc3339(now)
        day = self._business_date(now)
        with self._writing("lane_event"):
            return self._enqueue("lane", day, at, None, lambda seq, event_id: {
                "kind": "lane", "version": PAYLOAD_VERSIONS["lane"], "event_id": event_id, "seq": seq,
                "store_id": self.store_id, "terminal_id": self.terminal_id, "event": event, "detail": detail,
                "business_date": day, "at": at})

    @_reading
    def daily(self, business_date: str, *, closed: bool = False) -> dict:
        """The `daily` payload of a business date as the journal has it now (docs/mqtt.md):
        totals per payment type and funding source, by each payment's current state."""
        with self.db.snapshot():  # the totals and as_of_seq from one snapshot
            return self._daily(business_date, closed)

    def _daily(self, day: str, closed: bool) -> dict:
        rows = self.db.connection().execute(_DAY_TOTALS, (day,)).fetchall()
        totals = [{"payment_type": t, "funding_source": f, "count": n, "amount_fen": a, "amount": format_amount(a),
                   "declined": d, "cancelled": c, "cancelled_amount_fen": ca, "cancelled_amount": format_amount(ca),
                   "open": o} for t, f, n, a, d, c, ca, o in rows]
        totals.sort(key=lambda r: (r["payment_type"], r["funding_source"] or ""))
        return {"kind": "daily", "version": 1, "store_id": self.store_id, "terminal_id": self.terminal_id,
                "business_date": day, "closed": closed, "currency": CURRENCY,
                "as_of_seq": self._last_seq(self.db.connection()), "at": rfc3339(self._clock()), "totals": totals}

    def close_days(self, before: str) -> list[str]:
        """Queue a day close (the day's `daily` totals, closed) for every business date before
        `before` ("YYYY-MM-DD") that has payments and was not closed yet, oldest first, in one
        commit. Returns the dates closed. A day is closed once: a payment that ends after its
        day's close changes head office's totals through its txn events only."""
        with self._writing("close_days") as conn:
            done = conn.execute(_META_GET, ("closed_through",)).fetchone()
            days = sorted(day for day, in conn.execute(
                "SELECT DISTINCT business_date FROM payment WHERE business_date < ? AND business_date > ?",
                (before, done[0] if done else "")))
            at = rfc3339(self._clock())
            for day in days:
                totals = self._daily(day, closed=True)
                self._enqueue("day_close", day, at, None,
                              lambda seq, event_id, totals=totals: {**totals, "event_id": event_id, "seq": seq})
            if days:
                conn.execute(_META_SET, ("closed_through", days[-1]))
        return days

    # --- reading --------------------------------------------------------------------------

    def _refuse_taken_order(self, order: str, conn: sqlite3.Connection | None = None) -> None:
        live = (conn or self.db.connection()).execute(_TAKEN_ORDER, (order,)).fetchone()
        if live is not None:
            if live[1] in (S.PAID, S.CANCEL_REQUESTED):
                raise Refused(f"order {order} is already paid (txn {live[0]})")
            raise Refused(f"order {order} has a payment being resolved (txn {live[0]})")

    def _txns(self, where: str, params: tuple = ()) -> list[Txn]:
        return [_txn_of(r) for r in self.db.connection().execute(f"{self._txn_select} {where}", params)]

    @_reading
    def check_order_free(self, order: str) -> None:
        """Raise Refused when the order has a live payment (the rule `open_payment` enforces in its
        transaction; this early answer lets the till refuse an order ticket before any code)."""
        self._refuse_taken_order(order)

    @_reading
    def journal_id(self) -> str | None:
        row = self.db.connection().execute(_META_GET, ("journal_id",)).fetchone()
        return row[0] if row else None

    @_reading
    def get(self, txn_id: int) -> Txn | None:
        row = self.db.connection().execute(self._txn_select + " WHERE id = ?", (txn_id,)).fetchone()
        return _txn_of(row) if row else None

    @_reading
    def by_order(self, order: str) -> list[Txn]:
        return self._txns('WHERE "order" = ? ORDER BY id', (order,))

    @_reading
    def code_used(self, code: str) -> bool:
        return self.db.connection().execute(_CODE_USED, (self.digest(code),)).fetchone() is not None

    @_reading
    def recent(self, *, limit: int = 50, states: Iterable[State] | None = None) -> list[Txn]:
        """Newest first."""
        if states is None:
            return self._txns("ORDER BY id DESC LIMIT ?", (limit,))
        states = [str(s) for s in states]
        return self._txns(f"WHERE state IN ({', '.join('?' * len(states))}) ORDER BY id DESC LIMIT ?",
                          (*states, limit))

    @_reading
    def open_txns(self) -> list[Txn]:
        """Payments not yet at an end, oldest first."""
        return self._txns(f"WHERE state IN {_OPEN_IN} ORDER BY id")

    @_reading
    def counts(self) -> dict[str, int]:
        """How many payments are in each state ({state: count}; states with none are left out)."""
        return dict(self.db.connection().execute("SELECT state, count(id) FROM payment GROUP BY state").fetchall())

    @_reading
    def open_counts(self) -> dict[str, int]:
        """How many payments are in each open state ({state: count}; states with none are left
        out). Read from payment_open, which holds only open payments: cheap however long the
        journal (the service's status asks every few seconds; `counts` reads every payment)."""
        return dict(self.db.connection().execute(
            f"SELECT state, count(*) FROM payment WHERE state IN {_OPEN_IN} GROUP BY state").fetchall())

    @_reading
    def deferred_totals(self) -> tuple[int, int]:
        """(count, sum of fen) of payments accepted offline and not yet forwarded."""
        count, total = self.db.connection().execute(  # the IN term lets SQLite use payment_open
            f"SELECT count(*), coalesce(sum(amount_fen), 0) FROM payment WHERE state IN {_OPEN_IN} AND state = ?",
            (S.DEFERRED.value,)).fetchone()
        return int(count), int(total)

    @_reading
    def events(self, txn_id: int | None = None) -> list[dict]:
        """Outbox payloads in commit order (all, or one payment's), sent or not."""
        where, params = ("", ()) if txn_id is None else (" WHERE txn_id = ?", (txn_id,))
        order = "seq" if self.schema >= 3 else "id"
        return [json.loads(payload) for payload, in self.db.connection().execute(
            f"SELECT payload FROM outbox{where} ORDER BY {order}", params)]


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ints as (first, last) runs of consecutive values: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for seq in seqs:
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def _journal_error(e: BaseException, doing: str, state_dir: Path) -> JournalError:
    """A SQLite failure as the journal reports it: JournalFull when the disk is full."""
    if _disk_full(e):
        what = "be read" if doing == "read" else "record this"
        return JournalFull(f"disk full: the journal in {state_dir} cannot {what}")
    return JournalError(f"journal {doing} failed: {e}")


def _disk_full(e: BaseException) -> bool:
    """True when an error (or what it wraps) is SQLite's SQLITE_FULL or the OS's ENOSPC."""
    for _ in range(10):  # a chain is short; never follow a cycle
        if e is None:
            return False
        if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or getattr(e, "errno", None) == errno.ENOSPC:
            return True
        if "database or disk is full" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False

"""The journal: every payment and every state change, durable on the Pi before anything else.

SQLite through peewee, WAL mode, `synchronous=FULL`: a transition that returned is on disk and
survives power loss. Each transition writes its head-office event (an outbox row) in the same
transaction, so a state change and its event can never diverge.

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
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import quote

import peewee as pw

from appliance import failpoints, statedir
from appliance.errors import (IllegalTransition, JournalError, JournalFull, JournalIntegrityError, JournalLost,
                              Refused)
from appliance.money import format_amount
from appliance.redact import mask

log = logging.getLogger(__name__)

#: How long a write waits for another connection's write to finish.
BUSY_TIMEOUT_S = 10.0
#: How long a scrub waits for other connections to leave older snapshots before leaving it for later.
SCRUB_WAIT_S = 0.25


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
    auth_code: str | None = field(default=None, repr=False)  # a bearer token: never in a repr

    def as_dict(self) -> dict:
        """The public view (CLI, head office): no digest, no code beyond its mask."""
        return {"txn_id": self.txn_id, "out_trade_no": self.out_trade_no, "order": self.order,
                "amount": format_amount(self.amount_fen), "amount_fen": self.amount_fen,
                "payment_type": self.payment_type, "platform": self.platform,
                "code_masked": self.code_masked, "state": str(self.state), "reason": self.reason,
                "platform_txn_id": self.platform_txn_id, "funding_source": self.funding_source,
                "created_at": self.created_at,
                "updated_at": self.updated_at, "source": self.source}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: The journal's schema version, in SQLite's `PRAGMA user_version`. 0 (never set) is the first
#: schema; 2 added `payment.funding_source` and the unique indexes `payment_live_order` and
#: `payment_code_once`. `_migrate` brings an older journal forward on a
#: writer's open.
SCHEMA_VERSION = 2


def _models(db: pw.Database, *, with_funding_source: bool = True):
    class Base(pw.Model):
        class Meta:
            database = db

    class Meta_(Base):
        """Journal-wide facts: the epoch that keeps out_trade_no unique across journal re-creation."""
        key = pw.CharField(primary_key=True)
        value = pw.CharField()

        class Meta:
            table_name = "meta"

    class DaySequence(Base):
        day = pw.CharField(primary_key=True)  # YYYYMMDD, UTC
        last = pw.IntegerField()

        class Meta:
            table_name = "day_sequence"

    class Payment(Base):
        out_trade_no = pw.CharField(unique=True)
        order = pw.CharField(index=True)
        amount_fen = pw.IntegerField()
        payment_type = pw.CharField()
        platform = pw.CharField()
        code_masked = pw.CharField()
        code_digest = pw.CharField(index=True)
        auth_code = pw.CharField(null=True)
        state = pw.CharField(index=True)
        reason = pw.CharField(default="")
        platform_txn_id = pw.CharField(null=True)
        if with_funding_source:  # absent from journals of schema 1 (opened read-only, never migrated)
            funding_source = pw.CharField(null=True)
        created_at = pw.CharField()
        updated_at = pw.CharField()
        attempts = pw.IntegerField(default=0)
        next_attempt_at = pw.FloatField(default=0.0)  # wall-clock epoch seconds; display only (see inflight.py)
        retry_note = pw.CharField(default="")  # why the last attempt changed nothing
        source = pw.CharField(default="scan")

        class Meta:
            table_name = "payment"

    class Outbox(Base):
        event_id = pw.CharField(unique=True)  # idempotency key for head office
        txn = pw.ForeignKeyField(Payment, backref="events")
        kind = pw.CharField()
        payload = pw.TextField()
        created_at = pw.CharField()
        sent_at = pw.CharField(null=True, index=True)

        class Meta:
            table_name = "outbox"

    return Meta_, DaySequence, Payment, Outbox


#: States in which a payment holds its order: no second payment may be opened for it.
LIVE_STATES = frozenset({S.PENDING, S.UNKNOWN, S.DEFERRED, S.PAID, S.CANCEL_REQUESTED})
_LIVE_ORDER_INDEX = ('CREATE UNIQUE INDEX IF NOT EXISTS payment_live_order ON payment ("order") WHERE state IN ('
                     + ", ".join(f"'{s}'" for s in sorted(LIVE_STATES)) + ")")
_CODE_ONCE_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS payment_code_once ON payment (code_digest)"


def _init_schema(path: Path) -> None:
    """Create the tables and indexes in a new, empty database file."""
    db = pw.SqliteDatabase(str(path))
    with db.connection_context():
        db.create_tables(_models(db))
        db.execute_sql(_LIVE_ORDER_INDEX)
        db.execute_sql(_CODE_ONCE_INDEX)
        db.execute_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _payment_columns(db: pw.Database) -> set[str]:
    return {row[1] for row in db.execute_sql("PRAGMA table_info(payment)").fetchall()}


def _migrate(db: pw.Database) -> None:
    """Bring a journal written by an older version to SCHEMA_VERSION, keeping every row.

    Idempotent and safe against a second process doing the same: the check and the change are
    one BEGIN IMMEDIATE transaction, so the second one finds the work done."""
    if db.execute_sql("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    db.execute_sql("BEGIN IMMEDIATE")
    try:
        if db.execute_sql("PRAGMA user_version").fetchone()[0] < 2:
            if "funding_source" not in _payment_columns(db):
                db.execute_sql("ALTER TABLE payment ADD COLUMN funding_source VARCHAR(255)")
            db.execute_sql(_LIVE_ORDER_INDEX)  # fails on a journal that already charged twice
            db.execute_sql(_CODE_ONCE_INDEX)
        db.execute_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute_sql("COMMIT")
    except BaseException:
        db.execute_sql("ROLLBACK")
        raise
    log.info("journal schema migrated to version %d", SCHEMA_VERSION)


def _reading(method):
    """Translate SQLite failures of a read into JournalError (JournalFull when the disk is full)."""
    @functools.wraps(method)
    def read(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (pw.OperationalError, sqlite3.OperationalError) as e:
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
    so that two connections serialise cleanly.
    """

    FILENAME = statedir.JOURNAL

    def __init__(self, state_dir: Path, store_id: str, terminal_id: str,
                 clock: Callable[[], datetime] = utc_now, *, readonly: bool = False):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / self.FILENAME
        self.store_id = store_id
        self.terminal_id = terminal_id
        self.readonly = readonly
        self._clock = clock
        self._code_key: bytes | None = None
        self._file_id: tuple[int, int] | None = None
        # Scrubs due (erasures) and done, counted so that an erasure during a scrub is not lost. A
        # writer starts with one due: an earlier process may have died before its scrub.
        self._scrub_lock = threading.Lock()
        self._erasures = 0 if readonly else 1
        self._scrubbed = 0
        if readonly:
            self.db = self._open_readonly()
        else:
            identity = statedir.settle(self.state_dir, store_id, terminal_id, _init_schema)
            self._code_key = identity.code_key
            self.db = pw.SqliteDatabase(str(self.path), timeout=BUSY_TIMEOUT_S, pragmas={
                "journal_mode": "wal", "synchronous": "full", "foreign_keys": 1, "secure_delete": 1})
        try:
            self.db.connect()  # kept open: this thread's reads need no new file handles later
            if not readonly:
                _migrate(self.db)
            # A read-only open never migrates: it may see a journal of schema 1, without funding_source.
            self._Meta, self._Seq, self._Payment, self._Outbox = _models(
                self.db, with_funding_source=not readonly or "funding_source" in _payment_columns(self.db))
            self._epoch = self._Meta.get(self._Meta.key == "epoch").value
            if not readonly:
                st = os.stat(self.path)
                self._file_id = (st.st_dev, st.st_ino)
        except pw.IntegrityError as e:
            raise JournalIntegrityError(f"the journal in {self.state_dir} holds an order paid twice or a code "
                                        f"used twice ({e}); it needs a technician") from None
        except (OSError, pw.DatabaseError) as e:
            raise JournalError(f"cannot open the journal in {self.state_dir}: {e}") from None
        self.scrub()

    def _open_readonly(self) -> pw.SqliteDatabase:
        if not self.path.is_file():
            raise JournalError(f"there is no journal in {self.state_dir} (the service has not run there yet)")
        uri = f"file:{quote(str(self.path))}?mode=ro"
        probe = pw.SqliteDatabase(uri, uri=True)
        try:
            probe.connect()
            probe.execute_sql("SELECT 1 FROM meta LIMIT 1")
        except pw.DatabaseError as e:
            # On a read-only filesystem SQLite cannot make the -shm file a WAL reader needs. With no
            # -wal file left and no writer possible there, the file alone is the whole journal.
            writable = os.access(self.state_dir, os.W_OK)
            if writable or self.path.with_name(self.FILENAME + "-wal").exists():
                raise JournalError(f"cannot read the journal {self.path}: {e}") from None
            uri += "&immutable=1"
        finally:
            probe.close()
        return pw.SqliteDatabase(uri, uri=True)

    def close(self) -> None:
        """Close this thread's connection (after a last try at a due scrub). Idempotent."""
        if not self.db.is_closed():
            self.scrub()
            self.db.close()

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
        except (pw.DatabaseError, sqlite3.DatabaseError) as e:
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

    @contextmanager
    def _writing(self, what: str):
        """One BEGIN IMMEDIATE transaction on a checked file. Disk full becomes JournalFull, and
        whatever SQLite already rolled back by itself is not rolled back twice. `what` names the
        write for the kill harness's crash points on either side of the commit."""
        if self.readonly:
            raise JournalError("the journal was opened read-only")
        self.check_file()
        conn = self.db.connection()
        try:
            self.db.execute_sql("BEGIN IMMEDIATE")
            yield
            failpoints.hit(f"journal.{what}.before_commit")
            self.db.execute_sql("COMMIT")
            failpoints.hit(f"journal.{what}.after_commit")
        except BaseException as e:
            if conn.in_transaction:
                try:
                    conn.rollback()
                except sqlite3.Error:
                    pass
            if isinstance(e, pw.IntegrityError):  # a unique index caught what the checks above missed
                raise Refused(f"refused by the journal's uniqueness rules: {e}") from None
            if _disk_full(e) or isinstance(e, (pw.OperationalError, sqlite3.OperationalError)):
                raise _journal_error(e, "write", self.state_dir) from None
            raise

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
        day = now.strftime("%Y%m%d")
        digest = self.digest(code)
        P = self._Payment
        with self._writing("open"):
            self._refuse_taken_order(order)
            used = P.select(P.id).where(P.code_digest == digest).first()
            if used is not None:
                raise Refused(f"payment code {mask(code)} was already used (txn {used.id}); "
                              "the customer must refresh it")
            seq = self._Seq.get_or_none(self._Seq.day == day)
            n = 1 if seq is None else seq.last + 1
            self._Seq.insert(day=day, last=n).on_conflict_replace().execute()
            stamp = rfc3339(now)
            row = P.create(
                out_trade_no=f"{self.store_id}_{self.terminal_id}_{day}{self._epoch}{n:06d}",
                order=order, amount_fen=amount_fen, payment_type=payment_type, platform=platform,
                code_masked=mask(code), code_digest=digest,
                state=str(S.PENDING),
                created_at=stamp, updated_at=stamp, source=source)
            self._event(row, previous=None, at=stamp)
        return self._txn(row)

    def transition(self, txn_id: int, to: State, reason: str = "", *,
                   platform_txn_id: str | None = None, funding_source: str | None = None,
                   auth_code: str | None = None) -> Txn:
        """Move a payment to `to` and write its outbox event, atomically. Raises IllegalTransition.

        `platform_txn_id` and `funding_source` are stored when given (a later move that does not
        know them keeps what was stored). `auth_code` is required for, and only kept by, a move to
        `deferred`.
        """
        to = State(to)
        if (to is S.DEFERRED) != (auth_code is not None):
            raise IllegalTransition("the payment code is kept exactly while a payment is deferred")
        with self._writing(f"to_{to}"):
            row = self._Payment.get_or_none(self._Payment.id == txn_id)
            if row is None:
                raise IllegalTransition(f"txn {txn_id} does not exist")
            current = State(row.state)
            if to not in TRANSITIONS[current]:
                raise IllegalTransition(f"txn {txn_id}: {current} -> {to} is not allowed")
            stamp = rfc3339(self._clock())
            row.state = str(to)
            row.reason = reason[:200]
            row.updated_at = stamp
            row.attempts = 0
            row.next_attempt_at = 0.0
            row.retry_note = ""
            if platform_txn_id:
                row.platform_txn_id = platform_txn_id
            if funding_source:
                row.funding_source = funding_source[:64]
            row.auth_code = auth_code
            row.save()
            self._event(row, previous=current, at=stamp)
        if current is S.DEFERRED:  # the code is erased from the table; now from the files
            with self._scrub_lock:
                self._erasures += 1
            self.scrub()
        return self._txn(row)

    def schedule(self, txn_id: int, next_attempt_at: float, note: str = "") -> None:
        """Record a resolution attempt that changed nothing, and why (`note`); no outbox event."""
        P = self._Payment
        with self._writing("schedule"):
            P.update(attempts=P.attempts + 1, next_attempt_at=next_attempt_at, retry_note=note[:200]).where(
                P.id == txn_id).execute()

    def _event(self, row, previous: State | None, at: str) -> None:
        txn = self._txn(row)
        payload = {"event_id": uuid.uuid4().hex, "type": "payment",
                   "store_id": self.store_id, "terminal_id": self.terminal_id,
                   **{k: v for k, v in txn.as_dict().items() if k not in ("created_at", "updated_at")},
                   "previous_state": str(previous) if previous else None, "at": at}
        self._Outbox.create(event_id=payload["event_id"], txn=row.id, kind="payment",
                            payload=json.dumps(payload, sort_keys=True), created_at=at)

    # --- reading --------------------------------------------------------------------------

    def _txn(self, row) -> Txn:
        return Txn(txn_id=row.id, out_trade_no=row.out_trade_no, order=row.order,
                   amount_fen=row.amount_fen, payment_type=row.payment_type, platform=row.platform,
                   code_masked=row.code_masked, state=State(row.state), reason=row.reason,
                   platform_txn_id=row.platform_txn_id, created_at=row.created_at,
                   updated_at=row.updated_at, attempts=row.attempts,
                   next_attempt_at=row.next_attempt_at, retry_note=row.retry_note, source=row.source,
                   funding_source=getattr(row, "funding_source", None), auth_code=row.auth_code)

    def _refuse_taken_order(self, order: str) -> None:
        P = self._Payment
        live = P.select(P.id, P.state).where(P.order == order, P.state.in_([str(s) for s in LIVE_STATES])).first()
        if live is not None:
            if live.state in (S.PAID, S.CANCEL_REQUESTED):
                raise Refused(f"order {order} is already paid (txn {live.id})")
            raise Refused(f"order {order} has a payment being resolved (txn {live.id})")

    @_reading
    def check_order_free(self, order: str) -> None:
        """Raise Refused when the order has a live payment (the rule `open_payment` enforces in its
        transaction; this early answer lets the till refuse an order ticket before any code)."""
        self._refuse_taken_order(order)

    @_reading
    def journal_id(self) -> str | None:
        row = self._Meta.get_or_none(self._Meta.key == "journal_id")
        return row.value if row else None

    @_reading
    def get(self, txn_id: int) -> Txn | None:
        row = self._Payment.get_or_none(self._Payment.id == txn_id)
        return self._txn(row) if row else None

    @_reading
    def by_order(self, order: str) -> list[Txn]:
        P = self._Payment
        return [self._txn(r) for r in P.select().where(P.order == order).order_by(P.id)]

    @_reading
    def code_used(self, code: str) -> bool:
        P = self._Payment
        return P.select().where(P.code_digest == self.digest(code)).exists()

    @_reading
    def recent(self, *, limit: int = 50, states: Iterable[State] | None = None) -> list[Txn]:
        """Newest first."""
        P = self._Payment
        q = P.select().order_by(P.id.desc()).limit(limit)
        if states is not None:
            q = q.where(P.state.in_([str(s) for s in states]))
        return [self._txn(r) for r in q]

    @_reading
    def open_txns(self) -> list[Txn]:
        """Payments not yet at an end, oldest first."""
        P = self._Payment
        q = P.select().where(P.state.in_([str(s) for s in OPEN_STATES])).order_by(P.id)
        return [self._txn(r) for r in q]

    @_reading
    def deferred_totals(self) -> tuple[int, int]:
        """(count, sum of fen) of payments accepted offline and not yet forwarded."""
        P = self._Payment
        row = P.select(pw.fn.COUNT(P.id), pw.fn.COALESCE(pw.fn.SUM(P.amount_fen), 0)).where(
            P.state == str(S.DEFERRED)).tuples().get()
        return int(row[0]), int(row[1])

    @_reading
    def events(self, txn_id: int | None = None) -> list[dict]:
        """Outbox payloads in commit order (all, or one payment's)."""
        O = self._Outbox
        q = O.select().order_by(O.id)
        if txn_id is not None:
            q = q.where(O.txn == txn_id)
        return [json.loads(r.payload) for r in q]


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

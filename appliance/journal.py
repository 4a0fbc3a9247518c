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
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import string
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Callable, Iterable

import peewee as pw

from appliance.errors import ApplianceError, IllegalTransition
from appliance.money import format_amount
from appliance.redact import mask


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
    auth_code: str | None = None

    def as_dict(self) -> dict:
        """The public view (CLI, head office): no digest, no code beyond its mask."""
        return {"txn_id": self.txn_id, "out_trade_no": self.out_trade_no, "order": self.order,
                "amount": format_amount(self.amount_fen), "amount_fen": self.amount_fen,
                "payment_type": self.payment_type, "platform": self.platform,
                "code_masked": self.code_masked, "state": str(self.state), "reason": self.reason,
                "platform_txn_id": self.platform_txn_id, "created_at": self.created_at,
                "updated_at": self.updated_at, "source": self.source}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _models(db: pw.Database):
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
        created_at = pw.CharField()
        updated_at = pw.CharField()
        attempts = pw.IntegerField(default=0)
        next_attempt_at = pw.FloatField(default=0.0)  # wall-clock epoch seconds
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


class Journal:
    """The durable store of one lane. Thread-safe: each thread gets its own SQLite connection.

    `clock` returns aware UTC datetimes (injectable for tests). Transitions use BEGIN IMMEDIATE
    so that two processes (the service and a `charge` command) serialise cleanly.
    """

    FILENAME = "journal.sqlite"

    def __init__(self, state_dir: Path, store_id: str, terminal_id: str,
                 clock: Callable[[], datetime] = utc_now):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / self.FILENAME
        self.store_id = store_id
        self.terminal_id = terminal_id
        self._clock = clock
        self.db = pw.SqliteDatabase(str(self.path), timeout=10, pragmas={
            "journal_mode": "wal", "synchronous": "full", "foreign_keys": 1})
        self._Meta, self._Seq, self._Payment, self._Outbox = _models(self.db)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with self.db.connection_context():
                self.db.create_tables([self._Meta, self._Seq, self._Payment, self._Outbox])
                with self.db.atomic("IMMEDIATE"):
                    row = self._Meta.get_or_none(self._Meta.key == "epoch")
                    if row is None:
                        alphabet = string.ascii_lowercase + string.digits
                        row = self._Meta.create(key="epoch",
                                                value="".join(secrets.choice(alphabet) for _ in range(3)))
                self._epoch = row.value
            self._code_key = self._load_code_key()
        except (OSError, pw.DatabaseError) as e:
            raise ApplianceError(f"cannot open the journal in {self.state_dir}: {e} "
                                 "(run as the service user, e.g. sudo -u appliance appliance ...)") from None

    def _load_code_key(self) -> bytes:
        """The device's secret for code digests, created on first use. Safe when two processes
        (the service and a `charge`) start at once: the key is written aside and linked into
        place, so nobody ever reads a half-written key."""
        path = self.state_dir / "code-digest.key"
        if not path.exists():
            tmp = path.with_name(f".code-digest.key.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_bytes(32).hex())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race; use its key
            finally:
                os.unlink(tmp)
        key = bytes.fromhex(path.read_text().strip())
        if len(key) != 32:
            raise ApplianceError(f"{path} is damaged ({len(key)} bytes, expected 32)")
        return key

    def close(self) -> None:
        """Close this thread's connection. Idempotent."""
        if not self.db.is_closed():
            self.db.close()

    # --- writing --------------------------------------------------------------------------

    def digest(self, code: str) -> str:
        return hmac.new(self._code_key, code.encode(), hashlib.sha256).hexdigest()[:40]

    def open_payment(self, *, order: str, amount_fen: int, payment_type: str, platform: str,
                     code: str, source: str = "scan") -> Txn:
        """Commit a new payment intent in state pending.

        Allocates the unique out_trade_no: `{store}_{terminal}_{YYYYMMDD}{epoch}{seq:06d}`, at most
        31 characters of [A-Za-z0-9_], valid for WeChat Pay (<= 32) and Alipay (<= 64).
        """
        now = self._clock()
        day = now.strftime("%Y%m%d")
        with self.db.atomic("IMMEDIATE"):
            seq = self._Seq.get_or_none(self._Seq.day == day)
            n = 1 if seq is None else seq.last + 1
            self._Seq.insert(day=day, last=n).on_conflict_replace().execute()
            stamp = rfc3339(now)
            row = self._Payment.create(
                out_trade_no=f"{self.store_id}_{self.terminal_id}_{day}{self._epoch}{n:06d}",
                order=order, amount_fen=amount_fen, payment_type=payment_type, platform=platform,
                code_masked=mask(code), code_digest=self.digest(code),
                state=str(S.PENDING),
                created_at=stamp, updated_at=stamp, source=source)
            self._event(row, previous=None, at=stamp)
        return self._txn(row)

    def transition(self, txn_id: int, to: State, reason: str = "", *,
                   platform_txn_id: str | None = None, auth_code: str | None = None) -> Txn:
        """Move a payment to `to` and write its outbox event, atomically. Raises IllegalTransition.

        `auth_code` is required for, and only kept by, a move to `deferred`.
        """
        to = State(to)
        if (to is S.DEFERRED) != (auth_code is not None):
            raise IllegalTransition("the payment code is kept exactly while a payment is deferred")
        with self.db.atomic("IMMEDIATE"):
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
            row.auth_code = auth_code
            row.save()
            self._event(row, previous=current, at=stamp)
        return self._txn(row)

    def schedule(self, txn_id: int, next_attempt_at: float, note: str = "") -> None:
        """Record a resolution attempt that changed nothing, and why (`note`); no outbox event."""
        P = self._Payment
        with self.db.atomic():
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
                   next_attempt_at=row.next_attempt_at, retry_note=row.retry_note, source=row.source, auth_code=row.auth_code)

    def get(self, txn_id: int) -> Txn | None:
        row = self._Payment.get_or_none(self._Payment.id == txn_id)
        return self._txn(row) if row else None

    def by_order(self, order: str) -> list[Txn]:
        P = self._Payment
        return [self._txn(r) for r in P.select().where(P.order == order).order_by(P.id)]

    def code_used(self, code: str) -> bool:
        P = self._Payment
        return P.select().where(P.code_digest == self.digest(code)).exists()

    def recent(self, *, limit: int = 50, states: Iterable[State] | None = None) -> list[Txn]:
        """Newest first."""
        P = self._Payment
        q = P.select().order_by(P.id.desc()).limit(limit)
        if states is not None:
            q = q.where(P.state.in_([str(s) for s in states]))
        return [self._txn(r) for r in q]

    def open_txns(self) -> list[Txn]:
        """Payments not yet at an end, oldest first."""
        P = self._Payment
        q = P.select().where(P.state.in_([str(s) for s in OPEN_STATES])).order_by(P.id)
        return [self._txn(r) for r in q]

    def deferred_totals(self) -> tuple[int, int]:
        """(count, sum of fen) of payments accepted offline and not yet forwarded."""
        P = self._Payment
        row = P.select(pw.fn.COUNT(P.id), pw.fn.COALESCE(pw.fn.SUM(P.amount_fen), 0)).where(
            P.state == str(S.DEFERRED)).tuples().get()
        return int(row[0]), int(row[1])

    def events(self, txn_id: int | None = None) -> list[dict]:
        """Outbox payloads in commit order (all, or one payment's)."""
        O = self._Outbox
        q = O.select().order_by(O.id)
        if txn_id is not None:
            q = q.where(O.txn == txn_id)
        return [json.loads(r.payload) for r in q]

"""Head office's database: every lane's events, latest status and day totals, and the rejects.

peewee models on a database chosen by URL (`playhouse.db_url`):

* `sqlite:///relative/path.sqlite` or `sqlite:////absolute/path.sqlite` (WAL, synchronous=FULL,
  a 10 s busy timeout, so that several ingest processes on one host can share the file);
* `postgresql://user[:password]@host:port/dbname` (psycopg2).

`DEFAULT_URL` is `hq.sqlite` in `$STATE_DIRECTORY` (what systemd's `StateDirectory=` sets), else
in the working directory.

Tables:

* `event`: one row per lane event (`txn`, `lane`, and `day_close`, the closing `daily` of a day),
  unique on `event_id`, the de-duplication key: a message delivered twice (QoS 1 is at least
  once) is stored once. `(store_id, terminal_id, seq)` is indexed, not unique: a lane whose
  journal was re-created starts its seq again from 1 with new event ids.
* `lane`: each lane's latest status message, as it arrived (the Last Will's `at` is the lane's
  connect time, older than the online statuses it replaces, so arrival order decides, not `at`).
* `daily`: each lane's latest `daily` per business date; a closed day is never replaced by running
  totals, and running totals only by ones as new (`as_of_seq`, then `at`).
* `reject`: messages that failed their schema, with the reason and a bounded, masked excerpt.
* `reconciliation`, `reconciliation_difference`, `bill_line`: `appliance hq reconcile`'s result
  per (Beijing day, platform), its differences, and the bill's lines as fetched (appliance/hq/
  reconcile.py); a re-run replaces the three together, in one transaction.

Every write is idempotent (insert-or-ignore, conditional upsert), the same on both databases, so
a redelivered message changes nothing. Third-party errors: peewee's OperationalError and
InterfaceError (connection lost, database locked) are `StoreUnavailable` (retryable); other
database errors are `StoreError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import peewee as pw
from playhouse.db_url import connect

from appliance.errors import ApplianceError
from appliance.redact import mask_digit_runs

#: Rows per INSERT statement (16 columns: far below SQLite's and PostgreSQL's parameter limits).
EVENTS_PER_INSERT = 200
#: The rejects table keeps this much of a bad payload (digit runs that could be a code masked).
EXCERPT_CHARS = 200
SQLITE_PRAGMAS = {"journal_mode": "wal", "synchronous": "full", "busy_timeout": 10_000, "foreign_keys": 1}


def default_url() -> str:
    """`sqlite:///` + hq.sqlite in $STATE_DIRECTORY (systemd StateDirectory=), else the working directory."""
    return "sqlite:///" + str(Path(os.environ.get("STATE_DIRECTORY") or ".") / "hq.sqlite")


class StoreError(ApplianceError):
    """Head office's database refused a statement (not a lost connection)."""


class StoreUnavailable(StoreError):
    """Head office's database cannot be reached or is locked. Retryable."""

    retryable = True


def redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def open_database(url: str, *, create: bool = True) -> pw.Database:
    """A peewee Database for `url` (not connected yet). Raises ConfigError for a URL it cannot use,
    or (`create` False) for an SQLite file that does not exist."""
    from appliance.errors import ConfigError

    scheme = urlsplit(url).scheme
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise ConfigError("hq.db", f"must be a sqlite:///path or postgresql://user@host:port/db URL, got {redacted(url)!r}")
    try:
        if scheme == "sqlite":
            path = url[len("sqlite:///"):]
            if not path:
                raise ConfigError("hq.db", "a sqlite URL needs a path: sqlite:///hq.sqlite")
            if not create and path != ":memory:" and not Path(path).is_file():
                raise ConfigError("hq.db", f"no head-office database at {path} (run appliance hq ingest first)")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return connect(url, pragmas=SQLITE_PRAGMAS)
        try:
            import psycopg2  # noqa: F401  (peewee would only say "driver not installed" at the first query)
        except ImportError:
            raise ConfigError("hq.db", "PostgreSQL needs the head-office extra: pip install 'lane-appliance[hq]' "
                                       "(psycopg2; the lane's image leaves it out)") from None
        return connect(url)
    except (ValueError, RuntimeError) as e:
        raise ConfigError("hq.db", f"{redacted(url)}: {e}") from None


def _models(db: pw.Database):
    class Base(pw.Model):
        class Meta:
            database = db

    class Event(Base):
        """One lane event. Columns besides `payload` are copies of its fields, for queries."""

        event_id = pw.CharField(max_length=32, unique=True)
        store_id = pw.CharField(max_length=8)
        terminal_id = pw.CharField(max_length=4)
        seq = pw.BigIntegerField()
        kind = pw.CharField(max_length=16)  # txn | lane | day_close
        txn_id = pw.BigIntegerField(null=True)
        out_trade_no = pw.CharField(max_length=64, null=True)  # the payment's key across journal re-creation
        business_date = pw.CharField(max_length=10)
        state = pw.CharField(max_length=32, null=True)  # txn: the payment's state; lane: the event's name
        payment_type = pw.CharField(max_length=32, null=True)
        funding_source = pw.CharField(max_length=64, null=True)
        amount_fen = pw.BigIntegerField(null=True)
        txn_kind = pw.CharField(max_length=8, null=True)
        at = pw.CharField(max_length=24)  # RFC 3339 UTC with milliseconds: sorts as text
        payload = pw.TextField()
        received_at = pw.CharField(max_length=24)

        class Meta:
            table_name = "event"
            indexes = ((("store_id", "terminal_id", "seq"), False),
                       (("business_date", "kind", "store_id"), False),
                       (("store_id", "terminal_id", "out_trade_no", "seq"), False),
                       (("out_trade_no",), False))  # reconcile: a bill's orders

    class Lane(Base):
        store_id = pw.CharField(max_length=8)
        terminal_id = pw.CharField(max_length=4)
        state = pw.CharField(max_length=16)
        at = pw.CharField(max_length=24)
        backlog = pw.BigIntegerField(null=True)
        last_ack_seq = pw.BigIntegerField(null=True)
        payload = pw.TextField()
        received_at = pw.CharField(max_length=24)

        class Meta:
            table_name = "lane"
            primary_key = pw.CompositeKey("store_id", "terminal_id")

    class Daily(Base):
        store_id = pw.CharField(max_length=8)
        terminal_id = pw.CharField(max_length=4)
        business_date = pw.CharField(max_length=10)
        closed = pw.BooleanField()
        as_of_seq = pw.BigIntegerField()
        at = pw.CharField(max_length=24)
        payload = pw.TextField()
        received_at = pw.CharField(max_length=24)

        class Meta:
            table_name = "daily"
            primary_key = pw.CompositeKey("store_id", "terminal_id", "business_date")

    class Reject(Base):
        topic = pw.TextField()
        reason = pw.TextField()
        payload = pw.TextField()  # an excerpt: at most EXCERPT_CHARS, digit runs masked
        received_at = pw.CharField(max_length=24, index=True)

        class Meta:
            table_name = "reject"

    class Reconciliation(Base):
        """One platform's reconciliation of one Beijing day (appliance/hq/reconcile.py)."""

        day = pw.CharField(max_length=10)
        platform = pw.CharField(max_length=64)
        kind = pw.CharField(max_length=32)  # the adapter kind
        method = pw.CharField(max_length=8)  # bill | query
        state = pw.CharField(max_length=16)  # reconcile.DayState: fetched, no_transactions, by_query, not_yet, error
        differences = pw.IntegerField()
        attempts = pw.IntegerField()
        checked_at = pw.CharField(max_length=24)
        next_try_at = pw.CharField(max_length=24, null=True)  # not_yet/error: when the schedule asks again
        error = pw.TextField(null=True)
        summary = pw.TextField()  # JSON: matched, fees, the bill's totals

        class Meta:
            table_name = "reconciliation"
            primary_key = pw.CompositeKey("day", "platform")

    class Difference(Base):
        day = pw.CharField(max_length=10)
        platform = pw.CharField(max_length=64)
        kind = pw.CharField(max_length=16)  # not_at_hq | not_on_bill | amount | state
        out_trade_no = pw.CharField(max_length=64)
        store_id = pw.CharField(max_length=8, null=True)  # known when head office has the order
        terminal_id = pw.CharField(max_length=4, null=True)
        movement = pw.CharField(max_length=8)  # payment | refund | revoked (what moved, or should have)
        hq_state = pw.CharField(max_length=32, null=True)
        hq_amount_fen = pw.BigIntegerField(null=True)
        bill_amount_fen = pw.BigIntegerField(null=True)
        platform_txn_id = pw.CharField(max_length=128, null=True)
        at = pw.CharField(max_length=24, null=True)  # the bill line's time (Beijing) or head office's event time
        detail = pw.TextField()

        class Meta:
            table_name = "reconciliation_difference"
            indexes = ((("day", "platform"), False),)

    class BillLine(Base):
        day = pw.CharField(max_length=10)
        platform = pw.CharField(max_length=64)
        out_trade_no = pw.CharField(max_length=64, index=True)
        platform_txn_id = pw.CharField(max_length=128)
        movement = pw.CharField(max_length=8)  # payment | refund | revoked
        amount_fen = pw.BigIntegerField()
        fee_fen = pw.BigIntegerField()
        at = pw.CharField(max_length=19)  # Beijing, "YYYY-MM-DD HH:MM:SS"
        state = pw.CharField(max_length=64)
        out_refund_no = pw.CharField(max_length=64)

        class Meta:
            table_name = "bill_line"
            indexes = ((("day", "platform"), False),)

    return Event, Lane, Daily, Reject, Reconciliation, Difference, BillLine


def excerpt(payload: bytes) -> str:
    """At most EXCERPT_CHARS of a payload, for the rejects table: invalid UTF-8 replaced, runs of
    16+ digits masked (they could be a payment code, though a lane never sends one)."""
    text = payload[:EXCERPT_CHARS * 4].decode("utf-8", "replace")
    text = mask_digit_runs(text)
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS - 1] + "…"


def _text(msg: dict) -> str:
    return json.dumps(msg, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_row(msg: dict, received_at: str, kind: str | None = None, text: str | None = None) -> dict:
    """The `event` row of a valid txn, lane or day_close (`kind`; default msg["kind"]) message;
    `text` is its payload as received (default: msg as compact JSON with sorted keys)."""
    kind = kind or msg["kind"]
    txn = kind == "txn"
    return {"event_id": msg["event_id"], "store_id": msg["store_id"], "terminal_id": msg["terminal_id"],
            "seq": msg["seq"], "kind": kind, "business_date": msg["business_date"], "at": msg["at"],
            "payload": text or _text(msg), "received_at": received_at,
            "txn_id": msg["txn_id"] if txn else None, "out_trade_no": msg["out_trade_no"] if txn else None,
            "state": msg["state"] if txn else msg.get("event"), "payment_type": msg.get("payment_type"),
            "funding_source": msg.get("funding_source"), "amount_fen": msg.get("amount_fen"),
            "txn_kind": msg.get("txn_kind")}


class Store:
    """Head office's tables on one database. Not thread-safe beyond peewee's per-thread
    connections: use one Store per writer thread.

    `atomic()` is a transaction; the `add_*` methods write one message each and are idempotent.
    Every method raises StoreUnavailable (retryable) or StoreError, never a peewee exception.
    """

    def __init__(self, url: str | None = None, *, create: bool = True):
        """`create` False (a reader): an SQLite file must exist already (ConfigError otherwise)."""
        self.url = url or default_url()
        self.db = open_database(self.url, create=create)
        (self.Event, self.Lane, self.Daily, self.Reject,
         self.Reconciliation, self.Difference, self.BillLine) = _models(self.db)
        if create:
            self.create_tables()

    def create_tables(self) -> None:
        """Create the tables and indexes that are missing (safe to run from several processes)."""
        with self.guard():
            for attempt in range(3):
                try:
                    self.db.create_tables([self.Event, self.Lane, self.Daily, self.Reject, self.Reconciliation,
                                           self.Difference, self.BillLine], safe=True)
                    return
                except (pw.IntegrityError, pw.ProgrammingError):  # PostgreSQL: a concurrent CREATE won
                    self.db.rollback() if self.db.in_transaction() else None
                    if attempt == 2:
                        raise

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    def guard(self):
        """A context manager that translates peewee's errors into StoreError / StoreUnavailable."""
        return _Guard(self)

    def atomic(self):
        return self.db.atomic()

    # --- writes (each inside the caller's transaction, or its own) ----------------------------

    def add_event(self, msg: dict, received_at: str, kind: str | None = None) -> None:
        """Store a txn, lane or day_close event once: nothing happens if its event_id is there."""
        self.add_events([event_row(msg, received_at, kind)])

    def add_events(self, rows: list[dict]) -> None:
        """Store `event_row`s, each once (a row whose event_id is there, or repeats in `rows`, is
        skipped), in statements of EVENTS_PER_INSERT rows."""
        for i in range(0, len(rows), EVENTS_PER_INSERT):
            self.Event.insert_many(rows[i:i + EVENTS_PER_INSERT]).on_conflict_ignore().execute()

    def set_status(self, msg: dict, received_at: str) -> None:
        """Keep `msg` as its lane's latest status (last arrival wins)."""
        L = self.Lane
        row = {"store_id": msg["store_id"], "terminal_id": msg["terminal_id"], "state": msg["state"],
               "at": msg["at"], "backlog": msg.get("backlog"), "last_ack_seq": msg.get("last_ack_seq"),
               "payload": _text(msg), "received_at": received_at}
        L.insert(row).on_conflict(conflict_target=[L.store_id, L.terminal_id],
                                  update={f: getattr(pw.EXCLUDED, f) for f in
                                          ("state", "at", "backlog", "last_ack_seq", "payload", "received_at")}
                                  ).execute()

    def set_daily(self, msg: dict, received_at: str) -> None:
        """Keep `msg` as its lane's totals of its business date, unless those kept are newer
        (closed beats running; then the higher as_of_seq; then the later `at`)."""
        D = self.Daily
        row = {"store_id": msg["store_id"], "terminal_id": msg["terminal_id"], "business_date": msg["business_date"],
               "closed": msg["closed"], "as_of_seq": msg["as_of_seq"], "at": msg["at"],
               "payload": _text(msg), "received_at": received_at}
        new = pw.EXCLUDED
        newer = ((new.closed & ~D.closed)
                 | ((new.closed == D.closed) & ((new.as_of_seq > D.as_of_seq)
                                                | ((new.as_of_seq == D.as_of_seq) & (new.at >= D.at)))))
        D.insert(row).on_conflict(conflict_target=[D.store_id, D.terminal_id, D.business_date],
                                  update={f: getattr(new, f) for f in
                                          ("closed", "as_of_seq", "at", "payload", "received_at")},
                                  where=newer).execute()

    def add_reject(self, topic: str, reason: str, payload: bytes, received_at: str) -> None:
        self.Reject.insert(topic=topic[:512], reason=reason[:1000], payload=excerpt(payload),
                           received_at=received_at).execute()


class _Guard:
    def __init__(self, store: Store):
        self.store = store

    def __enter__(self):
        return self.store

    def __exit__(self, tp, e, tb):
        if e is None or not isinstance(e, pw.PeeweeException):
            return False
        where = redacted(self.store.url)
        if isinstance(e, (pw.OperationalError, pw.InterfaceError)):
            raise StoreUnavailable(f"database {where} unavailable: {_first_line(e)}") from e
        raise StoreError(f"database {where} refused: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

"""`kind = "sandbox"`: an in-process payment platform with deterministic outcomes, no network.

It keeps its own ledger (`sandbox-ledger.sqlite` in the state directory, codes stored only as
SHA-256 digests) so that a query after a crash or restart sees what the "platform" did, exactly
like a real one would. Outcomes are chosen by the payment code's last two digits:

    ..00-..89  paid at once
    ..90       declined: NOTENOUGH (balance insufficient)
    ..91       declined: AUTHCODEEXPIRE (customer must refresh the code)
    ..92       USERPAYING: customer confirms a password; the 2nd query answers paid
    ..93       USERPAYING: customer gives up; the 2nd query answers declined (PAYERROR)
    ..94       SYSTEMERROR: every query stays unknown until the resolver reverses it
    ..95       platform unreachable: nothing is sent (ProviderUnavailable)
    ..96       charged, but the answer is lost (timeout): unknown, the 1st query answers paid
    ..97       slow: charged at once, answered after `slow_ms` (for crash-mid-payment tests)
    ..98       paid at once; a refund of it is only accepted (PROCESSING, like WeChat's): the
               1st `query_refund` answers PROCESSING, the 2nd and later SUCCESS

A paid trade's funding source (WeChat `bank_type` style) follows the last digit of its
out_trade_no: even "CFT" (the wallet's balance), odd "CMB_DEBIT" (a bank card). Every answer
carries the platform's code (`Outcome.code`) as a real platform would: "SUCCESS", "NOTENOUGH",
"AUTHCODEEXPIRE", "USERPAYING", "SYSTEMERROR", "PAYERROR", "ORDERNOTEXIST", "CLOSED", "REFUND",
"REVERSE_EXPIRE", ...

And by the amount: above `password_above` (default 1000.00, WeChat's password-free limit) the
customer must confirm a password, as for ..92. A paid trade younger than `reverse_window_s` is
reversed (refunded to the customer); an older one is refused by reverse and must be refunded.
Refunds are of the whole payment (`amount_fen == total_fen ==` the trade's amount); every other
trade's refund succeeds at once. A refund repeated with the same out_refund_no answers what the
first one did; `query_refund` of an out_refund_no it never got answers REFUNDNOTEXIST (declined).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from appliance import failpoints
from appliance.schema import (ANY_AMOUNT, DAY, FIRST_QUERY_AFTER, QUERY_EVERY, REVERSE_AFTER, SECONDS, Amount,
                              between, opt)
from appliance.errors import ProviderUnavailable
from appliance.payments import Outcome, PayRequest, Provider, ResolutionPolicy, Status, providers


@dataclass(frozen=True)
class SandboxOptions:
    latency_ms: int = opt(0, check=between(0, 60_000, "milliseconds"), doc="added to every call")
    slow_ms: int = opt(3000, check=between(0, 600_000, "milliseconds"), doc="answer delay for codes ending 97")
    password_above: Amount = opt(Amount(1000_00), check=ANY_AMOUNT, doc="larger amounts need the customer's password")
    reverse_window_s: float = opt(7 * DAY, check=between(0.0, 366 * DAY, SECONDS),
                                  doc="paid trades older than this need a refund")
    first_query_after_s: float = opt(0.5, check=FIRST_QUERY_AFTER)
    query_every_s: float = opt(0.5, check=QUERY_EVERY)
    reverse_after_s: float = opt(3.0, check=REVERSE_AFTER, doc="give up querying and reverse")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS trade (
    out_trade_no TEXT PRIMARY KEY,
    code_sha256 TEXT NOT NULL,
    amount_fen INTEGER NOT NULL,
    scenario TEXT NOT NULL,
    state TEXT NOT NULL,          -- PAYING, SUCCESS, CLOSED, PAYERROR, REFUND
    queries INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
)
"""
_REFUND_SCHEMA = """
CREATE TABLE IF NOT EXISTS refund (
    out_refund_no TEXT PRIMARY KEY,
    out_trade_no TEXT NOT NULL,
    amount_fen INTEGER NOT NULL,
    state TEXT NOT NULL,          -- PROCESSING, SUCCESS
    queries INTEGER NOT NULL DEFAULT 0
)
"""


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection):
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _ledger_failure_is_unknown(call):
    """The "platform" failing inside (its ledger cannot be read or written, e.g. its disk is full)
    answers SYSTEMERROR, as a real one would: never a sqlite3 exception through the port."""
    @functools.wraps(call)
    def guarded(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        except sqlite3.Error as e:
            return Outcome(Status.UNKNOWN, f"SYSTEMERROR: sandbox ledger failed ({e})", code="SYSTEMERROR")
    return guarded


def funding_source(out_trade_no: str) -> str:
    """The sandbox's funding source of a paid trade (see the module docstring)."""
    return "CMB_DEBIT" if out_trade_no[-1:] in ("1", "3", "5", "7", "9") else "CFT"


@providers.register("sandbox", SandboxOptions)
class SandboxProvider(Provider):
    kind = "sandbox"

    def __init__(self, name: str, options: SandboxOptions, state_dir: Path, *, sleep=time.sleep):
        super().__init__(name, ResolutionPolicy(
            first_query_after_s=options.first_query_after_s, query_every_s=options.query_every_s,
            reverse_after_s=options.reverse_after_s, retry_every_s=options.query_every_s))
        self.options = options
        self._path = Path(state_dir) / "sandbox-ledger.sqlite"
        self._sleep_for = sleep
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _sleep(self, seconds: float) -> None:
        """Wait out a configured delay. No delay is no call: sleep(0) still gives the CPU away."""
        if seconds > 0:
            self._sleep_for(seconds)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o600))  # private, like the journal
            self._db = sqlite3.connect(self._path, timeout=10, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # The ledger stands for a remote platform's books: it must survive the lane's process
            # being killed (the kill tests check "charged once" against it), which WAL commits do
            # at NORMAL too. Surviving a power cut is the platform's business, not this lane's:
            # FULL would add a third fdatasync to every payment that a real platform never costs.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA cache_size=-512")  # KiB: as the journal's, the lane's RSS stays flat
            self._db.execute(_SCHEMA)
            self._db.execute(_REFUND_SCHEMA)
        return self._db

    def _scenario(self, req: PayRequest) -> str:
        tail = req.auth_code[-2:]
        if tail in ("90", "91", "92", "93", "94", "95", "96", "97", "98"):
            return tail
        return "92" if req.amount_fen > self.options.password_above else "ok"

    @_ledger_failure_is_unknown
    def pay(self, req: PayRequest) -> Outcome:
        scenario = self._scenario(req)
        if scenario == "95":
            raise ProviderUnavailable("sandbox: platform unreachable (code ends 95)")
        self._sleep(self.options.latency_ms / 1000)
        state = {"ok": "SUCCESS", "90": "PAYERROR", "91": "PAYERROR", "96": "SUCCESS", "97": "SUCCESS",
                 "98": "SUCCESS"}.get(
            scenario, "PAYING")
        with self._lock:
            db = self._conn()
            row = db.execute("SELECT state FROM trade WHERE out_trade_no=?", (req.out_trade_no,)).fetchone()
            if row is not None:  # a retry of the same attempt: answer with what happened
                return self._answer(row[0], req.out_trade_no)
            db.execute("INSERT INTO trade VALUES (?,?,?,?,?,0,?)", (
                req.out_trade_no, hashlib.sha256(req.auth_code.encode()).hexdigest(), req.amount_fen,
                scenario, state, time.time()))
        failpoints.hit("platform.pay.done")  # the platform has the trade; its answer is not back yet
        if scenario == "97":
            self._sleep(self.options.slow_ms / 1000)
        if scenario == "90":
            return Outcome(Status.DECLINED, "NOTENOUGH: balance insufficient", code="NOTENOUGH")
        if scenario == "91":
            return Outcome(Status.DECLINED, "AUTHCODEEXPIRE: payment code expired, refresh it", code="AUTHCODEEXPIRE")
        if scenario == "96":
            return Outcome(Status.UNKNOWN, "timeout: no answer from the platform")  # no code: nothing came back
        if state == "PAYING":
            if scenario == "94":
                return Outcome(Status.UNKNOWN, "SYSTEMERROR: result unknown", code="SYSTEMERROR")
            return Outcome(Status.UNKNOWN, "USERPAYING: waiting for the customer's password", code="USERPAYING")
        return self._answer("SUCCESS", req.out_trade_no)

    @_ledger_failure_is_unknown
    def query(self, out_trade_no: str) -> Outcome:
        self._sleep(self.options.latency_ms / 1000)
        with self._lock:
            db = self._conn()
            row = db.execute("SELECT scenario, state, queries FROM trade WHERE out_trade_no=?",
                             (out_trade_no,)).fetchone()
            if row is None:
                return Outcome(Status.DECLINED, "ORDERNOTEXIST: the platform never received this trade",
                               code="ORDERNOTEXIST")
            scenario, state, queries = row
            queries += 1
            if state == "PAYING" and scenario in ("92", "93") and queries >= 2:
                state = "SUCCESS" if scenario == "92" else "PAYERROR"
            db.execute("UPDATE trade SET state=?, queries=? WHERE out_trade_no=?", (state, queries, out_trade_no))
        failpoints.hit("platform.query.done")
        if state == "PAYING" and scenario == "94":
            return Outcome(Status.UNKNOWN, "SYSTEMERROR: query failed, try again", code="SYSTEMERROR")
        return self._answer(state, out_trade_no)

    def _answer(self, state: str, out_trade_no: str) -> Outcome:
        if state == "SUCCESS":
            return Outcome(Status.PAID, "SUCCESS", platform_txn_id=f"sbx{out_trade_no}", code="SUCCESS",
                           funding_source=funding_source(out_trade_no))
        status, code, text = {
            "PAYING": (Status.UNKNOWN, "USERPAYING", "waiting for the customer's password"),
            "PAYERROR": (Status.DECLINED, "PAYERROR", "payment failed"),
            "CLOSED": (Status.DECLINED, "CLOSED", "trade closed"),
            "REFUND": (Status.REFUNDED, "REFUND", "trade refunded"),
        }[state]
        return Outcome(status, f"{code}: {text}", code=code)

    @_ledger_failure_is_unknown
    def reverse(self, out_trade_no: str) -> Outcome:
        self._sleep(self.options.latency_ms / 1000)
        with self._lock:
            db = self._conn()
            row = db.execute("SELECT state, created FROM trade WHERE out_trade_no=?", (out_trade_no,)).fetchone()
            if row is None:  # like WeChat: reversing an unknown trade just closes the number
                return Outcome(Status.REVERSED, "CLOSED: no such trade; number closed", code="SUCCESS")
            state, created = row
            if state == "REFUND":
                return Outcome(Status.REVERSED, "REFUND: already refunded", code="SUCCESS")
            if time.time() - created > self.options.reverse_window_s:
                return Outcome(Status.DECLINED, "REVERSE_EXPIRE: outside the reverse window, refund instead",
                               code="REVERSE_EXPIRE")
            new = "REFUND" if state == "SUCCESS" else "CLOSED"
            db.execute("UPDATE trade SET state=? WHERE out_trade_no=?", (new, out_trade_no))
        failpoints.hit("platform.reverse.done")
        return Outcome(Status.REVERSED, "SUCCESS: paid trade refunded to the customer" if new == "REFUND"
                       else "SUCCESS: unpaid trade closed", code="SUCCESS")

    @_ledger_failure_is_unknown
    def refund(self, out_trade_no: str, amount_fen: int, total_fen: int, out_refund_no: str) -> Outcome:
        self._sleep(self.options.latency_ms / 1000)
        with self._lock:
            db = self._conn()
            done = db.execute("SELECT state FROM refund WHERE out_refund_no=?", (out_refund_no,)).fetchone()
            if done is not None:  # a retry with the same out_refund_no: answer what the first one did
                return self._refund_answer(done[0])
            row = db.execute("SELECT state, amount_fen, scenario FROM trade WHERE out_trade_no=?",
                             (out_trade_no,)).fetchone()
            if row is None or row[0] not in ("SUCCESS", "REFUND"):
                return Outcome(Status.DECLINED, "TRADE_NOT_PAID: nothing to refund", code="TRADE_NOT_PAID")
            if total_fen != row[1]:
                return Outcome(Status.DECLINED, "INVALID_REQUEST: order total differs from the payment",
                               code="INVALID_REQUEST")
            if amount_fen != total_fen:
                return Outcome(Status.DECLINED, "INVALID_REQUEST: the sandbox refunds whole payments only",
                               code="INVALID_REQUEST")
            state = "PROCESSING" if row[2] == "98" and row[0] == "SUCCESS" else "SUCCESS"
            with _transaction(db):
                db.execute("INSERT INTO refund VALUES (?,?,?,?,0)", (out_refund_no, out_trade_no, amount_fen, state))
                if state == "SUCCESS":
                    db.execute("UPDATE trade SET state='REFUND' WHERE out_trade_no=?", (out_trade_no,))
        failpoints.hit("platform.refund.done")
        return self._refund_answer(state)

    @_ledger_failure_is_unknown
    def query_refund(self, out_trade_no: str, out_refund_no: str) -> Outcome:
        self._sleep(self.options.latency_ms / 1000)
        with self._lock:
            db = self._conn()
            row = db.execute("SELECT state, queries FROM refund WHERE out_refund_no=? AND out_trade_no=?",
                             (out_refund_no, out_trade_no)).fetchone()
            if row is None:
                return Outcome(Status.DECLINED, "REFUNDNOTEXIST: no such refund", code="REFUNDNOTEXIST")
            state, queries = row[0], row[1] + 1
            if state == "PROCESSING" and queries >= 2:
                state = "SUCCESS"
            with _transaction(db):
                db.execute("UPDATE refund SET state=?, queries=? WHERE out_refund_no=?", (state, queries, out_refund_no))
                if state == "SUCCESS":
                    db.execute("UPDATE trade SET state='REFUND' WHERE out_trade_no=?", (out_trade_no,))
        failpoints.hit("platform.query_refund.done")
        return self._refund_answer(state)

    @staticmethod
    def _refund_answer(state: str) -> Outcome:
        if state == "SUCCESS":
            return Outcome(Status.REFUNDED, "SUCCESS: refunded to the customer", code="SUCCESS")
        return Outcome(Status.UNKNOWN, "PROCESSING: refund accepted, not yet done", code="PROCESSING")

    def charges(self, code: str) -> int:
        """How many trades this code paid and kept (for tests: nobody is charged twice)."""
        with self._lock:
            digest = hashlib.sha256(code.encode()).hexdigest()
            return self._conn().execute(
                "SELECT COUNT(*) FROM trade WHERE code_sha256=? AND state='SUCCESS'", (digest,)).fetchone()[0]

    def trades(self) -> dict[str, tuple[str, str]]:
        """out_trade_no -> (state, code SHA-256) of every trade the "platform" has (for tests: the ledger
        the journal must agree with)."""
        with self._lock:
            rows = self._conn().execute("SELECT out_trade_no, state, code_sha256 FROM trade").fetchall()
        return {no: (state, digest) for no, state, digest in rows}

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

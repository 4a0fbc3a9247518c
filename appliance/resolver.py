"""Driving payments to a definite end: uncertain payments, cancels, offline-accepted payments.

`settle`, `drive_cancel` and `forward` are the platform steps shared by the till (first
attempt, while the cashier waits) and the `Resolver` (every later attempt, in the background,
also after a restart). Every step commits its outcome as a journal transition; a step that
learns nothing new only reschedules itself, so retries leave no events.

Time: every decision (when to query, when to give up and reverse, whether a deferred payment is
still within `forward_within_s`, when to retry) is taken on the monotonic clock through the
process's shared `InFlight` (appliance/inflight.py). A wall-clock step changes only timestamps.
The journal's `next_attempt_at`/`attempts`/`retry_note` are written for display only.

Rules (../shared/reference/payments.md §2.5, §3.4): an uncertain payment is never paid again;
it is queried until the platform's `reverse_after_s`, then reversed, and the reverse is repeated
until the platform answers definitely. A `pending` payment older than `stale_pending_s` was cut
off mid-call (crash, power loss) and is treated as unknown.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

from appliance import logs
from appliance.errors import (IllegalTransition, JournalError, ProviderError, ProviderMisconfigured,
                             ProviderUnavailable, Refused)
from appliance.inflight import InFlight
from appliance.journal import Journal, State, Txn
from appliance.payments import Outcome, PayRequest, Provider, Router, Status
from appliance.wakeup import Stop

log = logging.getLogger(__name__)

_PAY_TO_STATE = {Status.PAID: State.PAID, Status.DECLINED: State.DECLINED, Status.UNKNOWN: State.UNKNOWN}


def settle(journal: Journal, txn: Txn, outcome: Outcome) -> Txn:
    """Commit a pay/query outcome. Tolerates a concurrent move (pending -> unknown by the resolver,
    an end written by another process): the payment is then returned as journaled.

    UNKNOWN on an already unknown payment changes nothing and returns the payment as it is. The
    payment is read once, by the transaction that moves it (`Journal.move`); only an outcome that
    changes nothing, or a move another writer got in first, reads it again.
    """
    target = _PAY_TO_STATE[outcome.status] if outcome.status in _PAY_TO_STATE else None
    if outcome.status is Status.REFUNDED:  # queried a trade that was refunded: it was paid, then reversed
        target = State.REVERSED
    if target is None:
        return journal.get(txn.txn_id)
    try:
        previous, new = journal.move(txn.txn_id, target, outcome.reason, platform_txn_id=outcome.platform_txn_id,
                                     funding_source=outcome.funding_source)
    except IllegalTransition as e:
        current = journal.get(txn.txn_id)
        if current is None or current.state != target:
            log.error("txn %d: platform said %s but the journal has %s: %s", txn.txn_id, outcome.status,
                      current.state if current else "no such payment", e)
        return current
    _log_change(new, previous)
    return new


def refund_number(txn: Txn) -> str:
    """The out_refund_no of a payment's one refund: derived from its out_trade_no, so that every
    retry, also after a restart, asks for the same refund (and never for a second one)."""
    return f"{txn.out_trade_no}R"


def drive_cancel(journal: Journal, provider: Provider, txn: Txn, in_flight: InFlight, *,
                 refund_now: bool = True) -> Txn:
    """One attempt to cancel a `cancel_requested` payment: reverse, else refund.

    A refund may only be accepted (WeChat's always is): the payment then stays `cancel_requested`
    and becomes `refunded` only when `query_refund` says the refund succeeded. So an attempt after
    an earlier one (`attempts` > 0, kept in the journal across restarts) first asks `query_refund`
    about the payment's refund (`refund_number`): succeeded -> refunded; processing or no answer ->
    wait; failed or never requested -> reverse, else refund (again, with the same number). A
    refund the platform refuses puts the payment back to `paid`. When the platform answers
    nothing definite, the payment is due again after the platform's `retry_every_s`.

    `refund_now=False` (the till: one platform call per event, for the watchdog) leaves a refund
    that the reverse called for to the resolver, due at once."""
    out_refund_no = refund_number(txn)
    try:
        if txn.attempts:
            out = provider.query_refund(txn.out_trade_no, out_refund_no)
            if out.status is Status.REFUNDED:
                return _move(journal, txn, State.REFUNDED, out)
            if out.status is Status.UNKNOWN:
                return _retry_later(journal, in_flight, txn, provider.policy.retry_every_s,
                                    f"refund not finished: {out.reason}")
        out = provider.reverse(txn.out_trade_no)
        if out.status is Status.REVERSED:
            return _move(journal, txn, State.CANCELLED, out)
        if out.status is Status.DECLINED:  # outside the reverse window: refund instead
            if not refund_now:
                return _wait(journal, in_flight, txn, 0.0, f"reverse refused ({out.reason}); refunding")
            out = provider.refund(txn.out_trade_no, txn.amount_fen, txn.amount_fen, out_refund_no)
            if out.status is Status.REFUNDED:
                return _move(journal, txn, State.REFUNDED, out)
            if out.status is Status.DECLINED:
                return _move(journal, txn, State.PAID, Outcome(Status.PAID, f"cancel refused: {out.reason}",
                                                               code=out.code))
            return _retry_later(journal, in_flight, txn, provider.policy.retry_every_s,
                                f"refund not finished: {out.reason}")
    except ProviderError as e:
        out = Outcome(Status.UNKNOWN, f"{type(e).__name__}: {e}")
    return _retry_later(journal, in_flight, txn, provider.policy.retry_every_s, f"cancel still open: {out.reason}")


def forward(journal: Journal, provider: Provider, txn: Txn, in_flight: InFlight, store_id: str,
            terminal_id: str) -> Txn:
    """One attempt to send a payment accepted offline. The code is erased once the platform answered;
    while the platform is unreachable the payment is due again after `retry_every_s`."""
    req = PayRequest(txn.out_trade_no, txn.amount_fen, txn.auth_code or "", f"Order {txn.order}",
                     store_id, terminal_id)
    try:
        out = provider.pay(req)
    except ProviderUnavailable as e:
        return _retry_later(journal, in_flight, txn, provider.policy.retry_every_s, f"still offline: {e}")
    except ProviderMisconfigured as e:  # refused before the platform took it
        out = Outcome(Status.DECLINED, f"{type(e).__name__}: {e}")
    except ProviderError as e:  # it may have arrived (NoAnswer): the query decides
        out = Outcome(Status.UNKNOWN, f"{type(e).__name__}: {e}")
    pending = _move(journal, txn, State.PENDING, Outcome(Status.UNKNOWN, "forwarded"))
    return settle(journal, pending, out)


def _move(journal: Journal, txn: Txn, to: State, out: Outcome) -> Txn:
    """Commit a move from the state `txn` was read in. If another process (a `charge --wait`, a
    second resolver) moved it meanwhile, keep what it wrote: both acted on the same answers."""
    try:
        new = journal.transition(txn.txn_id, to, out.reason, platform_txn_id=out.platform_txn_id,
                                 funding_source=out.funding_source)
    except IllegalTransition:
        current = journal.get(txn.txn_id)
        if current.state == txn.state:
            raise  # a real programming error, not a race
        log.info("txn %d: already %s (moved by another process)", txn.txn_id, current.state,
                 extra=logs.state_of(current))
        return current
    _log_change(new, txn.state)
    return new


def _retry_later(journal: Journal, in_flight: InFlight, txn: Txn, after_s: float, why: str) -> Txn:
    """Logged once per problem (when it starts or changes, not on every retry)."""
    if why != txn.retry_note:
        log.warning("txn %d: %s; retrying every %gs", txn.txn_id, why, after_s)
    return _wait(journal, in_flight, txn, after_s, why)


def _wait(journal: Journal, in_flight: InFlight, txn: Txn, after_s: float, why: str) -> Txn:
    """Make `txn` due again in `after_s` monotonic seconds; record why (and when, in wall-clock
    time, for display only) in the journal. Returns the payment as journaled."""
    journal.schedule(txn.txn_id, in_flight.defer(txn, after_s), why)
    return journal.get(txn.txn_id)


def _log_change(txn: Txn, previous: State) -> None:
    level = logging.INFO if txn.state in (State.PAID, State.CANCELLED, State.REFUNDED) else logging.WARNING
    log.log(level, "txn %d: %s -> %s (%s) order %s %s code %s", txn.txn_id, previous, txn.state,
            txn.reason, txn.order, txn.out_trade_no, txn.code_masked, extra=logs.state_of(txn))


#: Seconds before a payment that could not be driven at all (no platform, adapter bug) is tried again.
PARK_S = 30.0
#: Seconds before a payment whose step could not be journaled (disk full) is tried again.
JOURNAL_RETRY_S = 1.0
#: Seconds before a scrub of erased codes that other connections kept from finishing is tried again.
SCRUB_RETRY_S = 1.0


class Resolver:
    """Background driver of every open payment in the journal.

    `step()` makes at most one platform call per due payment and returns the payments whose
    state changed; `on_change(txn)` is called for each (the service posts them to the till so
    the cashier sees the end of a payment the till gave up waiting for).

    Durations (`stale_pending_s`, `forward_within_s`, the platform's ResolutionPolicy) are
    seconds of the monotonic clock of `in_flight`, which the till of the same process shares.
    """

    def __init__(self, journal: Journal, router: Router, *, store_id: str, terminal_id: str,
                 stale_pending_s: float, forward_within_s: float, in_flight: InFlight | None = None,
                 on_change: Callable[[Txn], None] | None = None):
        self.journal = journal
        self.router = router
        self.store_id = store_id
        self.terminal_id = terminal_id
        self.stale_pending_s = stale_pending_s
        self.forward_within_s = forward_within_s
        self.in_flight = in_flight if in_flight is not None else InFlight()
        self.on_change = on_change or (lambda txn: None)
        self._journal_error = ""  # the journal failure last logged, so an outage is logged once
        self.journal_retry_s = JOURNAL_RETRY_S
        self.next_due_s = 0.0  # set by each step()

    def step(self, only: int | None = None) -> list[Txn]:
        """One pass over the open payments that are due (or just payment `only`).

        Sets `next_due_s`: seconds until the next attempt is due (0.0 after a pass that attempted
        something, as its outcome may be due at once; infinity when nothing open waits on a timer)."""
        changed = []
        next_due_s = math.inf
        mark = self.in_flight.mark()
        open_txns = self.journal.open_txns()
        self.in_flight.retain({t.txn_id for t in open_txns}, mark)
        for txn in open_txns:
            if only is not None and txn.txn_id != only:
                continue
            left = self.in_flight.due_in_s(txn)
            if left > 0:
                next_due_s = min(next_due_s, left)
                continue
            if not self.in_flight.claim(txn.txn_id):
                continue  # the till's platform call: its release wakes the resolver
            next_due_s = 0.0
            scope = logs.enter(txn)  # the platform calls and their lines carry its fields
            try:
                new = self._drive(txn)
            except JournalError as e:  # disk full (or the journal lost): nothing could be recorded;
                self.in_flight.defer(txn, self.journal_retry_s)  # try again soon, without writing that down
                if str(e) != self._journal_error:
                    log.error("txn %d: %s; retrying every %gs", txn.txn_id, e, self.journal_retry_s)
                    self._journal_error = str(e)
                continue
            except Exception as e:  # its platform was removed from the config, or an adapter bug:
                note = f"cannot resolve: {e}"  # park this payment, keep resolving the others
                if note != txn.retry_note:
                    log.error("txn %d: %s; retrying every %gs", txn.txn_id, note, PARK_S,
                              exc_info=not isinstance(e, Refused))
                _wait(self.journal, self.in_flight, txn, PARK_S, note)
                continue
            finally:
                self.in_flight.release(txn.txn_id, wake=False)
                logs.leave(scope)
            self._journal_error = ""
            if new.state != txn.state:
                changed.append(new)
                self.on_change(new)
        self.next_due_s = next_due_s
        return changed

    def _drive(self, txn: Txn) -> Txn:
        provider = self.router.by_name(txn.platform)
        policy = provider.policy
        age = self.in_flight.age_s(txn)
        if txn.state is State.PENDING:
            if age < self.stale_pending_s:
                return _wait(self.journal, self.in_flight, txn, self.stale_pending_s - age, "call in progress")
            return settle(self.journal, txn, Outcome(Status.UNKNOWN, "interrupted during the platform call"))
        if txn.state is State.CANCEL_REQUESTED:
            return drive_cancel(self.journal, provider, txn, self.in_flight)
        if txn.state is State.DEFERRED:
            if age > self.forward_within_s:
                return _move(self.journal, txn, State.DECLINED,
                             Outcome(Status.DECLINED, "not forwarded in time; not charged"))
            return forward(self.journal, provider, txn, self.in_flight, self.store_id, self.terminal_id)
        # UNKNOWN
        if age < policy.first_query_after_s:
            return _wait(self.journal, self.in_flight, txn, policy.first_query_after_s - age, "waiting to query")
        try:
            out = provider.query(txn.out_trade_no)
        except ProviderError as e:
            out = Outcome(Status.UNKNOWN, f"query failed: {e}")
        if out.status is not Status.UNKNOWN:
            return settle(self.journal, txn, out)
        if age < policy.reverse_after_s:
            return _wait(self.journal, self.in_flight, txn, policy.query_every_s, f"querying: {out.reason}")
        try:
            rev = provider.reverse(txn.out_trade_no)
        except ProviderError as e:
            rev = Outcome(Status.UNKNOWN, f"reverse failed: {e}")
        if rev.status is Status.REVERSED:
            return _move(self.journal, txn, State.REVERSED, rev)
        return _retry_later(self.journal, self.in_flight, txn, policy.retry_every_s,
                            f"still unknown, reverse: {rev.reason}")

    def run(self, stop: Stop) -> None:
        """Loop until stop is set. Survives any error of a single step (logged once per kind).

        Sleeps until the next payment is due, or until the process's `InFlight` reports a change
        (the till left a payment open, a stop): it never polls the journal. A scrub of erased codes
        that other connections delayed is tried again every SCRUB_RETRY_S until it succeeds."""
        last_error = None
        unhook = stop.on_set(self.in_flight.poke)
        try:
            while not stop.is_set():
                seen = self.in_flight.version()
                try:
                    self.step()
                    wait_s = self.next_due_s
                    if not self.journal.scrub():
                        wait_s = min(wait_s, SCRUB_RETRY_S)
                    last_error = None
                except Exception as e:  # keep resolving whatever else is open
                    if repr(e) != last_error:
                        log.exception("resolver step failed")
                        last_error = repr(e)
                    wait_s = self.journal_retry_s
                if wait_s > 0:
                    self.in_flight.wait_change(seen, None if wait_s == math.inf else wait_s)
        finally:
            unhook()

"""The till: the lane's state machine. One thread owns it; everything else posts events.

Lane states (what the next scan means):

    ready ──order ticket──> awaiting code ──payment code──> (platform call) ──> result ──> ready
      │                          └── order_timeout_s ──> ready
      └──cancel card──> awaiting cancel order ──order ticket──> (reverse/refund) ──> result ──> ready
                                 └── cancel_timeout_s ──> ready

The register's ArmCommand is an order ticket without the scan. An uncertain payment keeps the
lane in `resolving` (LED "working") while the resolver queries the platform; the cashier sees the
definite end, or a fault after the platform's reverse deadline (the resolver keeps going in the
background). `charge()` and `cancel()` are the same operations for the CLI and the register:
they validate, journal first, then call the platform.

Commands from outside the till's thread (the control socket, the register over MQTT) come in
through `post_command(ChargeCommand | CancelCommand | ArmCommand)`, which returns a Future: the
till's own thread runs them between scans, so one thread owns the lane. A command's result is
shown on the LED/buzzer when the lane is idle; while the cashier is mid-order (or waiting out a
payment) the lane and its signal are left alone. `ArmCommand` is the register pushing an order
instead of a ticket scan: it arms an idle lane exactly as the ticket would, and is refused on a
busy one.

Other threads may read `health()` (the lane state and its faults) at any time. Each fault source
raised or cleared is also written to the outbox as a `lane` event (`fault` / `fault_cleared`),
best effort: the journal may be the very thing at fault.
"""

from __future__ import annotations

import logging
import queue
import re
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator

from appliance import logs
from appliance.classify import Classification, Classifier
from appliance.errors import (BadInput, IllegalTransition, JournalError, JournalFull, JournalLost,
                              ProviderError, ProviderMisconfigured, ProviderUnavailable, Refused)
from appliance.indicator import Indicator, Signal
from appliance.journal import Journal, State, Txn
from appliance.money import format_amount
from appliance.payments import Outcome, PayRequest, Router, Status
from appliance.redact import mask_digit_runs, printable
from appliance.resolver import InFlight, drive_cancel, settle
from appliance.scan import Scan
from appliance.wakeup import Stop

log = logging.getLogger(__name__)

ORDER_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")

EXIT_CODES = {State.PAID: 0, State.CANCELLED: 0, State.REFUNDED: 0, State.DECLINED: 3, State.REVERSED: 3,
              State.UNKNOWN: 4, State.PENDING: 4, State.DEFERRED: 4, State.CANCEL_REQUESTED: 4}
#: States in which the cashier keeps waiting while the resolver drives the payment to an end.
AWAITING_END = frozenset({State.UNKNOWN, State.PENDING, State.CANCEL_REQUESTED})
#: Seconds between the idle lane's checks that its journal file is still the one it opened (every
#: journal write checks it too, so a payment never goes to a lost journal).
JOURNAL_CHECK_S = 1.0
#: The same while the file is watched (`run(journal_watched=True)`: appliance/filewatch.py posts a
#: check on every change), as a safety net only: an idle lane sleeps (issue 10).
JOURNAL_WATCHED_CHECK_S = 60.0
SIGNALS = {State.PAID: Signal.PAID, State.DECLINED: Signal.DECLINED, State.REVERSED: Signal.DECLINED,
           State.UNKNOWN: Signal.WORKING, State.PENDING: Signal.WORKING, State.DEFERRED: Signal.OFFLINE_QUEUED,
           State.CANCEL_REQUESTED: Signal.WORKING, State.CANCELLED: Signal.CANCELLED,
           State.REFUNDED: Signal.CANCELLED}


#: The state of a Result that armed the lane for an order (ArmCommand): no payment exists yet.
AWAITING_CODE = "awaiting_code"


@dataclass(frozen=True)
class Result:
    """The answer to a charge, cancel or arm: the journaled payment, a refusal (state "refused",
    txn None), or an armed lane (state AWAITING_CODE, txn None, `order` and `amount_fen` set)."""

    state: str  # a journal state, "refused" or AWAITING_CODE
    reason: str
    txn: Txn | None = None
    cancel: bool = False  # the answer to a cancel: "paid" then means the platform refused it
    order: str | None = None  # the armed order, when there is no txn to tell it
    amount_fen: int | None = None

    @property
    def exit_code(self) -> int:
        if self.txn is None:
            return 0 if self.state == AWAITING_CODE else 5
        return 3 if self.cancel and self.txn.state is State.PAID else EXIT_CODES[self.txn.state]

    @property
    def signal(self) -> Signal:
        if self.txn is None:
            return Signal.AWAITING_CODE if self.state == AWAITING_CODE else Signal.UNKNOWN_CODE
        return Signal.DECLINED if self.cancel and self.txn.state is State.PAID else SIGNALS[self.txn.state]

    def as_dict(self) -> dict:
        t = self.txn
        amount_fen = t.amount_fen if t else self.amount_fen
        return {"txn_id": t and t.txn_id, "out_trade_no": t and t.out_trade_no, "order": t.order if t else self.order,
                "payment_type": t and t.payment_type, "platform": t and t.platform,
                "amount": None if amount_fen is None else format_amount(amount_fen), "state": self.state,
                "reason": self.reason}

    @classmethod
    def of(cls, txn: Txn, cancel: bool = False) -> "Result":
        return cls(str(txn.state), txn.reason, txn, cancel)


@dataclass(frozen=True)
class OfflinePolicy:
    enabled: bool = False
    max_amount_fen: int = 0
    max_count: int = 0
    max_total_fen: int = 0


@dataclass(frozen=True)
class ChargeCommand:
    """Charge `code` for an order, from outside the till's thread. The code is kept out of repr."""

    order: str
    amount_fen: int
    code: str = field(repr=False)
    source: str = "command"


@dataclass(frozen=True)
class CancelCommand:
    """Cancel the paid payment of an order, from outside the till's thread."""

    order: str


@dataclass(frozen=True)
class ArmCommand:
    """The register pushes an order instead of a ticket scan: an idle lane then waits for the
    customer's payment code exactly as after that order's ticket (same checks, same timeout)."""

    order: str
    amount_fen: int


Command = ChargeCommand | CancelCommand | ArmCommand


# Lane states
@dataclass(frozen=True)
class _Ready:
    pass


@dataclass(frozen=True)
class _AwaitingCode:
    order: str
    amount_fen: int
    deadline: float


@dataclass(frozen=True)
class _AwaitingCancel:
    deadline: float


@dataclass(frozen=True)
class _Resolving:
    txn_id: int
    deadline: float
    cancel: bool


#: Each lane state by the name `health()` gives it (the `lane` of the MQTT status).
LANE_NAMES = {_Ready: "ready", _AwaitingCode: "awaiting_code", _AwaitingCancel: "awaiting_cancel",
              _Resolving: "resolving"}
#: Why a busy lane refuses an ArmCommand, by its state.
_BUSY = {_AwaitingCode: "the lane is mid order (waiting for a payment code)",
         _AwaitingCancel: "the lane is waiting for the order ticket of a cancel",
         _Resolving: "the lane is waiting out a payment being resolved"}
#: The longest fault reason kept (logged, shown by health(), written to the outbox).
FAULT_REASON_CHARS = 200


class Till:
    def __init__(self, *, journal: Journal, router: Router, classifier: Classifier, indicator: Indicator,
                 store_id: str, terminal_id: str, order_timeout_s: float = 60.0,
                 cancel_timeout_s: float = 30.0, duplicate_window_s: float = 10.0,
                 result_hold_s: float = 3.0, max_amount_fen: int = 50_000_00,
                 offline: OfflinePolicy = OfflinePolicy(), in_flight: InFlight | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.journal = journal
        self.router = router
        self.classifier = classifier
        self.indicator = indicator
        self.store_id = store_id
        self.terminal_id = terminal_id
        self.order_timeout_s = order_timeout_s
        self.cancel_timeout_s = cancel_timeout_s
        self.duplicate_window_s = duplicate_window_s
        self.result_hold_s = result_hold_s
        self.max_amount_fen = max_amount_fen
        self.offline = offline
        self.in_flight = in_flight or InFlight()
        self._clock = clock
        self._heartbeat: Callable[[], None] | None = None  # the watchdog ping, while run() runs
        self._next_journal_check = 0.0
        self._journal_timer_s = JOURNAL_CHECK_S  # how often the run loop wakes for it (see run())
        self._events: queue.Queue = queue.Queue()
        self._health_hooks: list[Callable[[], None]] = []
        self._lane: object = _Ready()
        self._hold_until = 0.0
        # source ("scanner", "platform", "journal", "journal-lost") -> reason. Replaced, never changed
        # in place, so that health() may copy it from any thread.
        self._faults: dict[str, str] = {}
        # digest -> when charged, oldest first (a code is added only when absent): a scan prunes
        # from the front what left the duplicate window, in O(1) per code however busy the lane.
        self._recent_codes: OrderedDict[str, float] = OrderedDict()
        self._handlers = {"scan": self.handle_scan, "fault": self._set_scanner_fault, "resolved": self._on_resolved,
                          "command": self._on_command, "wake": lambda arg: None,
                          "journal": self._check_journal_now}

    # --- events from other threads ------------------------------------------------------------

    def post_scan(self, scan: Scan) -> None:
        self._events.put(("scan", scan))

    def post_fault(self, reason: str | None) -> None:
        self._events.put(("fault", reason))

    def post_resolved(self, txn: Txn) -> None:
        self._events.put(("resolved", txn))

    @property
    def lane(self) -> object:
        """The lane state (what the next scan means); see the module docstring."""
        return self._lane

    @lane.setter
    def lane(self, new: object) -> None:
        changed = type(new) is not type(self._lane)
        self._lane = new
        if changed:
            self._health_changed()

    def on_health_change(self, hook: Callable[[], None]) -> None:
        """Call `hook()` (from the till's thread; it must not block) whenever what `health()`
        returns may have changed: the lane state or a fault. For status publishers, so that they
        need not poll `health()`."""
        self._health_hooks.append(hook)

    def _health_changed(self) -> None:
        for hook in self._health_hooks:
            hook()

    def post_journal_check(self) -> None:
        """The journal's file or directory changed (appliance/filewatch.py): check it now."""
        self._events.put(("journal", None))

    def post_command(self, command: Command) -> "Future[Result]":
        """Queue a charge or cancel for the till's thread. The Future gets its Result, or the
        exception it raised; it is cancelled if the till stops before running it (nothing done)."""
        future: Future[Result] = Future()
        self._events.put(("command", (future, command)))
        return future

    def run(self, stop: Stop, heartbeat: Callable[[], None] | None = None,
            heartbeat_every_s: float = 1.0, on_event: Callable[[], None] | None = None,
            journal_watched: bool = False) -> None:
        """Handle events in order until stop is set (a `Stop`: its set() wakes this loop).

        Between events the thread sleeps on its queue until the next deadline that is really due
        (an order's or a cancel's timeout, the end of a result's hold, the watchdog's next ping,
        the idle journal check) or the next event; `stop` wakes it at once. The journal check is
        due every JOURNAL_CHECK_S, or JOURNAL_WATCHED_CHECK_S with `journal_watched` (whoever
        watches the file posts `post_journal_check()` on each change).

        `on_event` (the status writer's poke) is called after each event is handled, from this
        thread: it must return at once.

        `heartbeat` (the systemd watchdog ping) is called from this loop every `heartbeat_every_s`,
        so it stops when the loop hangs, and again right before each platform call: one call may
        take its adapter's whole limit (at most half the watchdog interval,
        appliance/payments/http.py), and the till makes at most one platform call per event.
        """
        self._show_lane()
        self._heartbeat = heartbeat
        self.journal.defer_checkpoints()  # done after each result, not inside a payment's commit
        self._journal_timer_s = JOURNAL_WATCHED_CHECK_S if journal_watched else JOURNAL_CHECK_S
        unhook = stop.on_set(lambda: self._events.put(("wake", None)))
        next_beat = 0.0
        try:
            while not stop.is_set():
                now = self._clock()
                if heartbeat is not None and now >= next_beat:
                    heartbeat()
                    next_beat = now + heartbeat_every_s
                due = self._next_due()
                if heartbeat is not None:
                    due = min(due, next_beat)
                try:
                    kind, arg = self._events.get(timeout=max(0.0, due - self._clock()))
                except queue.Empty:
                    kind = None
                try:
                    if kind is not None:
                        self._handlers[kind](arg)
                        if on_event is not None and kind != "wake":
                            on_event()
                    self.tick()
                except Exception:  # a bug handling one event must not take the lane down
                    log.exception("till: handling %s failed", kind or "tick")
                    self._flash(Signal.FAULT)
        finally:
            unhook()
        self._cancel_queued_commands()

    def _next_due(self) -> float:
        """The clock time of the next thing `tick()` has to do: the lane's deadline, the end of a
        shown result, the next journal check."""
        due = self._next_journal_check + self._journal_timer_s - JOURNAL_CHECK_S
        if isinstance(self.lane, (_AwaitingCode, _AwaitingCancel, _Resolving)):
            due = min(due, self.lane.deadline)
        if self._hold_until:
            due = min(due, self._hold_until)
        return due

    def _cancel_queued_commands(self) -> None:
        """The loop stopped: commands it never started are cancelled, so nobody waits for them."""
        for kind, arg in self._queued():
            if kind == "command":
                arg[0].cancel()

    def drain(self) -> None:
        """Handle every queued event now (tests and the demo drive the till without a thread)."""
        for kind, arg in self._queued():
            self._handlers[kind](arg)

    def _queued(self) -> Iterator[tuple[str, object]]:
        """Take the queued events one by one, without waiting for more."""
        while True:
            try:
                yield self._events.get_nowait()
            except queue.Empty:
                return

    # --- scans ----------------------------------------------------------------------------------

    def handle_scan(self, scan: Scan) -> Result | None:
        """Act on one scan. Returns the charge/cancel result when the scan caused one."""
        now = self._clock()
        if scan.defect:
            log.warning("scan from %s rejected: %s", scan.source, scan.defect)
            self._flash(Signal.UNKNOWN_CODE)
            return None
        c = self.classifier.classify(scan.text)
        if c.kind == "unknown":
            log.warning("scan %s not understood: %s", c.masked, c.reason)
            self._flash(Signal.UNKNOWN_CODE)
            return None
        digest = None
        if c.kind == "payment":
            recent = self._recent_codes
            while recent and now - next(iter(recent.values())) >= self.duplicate_window_s:
                recent.popitem(last=False)
            digest = self.journal.digest(scan.text)
            if digest in self._recent_codes:  # the scanner stuttered
                log.info("scan %s repeated within %gs of its charge: ignored", c.masked, self.duplicate_window_s)
                return None
        if isinstance(self.lane, _Resolving):
            log.warning("scan %s ignored: txn %d is still being resolved", c.masked, self.lane.txn_id,
                        extra=logs.txn_id(self.lane.txn_id))
            self._flash(Signal.UNKNOWN_CODE)
            return None
        if c.kind == "command" and c.command == "cancel":
            log.info("cancel card: waiting for the order ticket to cancel")
            self.lane = _AwaitingCancel(now + self.cancel_timeout_s)
            self._show(Signal.AWAITING_CANCEL)
            return None
        if c.kind == "order":
            if isinstance(self.lane, _AwaitingCancel):
                self.lane = _Ready()
                return self._finish(self.cancel(c.order))
            self._take_order(c.order, c.amount_fen, now, "order ticket")
            return None
        # a payment code
        if not isinstance(self.lane, _AwaitingCode):
            why = "a cancel needs an order ticket" if isinstance(self.lane, _AwaitingCancel) else "no order pending"
            log.warning("payment code %s refused: %s", c.masked, why)
            self._flash(Signal.UNKNOWN_CODE)
            return None
        order, amount = self.lane.order, self.lane.amount_fen
        self._recent_codes[digest or self.journal.digest(scan.text)] = now
        self._show(Signal.WORKING)
        # The ticket's order was checked when it was scanned; open_payment checks it again, in the
        # transaction that opens the payment, against whatever another process did since.
        result = self._charge(order, amount, scan.text, scan.source, check_order=False, classified=c)
        if result.txn is None:
            if self._faults.keys() & {"journal", "journal-lost"}:  # nothing can be paid now: show why
                self.lane = _Ready()
                self._show_lane()
            else:  # code used before, or no platform for its type: the order still waits
                self._flash(Signal.UNKNOWN_CODE)
            return result
        self.lane = _Ready()
        return self._finish(result)

    def _take_order(self, order: str, amount_fen: int, now: float, via: str) -> Result:
        """Wait for a payment code for this order (`via`: "order ticket" or "charge command"), or
        refuse it (bad id, over the lane's limit, taken in the journal) and go back to ready."""
        try:
            self._check_order(order, amount_fen)
        except (BadInput, Refused) as e:
            log.warning("%s refused: %s", via, e)
            self.lane = _Ready()
            self._flash(Signal.UNKNOWN_CODE)
            return Result("refused", str(e), order=order, amount_fen=amount_fen)
        except JournalError as e:
            log.error("%s refused: %s", via, e)
            self._journal_failed(e)
            self.lane = _Ready()
            self._show_lane()
            return Result("refused", str(e), order=order, amount_fen=amount_fen)
        log.info("order %s: %s due, waiting for a payment code", order, format_amount(amount_fen),
                 extra=logs.order(order))
        self.lane = _AwaitingCode(order, amount_fen, now + self.order_timeout_s)
        self._show(Signal.AWAITING_CODE)
        return Result(AWAITING_CODE, "", order=order, amount_fen=amount_fen)

    def _finish(self, result: Result) -> Result:
        if result.txn is not None and result.txn.state in AWAITING_END:
            deadline = self.router.by_name(result.txn.platform).policy.reverse_after_s + 15.0
            self.lane = _Resolving(result.txn.txn_id, self._clock() + deadline, result.cancel)
            self._show(Signal.WORKING)
        else:
            self._flash(result.signal)
        self.journal.checkpoint_if_due()  # the cashier has the answer; the WAL's housekeeping now
        return result

    def _on_resolved(self, txn: Txn) -> None:
        self._set_fault("journal", None)  # the resolver could write again
        if isinstance(self.lane, _Resolving) and self.lane.txn_id == txn.txn_id:
            if txn.state not in AWAITING_END:
                cancel = self.lane.cancel
                self.lane = _Ready()
                self._flash(Result.of(txn, cancel).signal)

    # --- commands (control socket, register) ----------------------------------------------------

    def _on_command(self, item: tuple[Future, Command]) -> None:
        future, command = item
        if not future.set_running_or_notify_cancel():
            return  # its sender gave up before the till got to it
        try:
            result = self.execute(command)
        except BaseException as e:
            future.set_exception(e)
            raise  # logged by the run loop, which shows the fault
        future.set_result(result)

    def execute(self, command: Command) -> Result:
        """Run one command now, in the till's thread. Shows its outcome only if the lane is idle."""
        if isinstance(command, ArmCommand):
            return self._arm(command)
        idle = isinstance(self.lane, _Ready)
        if idle:
            self._show(Signal.WORKING)
        if isinstance(command, ChargeCommand):
            result = self.charge(command.order, command.amount_fen, command.code, source=command.source)
        else:
            result = self.cancel(command.order)
        if idle:
            return self._finish(result)
        log.info("%s for order %s: %s; not shown, the lane is busy with the cashier",
                 "cancel" if result.cancel else "charge", printable(command.order, 40), result.state,
                 extra=logs.state_of(result.txn) if result.txn is not None else None)
        return result

    def _arm(self, command: ArmCommand) -> Result:
        """An order pushed by the register: an idle lane takes it as it would the order's ticket; a
        busy one refuses it and its LED is left alone (the cashier's order is not broken)."""
        busy = _BUSY.get(type(self.lane))
        if busy is not None:
            log.warning("charge command for order %s refused: %s", printable(command.order, 40), busy)
            return Result("refused", f"{busy}; try again when it is ready", order=command.order,
                          amount_fen=command.amount_fen)
        return self._take_order(command.order, command.amount_fen, self._clock(), "charge command")

    def health(self) -> dict:
        """The lane's state and its raised faults ({source: reason}, reasons free of payment
        codes), as of now. Safe from any thread: a copy, never the till's own dict."""
        return {"lane": LANE_NAMES[type(self.lane)], "faults": dict(self._faults)}

    # --- operations (also used directly by the CLI) ---------------------------------------------

    def _check_order(self, order: str, amount_fen: int) -> None:
        self._check_order_id(order)
        if amount_fen > self.max_amount_fen:
            raise Refused(f"amount {format_amount(amount_fen)} exceeds this lane's limit "
                          f"{format_amount(self.max_amount_fen)}")
        self.journal.check_order_free(order)

    def charge(self, order: str, amount_fen: int, code: str, *, source: str = "command") -> Result:
        """Charge one payment code for an order. Journals the intent before calling the platform.

        Refusals (bad input, policy, a duplicate order or code, a journal that cannot take the
        payment) return state "refused" and charge nothing. When the platform's answer cannot be
        journaled (disk full), the payment stays pending for the resolver and the answer is
        "unknown" (exit 4) with the reason.
        """
        return self._charge(order, amount_fen, code, source, check_order=True)

    def _charge(self, order: str, amount_fen: int, code: str, source: str, *, check_order: bool,
                classified: Classification | None = None) -> Result:
        """`charge`; `check_order=False` when the order was checked already (its ticket's scan),
        which leaves the journal's own check inside the transaction that opens the payment;
        `classified`: the code's classification, when the scan that brought it made one."""
        try:
            if check_order:
                self._check_order(order, amount_fen)
            c = classified or self.classifier.classify(code)
            if c.kind != "payment":
                raise BadInput(f"{c.masked} is not a payment code: {c.reason or c.kind}")
            provider = self.router.route(c.payment_type)
            txn = self.journal.open_payment(order=order, amount_fen=amount_fen, payment_type=c.payment_type,
                                            platform=provider.name, code=code, source=source)
        except (BadInput, Refused) as e:
            log.warning("charge for order %s refused: %s", printable(order, 40), e)
            return Result("refused", str(e))
        except JournalError as e:
            self._journal_failed(e)
            log.error("charge for order %s refused: %s", printable(order, 40), e)
            return Result("refused", str(e))
        self._set_fault("journal", None)
        log.info("txn %d: pending, order %s %s %s via %s, code %s, %s", txn.txn_id, order,
                 format_amount(amount_fen), c.payment_type, provider.name, c.masked, txn.out_trade_no,
                 extra=logs.state_of(txn))
        req = PayRequest(txn.out_trade_no, amount_fen, code, f"Order {order}", self.store_id, self.terminal_id)
        self.in_flight.opened(txn.txn_id)  # its timeouts count from now, on the monotonic clock
        self.in_flight.claim(txn.txn_id)
        scope = logs.enter(txn)  # the lines until the payment is answered (adapters' too) carry its fields
        try:
            try:
                self._beat()
                outcome = provider.pay(req)
            except ProviderUnavailable as e:
                return Result.of(self._unreachable(txn, code, str(e)))
            except ProviderMisconfigured as e:
                log.error("txn %d: platform %s refused our configuration: %s", txn.txn_id, provider.name, e)
                self._set_fault("platform", f"platform {provider.name} misconfigured")
                outcome = Outcome(Status.DECLINED, f"platform configuration error: {e}")
            except ProviderError as e:  # NoAnswer: it may have arrived; the resolver queries it
                outcome = Outcome(Status.UNKNOWN, f"no answer: {e}")
            except Exception as e:  # an adapter bug must not lose track of a payment that may be charged
                log.exception("txn %d: platform call failed unexpectedly", txn.txn_id)
                outcome = Outcome(Status.UNKNOWN, f"adapter error: {type(e).__name__}")
            return Result.of(settle(self.journal, txn, outcome))
        except JournalError as e:  # the platform answered, the journal could not record it
            self._journal_failed(e)
            log.error("txn %d: the platform's answer could not be journaled (%s); it stays pending and is "
                      "resolved by query once the journal can be written", txn.txn_id, e)
            return Result("unknown", f"{e}; the payment is resolved by the resolver once there is room", txn)
        finally:
            self.in_flight.release(txn.txn_id)
            logs.leave(scope)

    def _journal_failed(self, e: JournalError) -> None:
        """Show the fault a journal failure calls for. A lost journal's fault never clears (only a
        restart, which then refuses to start, can help); any other (disk full, a failed write)
        clears when the journal takes a write again."""
        if isinstance(e, JournalLost):
            self._set_fault("journal-lost", str(e))
        else:
            self._set_fault("journal", "disk full" if isinstance(e, JournalFull) else str(e))

    def _unreachable(self, txn: Txn, code: str, why: str) -> Txn:
        p = self.offline
        count, total = self.journal.deferred_totals()
        refusal = None
        if not p.enabled:
            refusal = "offline acceptance is disabled"
        elif txn.amount_fen > p.max_amount_fen:
            refusal = f"amount above the offline limit {format_amount(p.max_amount_fen)}"
        elif count + 1 > p.max_count or total + txn.amount_fen > p.max_total_fen:
            refusal = "offline queue is full"
        if refusal:
            new = self.journal.transition(txn.txn_id, State.DECLINED, f"platform unreachable ({why}); {refusal}")
        else:
            new = self.journal.transition(txn.txn_id, State.DEFERRED, f"platform unreachable ({why}); "
                                          "accepted offline, will be forwarded", auth_code=code)
        log.warning("txn %d: pending -> %s (%s)", txn.txn_id, new.state, new.reason, extra=logs.state_of(new))
        return new

    def cancel(self, order: str) -> Result:
        """Cancel the paid payment of an order: reverse it, or refund it when too old to reverse.

        Refused (exit 5) when there is nothing to cancel, when another command moved the payment
        first, or when the journal cannot record the request."""
        try:
            self._check_order_id(order)
            txns = self.journal.by_order(order)
            paid = [t for t in txns if t.state is State.PAID]
            deferred = [t for t in txns if t.state is State.DEFERRED]
            if deferred:
                txn = self.journal.transition(deferred[-1].txn_id, State.CANCELLED, "cancelled before forwarding")
                log.info("txn %d: deferred -> cancelled, order %s", txn.txn_id, order, extra=logs.state_of(txn))
                self.in_flight.poke()  # its code was erased: the resolver retries a scrub this one left
                return Result.of(txn, cancel=True)
            if not paid:
                if any(t.state in (State.PENDING, State.UNKNOWN, State.CANCEL_REQUESTED) for t in txns):
                    raise Refused(f"order {order} has a payment being resolved; an unpaid one is reversed automatically")
                raise Refused(f"order {order} has no paid payment on this lane")
            provider = self.router.by_name(paid[-1].platform)
            txn = self.journal.transition(paid[-1].txn_id, State.CANCEL_REQUESTED, "cancel card")
        except IllegalTransition:  # another command moved it between our read and our write
            return Result("refused", f"order {order} is being cancelled or forwarded by another command", cancel=True)
        except (BadInput, Refused) as e:
            log.warning("cancel of order %s refused: %s", printable(order, 40), e)
            return Result("refused", str(e), cancel=True)
        except JournalError as e:
            self._journal_failed(e)
            log.error("cancel of order %s refused: %s", printable(order, 40), e)
            return Result("refused", str(e), cancel=True)
        log.info("txn %d: paid -> cancel_requested, order %s", txn.txn_id, order, extra=logs.state_of(txn))
        self.in_flight.claim(txn.txn_id)
        scope = logs.enter(txn)
        try:
            self._beat()  # one call here; a refund the reverse calls for is the resolver's, at once
            return Result.of(drive_cancel(self.journal, provider, txn, self.in_flight, refund_now=False),
                             cancel=True)
        except JournalError as e:
            self._journal_failed(e)
            return Result("unknown", f"{e}; the cancel is finished by the resolver once there is room", txn, True)
        finally:
            self.in_flight.release(txn.txn_id)
            logs.leave(scope)

    def _beat(self) -> None:
        """Ping the watchdog now (when running under systemd): a platform call follows."""
        if self._heartbeat is not None:
            self._heartbeat()

    def _check_order_id(self, order: str) -> None:
        if not ORDER_ID.fullmatch(order):
            raise BadInput(f"order {printable(order, 40)} must be 1-32 letters, digits, '_' or '-'")

    # --- timing and signals ---------------------------------------------------------------------

    def tick(self) -> None:
        now = self._clock()
        if now >= self._next_journal_check:  # show a lost journal at once, not at the next payment
            self._next_journal_check = now + JOURNAL_CHECK_S
            try:
                self.journal.check_file()
            except JournalLost as e:
                self._journal_failed(e)
        lane = self.lane
        if isinstance(lane, _AwaitingCode) and now >= lane.deadline:
            log.info("order %s: no payment code within %gs; back to ready", lane.order, self.order_timeout_s,
                     extra=logs.order(lane.order))
            self.lane = _Ready()
            self._show_lane()
        elif isinstance(lane, _AwaitingCancel) and now >= lane.deadline:
            log.info("cancel: no order ticket within %gs; back to ready", self.cancel_timeout_s)
            self.lane = _Ready()
            self._show_lane()
        elif isinstance(lane, _Resolving) and now >= lane.deadline:
            log.error("txn %d: still unresolved; lane freed, the resolver keeps going", lane.txn_id,
                      extra=logs.txn_id(lane.txn_id))
            self.lane = _Ready()
            self._flash(Signal.FAULT)
        if self._hold_until and now >= self._hold_until:
            self._hold_until = 0.0
            self._show_lane()

    def _check_journal_now(self, arg: object = None) -> None:
        """Make the next tick() check the journal file (the run loop ticks after every event)."""
        self._next_journal_check = 0.0

    def _lane_signal(self) -> Signal:
        if self._faults:
            return Signal.FAULT
        return {_AwaitingCode: Signal.AWAITING_CODE, _AwaitingCancel: Signal.AWAITING_CANCEL,
                _Resolving: Signal.WORKING}.get(type(self.lane), Signal.READY)

    def _show_lane(self) -> None:
        self._show(self._lane_signal())

    def _show(self, signal: Signal) -> None:
        self._hold_until = 0.0
        self.indicator.show(signal)

    def _flash(self, signal: Signal) -> None:
        """Show an outcome for result_hold_s, then whatever the lane state calls for."""
        self.indicator.show(signal)
        self._hold_until = self._clock() + self.result_hold_s

    def _set_scanner_fault(self, reason: str | None) -> None:
        self._set_fault("scanner", reason)

    def _set_fault(self, source: str, reason: str | None) -> None:
        """Raise (reason) or clear (None) the fault of one source; the LED shows FAULT while any is up.

        A reason is kept as a printable line of at most FAULT_REASON_CHARS with every run of 16+
        digits masked: it comes from adapters (a scanner's OSError, an SQLite message) and goes
        to the log, to health() and to head office, where a payment code must never appear.
        Each change is written to the outbox as a `fault` / `fault_cleared` lane event (the
        latter with the reason that cleared), best effort."""
        if reason:
            reason = printable(mask_digit_runs(reason), FAULT_REASON_CHARS)
        previous = self._faults.get(source)
        if reason == previous or not (reason or previous):
            return
        if reason:
            self._faults = {**self._faults, source: reason}
            log.error("fault: %s", reason)
        else:
            self._faults = {k: v for k, v in self._faults.items() if k != source}
            log.info("fault cleared: %s", source)
        self._lane_event("fault" if reason else "fault_cleared", {"source": source, "reason": reason or previous})
        self._health_changed()
        self._show_lane()

    def _lane_event(self, event: str, detail: dict) -> None:
        """Journal a lane event for head office, best effort: a journal that cannot take it (full,
        lost: often the fault being reported) is logged at debug and otherwise ignored."""
        try:
            self.journal.lane_event(event, detail)
        except JournalError as e:
            log.debug("lane event %s not journaled: %s", event, e)

"""`appliance hq reconcile`: each platform's daily bill, matched against the payments head office holds.

**The day** is a Beijing calendar day, the day the platforms' bills cover (appliance/payments/
bills.py), not a store's business date. Head office's side of it is every payment (one
`out_trade_no`, its txn events in seq order) of that platform with a money movement dated that day:

* its payment, dated by its first `paid` event;
* its money given back (state `cancelled` or `refunded`), dated as the platform dates it: WeChat
  by when the refund or reversal was asked for (the `cancel_requested` event), Alipay by when it
  was done (the final event). A reversal of an uncertain payment (`unknown` -> `reversed`) is not
  expected on any bill: if money was taken, the bill shows it taken and given back.

**Matching** is by `out_trade_no`, amounts in fen. Each bill line of the day is looked up among all
of head office's payments (any day), and each payment of the day must be on the bill. Differences:

* `not_at_hq`: a bill line for an order head office never saw: a lane's events are missing or
  delayed, or money was taken outside the appliance;
* `not_on_bill`: head office has a payment (or a refund) of the day that the bill lacks: we believe
  money moved and the platform does not;
* `amount`: both have it, the amounts differ (also: two payment lines for one order);
* `state`: both have the order, they disagree on what happened: paid here and given back there,
  declined or still open here and paid there, reversed here and kept there.

A movement that head office dates one side of midnight and the platform the other is found on the
other day's bill once that bill is stored (`bill_line`): it is not a difference. Until then (the
later day's bill is fetched the next morning) it is, and re-running the day clears it: the schedule
(`--due`) re-runs a day with differences once, after the next day's bill is stored.

**Platforms without a bill API** (kind jeepay): each payment of the day with an event that day is
queried instead, and its state compared (`by_query`). This cannot see money taken outside the
appliance, nor amounts or fees; the result says so.

**States** of a (day, platform): `fetched`, `no_transactions` (the platform says nothing moved;
head office's payments of the day are then all `not_on_bill`), `by_query`, all final; `not_yet`
(being generated) and `error` (unreachable, or a bill that failed its hash or parse) are tried
again on schedule: `[reconcile] retry_every_s` apart, never before 10:00 Beijing the next day,
for `retry_for_days`. A final result is replaced by a re-run's final result, never by a failed one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from appliance.errors import ApplianceError, ConfigError, ProviderError
from appliance.hq.store import Store
from appliance.journal import rfc3339
from appliance.money import format_amount
from appliance.payments import Provider, Status, make_provider
from appliance.payments.bills import (FETCH_FROM_HOUR, BillError, BillLine, BillState, BillTotals,
                                      beijing_day, check_day, day_start, totals_of)

log = logging.getLogger(__name__)

#: Exit codes of `appliance hq reconcile` besides the CLI's (1 error, 2 config): the worst platform's,
#: in this order of precedence: a bill error, differences, something to try later (EX_TEMPFAIL).
EXIT_OK, EXIT_DIFFERENCES, EXIT_ERROR, EXIT_LATER = 0, 3, 4, 75
#: Adapter kinds whose bills date a refund by when it was asked for; the others by when it was done.
REFUNDS_DATED_WHEN_ASKED = frozenset({"wechat_v3", "wechat_v2"})
#: Order numbers per query (well under SQLite's and PostgreSQL's parameter limits).
CHUNK = 500

HOLDS = frozenset({"paid", "cancel_requested"})  # money held
GIVEN_BACK = frozenset({"cancelled", "refunded"})  # paid, then given back by the lane
RETURNED = GIVEN_BACK | {"reversed"}  # states in which a return line is expected or allowed
OPEN = frozenset({"pending", "unknown", "deferred"})


class DayState(StrEnum):
    FETCHED = "fetched"
    NO_TRANSACTIONS = "no_transactions"
    BY_QUERY = "by_query"
    NOT_YET = "not_yet"
    ERROR = "error"

    @property
    def final(self) -> bool:
        return self in (DayState.FETCHED, DayState.NO_TRANSACTIONS, DayState.BY_QUERY)


class Kind(StrEnum):
    NOT_AT_HQ = "not_at_hq"
    NOT_ON_BILL = "not_on_bill"
    AMOUNT = "amount"
    STATE = "state"


#: For people: what each kind of difference means (the report and the web view print it).
MEANING = {
    Kind.NOT_AT_HQ: "on the bill, not at head office",
    Kind.NOT_ON_BILL: "at head office, not on the bill",
    Kind.AMOUNT: "amounts differ",
    Kind.STATE: "states disagree",
}


@dataclass(slots=True)
class Order:
    """Head office's view of one payment, from its txn events."""

    out_trade_no: str
    store_id: str
    terminal_id: str
    platform: str
    amount_fen: int
    state: str  # the latest event's
    paid_at: float | None = None  # the first `paid` event (Unix time)
    asked_at: float | None = None  # the first `cancel_requested` event
    done_at: float | None = None  # the `cancelled` or `refunded` event
    event_days: tuple = ()  # the Beijing days with an event of this payment

    def return_at(self, kind: str) -> float | None:
        """When the platform of adapter `kind` dates this payment's money given back (None: not given back)."""
        if self.state not in GIVEN_BACK:
            return None
        return self.asked_at if kind in REFUNDS_DATED_WHEN_ASKED and self.asked_at is not None else self.done_at


@dataclass
class Difference:
    kind: Kind
    out_trade_no: str
    movement: str  # payment | refund | revoked: what moved, or should have
    detail: str
    store_id: str | None = None
    terminal_id: str | None = None
    hq_state: str | None = None
    hq_amount_fen: int | None = None
    bill_amount_fen: int | None = None
    platform_txn_id: str | None = None
    at: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = str(self.kind)
        return d


@dataclass
class Result:
    """One platform's reconciliation of one day."""

    day: dt.date
    platform: str
    kind: str  # the adapter kind
    method: str  # bill | query
    state: DayState
    differences: list[Difference] = field(default_factory=list)
    matched: dict = field(default_factory=lambda: {"payments": 0, "paid_fen": 0, "returns": 0, "returned_fen": 0})
    fee_fen: int | None = None  # the bill's fees over its lines (None: no bill)
    stated: BillTotals | None = None  # what the bill states about itself (equal to its lines)
    lines: tuple[BillLine, ...] = ()
    error: str | None = None
    retryable: bool = False
    note: str = ""
    queried: int = 0  # by query: payments asked about
    next_try_at: float | None = None
    attempts: int = 1

    def summary(self) -> dict:
        return {"matched": self.matched, "fee_fen": self.fee_fen, "lines": len(self.lines),
                "stated": self.stated.as_dict() if self.stated else None, "note": self.note, "queried": self.queried}

    def as_dict(self) -> dict:
        m = self.matched
        return {"day": self.day.isoformat(), "platform": self.platform, "kind": self.kind, "method": self.method,
                "state": str(self.state), "final": self.state.final, "differences": [d.as_dict() for d in
                                                                                    self.differences],
                "matched": {**m, "paid": format_amount(m["paid_fen"]), "returned": format_amount(m["returned_fen"])},
                "fee_fen": self.fee_fen, "fee": None if self.fee_fen is None else format_amount(self.fee_fen),
                "lines": len(self.lines), "stated": self.stated.as_dict() if self.stated else None,
                "error": self.error, "note": self.note, "queried": self.queried, "attempts": self.attempts,
                "next_try_at": _rfc3339(self.next_try_at)}


# --- head office's side --------------------------------------------------------------------------


def rfc3339_at(t: float) -> str:
    """A Unix time as the events' `at` is written (journal.rfc3339: UTC, milliseconds), so it sorts with them."""
    return rfc3339(dt.datetime.fromtimestamp(t, dt.timezone.utc))


def _rfc3339(t: float | None) -> str | None:
    return None if t is None else rfc3339_at(t)


def _unix(at: str) -> float:
    return dt.datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


def load_orders(store: Store, day: dt.date, out_trade_nos=()) -> dict[str, Order]:
    """Head office's payments with an event in Beijing `day`, and those named in `out_trade_nos`,
    by out_trade_no, each from all its txn events (of any day)."""
    E = store.Event
    lo, hi = rfc3339_at(day_start(day)), rfc3339_at(day_start(day) + 86_400)
    near = [(day + dt.timedelta(days=k)).isoformat() for k in (-2, -1, 0, 1)]  # business dates it can carry
    numbers = set(out_trade_nos)
    orders: dict[str, Order] = {}
    with store.guard():
        numbers |= {n for (n,) in E.select(E.out_trade_no).distinct()
                    .where(E.kind == "txn", E.business_date.in_(near), E.at >= lo, E.at < hi).tuples()}
        ordered = sorted(numbers)
        for i in range(0, len(ordered), CHUNK):  # a chunk's events (payloads) at a time: memory stays bounded
            events = defaultdict(list)
            for row in E.select(E.out_trade_no, E.store_id, E.terminal_id, E.seq, E.state, E.amount_fen, E.at,
                                E.payload).where(E.kind == "txn", E.out_trade_no.in_(ordered[i:i + CHUNK])).tuples():
                events[row[0]].append(row)
            orders.update((number, _order(sorted(evs, key=lambda r: r[3]))) for number, evs in events.items())
    return orders


def _order(events: list[tuple]) -> Order:
    number, store_id, terminal_id, _, _, amount, _, payload = events[-1]
    intern = sys.intern  # a busy day holds 100,000 orders: their few distinct ids and states once each
    o = Order(number, intern(store_id), intern(terminal_id), intern(json.loads(payload).get("platform", "")), amount,
              intern(events[-1][4]))
    days = set()
    for _, _, _, _, state, _, at, _ in events:
        t = _unix(at)
        days.add(beijing_day(t))
        if state == "paid" and o.paid_at is None:
            o.paid_at = t
        elif state == "cancel_requested" and o.asked_at is None:
            o.asked_at = t
        elif state in GIVEN_BACK:
            o.done_at = t
    o.event_days = tuple(days)
    return o


def elsewhere(store: Store, day: dt.date, platform: str, numbers) -> dict[str, set[str]]:
    """For `numbers`: the movements ("payment", "return") stored bill lines of other days show."""
    B = store.BillLine
    out: dict[str, set[str]] = defaultdict(set)
    ordered = sorted(set(numbers))
    with store.guard():
        for i in range(0, len(ordered), CHUNK):
            q = B.select(B.out_trade_no, B.movement).where(B.platform == platform, B.day != day.isoformat(),
                                                           B.out_trade_no.in_(ordered[i:i + CHUNK])).tuples()
            for number, movement in q:
                out[number].add("payment" if movement == "payment" else "return")
    return out


# --- matching (pure) -----------------------------------------------------------------------------


def match(day: dt.date, platform: str, kind: str, lines, orders: dict[str, Order],
          other_days: dict[str, set[str]]) -> tuple[list[Difference], dict]:
    """The differences between `lines` (the bill of `day`) and head office's `orders`, and what
    matched. `other_days`: movements of an order found on other days' stored bills."""
    diffs: list[Difference] = []
    matched = {"payments": 0, "paid_fen": 0, "returns": 0, "returned_fen": 0}
    by_order: dict[str, list[BillLine]] = defaultdict(list)
    for line in lines:
        by_order[line.out_trade_no].append(line)

    for number, ls in by_order.items():
        o = orders.get(number)
        if o is None:
            diffs += [Difference(Kind.NOT_AT_HQ, number, str(x.kind), "on the bill, head office has no such "
                                 "payment: a lane's events are missing or delayed, or money was taken outside "
                                 "the appliance", bill_amount_fen=x.amount_fen, platform_txn_id=x.platform_txn_id,
                                 at=x.at) for x in ls]
            continue
        where = {"store_id": o.store_id, "terminal_id": o.terminal_id, "hq_state": o.state,
                 "hq_amount_fen": o.amount_fen}
        pays = [x for x in ls if not x.returns_money]
        backs = [x for x in ls if x.returns_money]
        if pays:
            paid, first = sum(x.amount_fen for x in pays), pays[0]
            common = {**where, "bill_amount_fen": paid, "platform_txn_id": first.platform_txn_id, "at": first.at}
            if o.state == "declined" or o.state in OPEN:
                diffs.append(Difference(Kind.STATE, number, "payment", f"{o.state} at head office, paid on the "
                                        "platform", **common))
            elif o.state == "reversed" and not backs and "return" not in other_days.get(number, ()):
                diffs.append(Difference(Kind.STATE, number, "payment", "reversed at head office, but the bill shows "
                                        "the money taken and not given back", **common))
            elif paid != o.amount_fen or len(pays) > 1:
                diffs.append(Difference(Kind.AMOUNT, number, "payment", f"{len(pays)} payment line(s) of "
                                        f"{format_amount(paid)} on the bill, {format_amount(o.amount_fen)} at "
                                        "head office", **common))
            else:
                matched["payments"] += 1
                matched["paid_fen"] += paid
        if backs:
            back, first = sum(x.amount_fen for x in backs), backs[0]
            common = {**where, "bill_amount_fen": back, "platform_txn_id": first.platform_txn_id, "at": first.at}
            movement = str(first.kind)
            if o.state not in RETURNED:
                why = ("the cancel is still open at head office" if o.state == "cancel_requested"
                       else f"{o.state} at head office")
                diffs.append(Difference(Kind.STATE, number, movement, f"{why}, money given back on the platform",
                                        **common))
            elif back != o.amount_fen:
                diffs.append(Difference(Kind.AMOUNT, number, movement, f"{format_amount(back)} given back on the "
                                        f"bill, {format_amount(o.amount_fen)} at head office", **common))
            else:
                matched["returns"] += len(backs)
                matched["returned_fen"] += back

    for o in orders.values():
        if o.platform != platform:
            continue
        have = {("return" if x.returns_money else "payment") for x in by_order.get(o.out_trade_no, ())}
        have |= other_days.get(o.out_trade_no, set())
        where = {"store_id": o.store_id, "terminal_id": o.terminal_id, "hq_state": o.state,
                 "hq_amount_fen": o.amount_fen}
        if o.paid_at is not None and beijing_day(o.paid_at) == day and "payment" not in have:
            diffs.append(Difference(Kind.NOT_ON_BILL, o.out_trade_no, "payment", "paid at head office, not on the "
                                    "platform's bill", at=rfc3339_at(o.paid_at), **where))
        back = o.return_at(kind)
        if back is not None and beijing_day(back) == day and "return" not in have:
            diffs.append(Difference(Kind.NOT_ON_BILL, o.out_trade_no, "refund", f"{o.state} at head office, the "
                                    "money given back is not on the platform's bill", at=rfc3339_at(back), **where))
    diffs.sort(key=lambda d: (d.kind, d.out_trade_no, d.movement))
    return diffs, matched


def by_query(provider: Provider, day: dt.date, orders: dict[str, Order]) -> Result:
    """A platform without a bill: each of its payments with an event on `day` queried, its state compared."""
    result = Result(day, provider.name, provider.kind, "query", DayState.BY_QUERY,
                    note=f"{provider.kind} has no bill API: each payment was queried and its state compared; "
                         "money taken outside the appliance, amounts and fees cannot be checked this way")
    failed = []
    for o in sorted(orders.values(), key=lambda o: o.out_trade_no):
        if o.platform != provider.name or day not in o.event_days:
            continue
        result.queried += 1
        try:
            out = provider.query(o.out_trade_no)
        except ProviderError as e:
            failed.append(f"{o.out_trade_no}: {e}")
            continue
        if out.status is Status.UNKNOWN:
            failed.append(f"{o.out_trade_no}: {out.reason or out.code}")
            continue
        why = _query_disagrees(o.state, out.status)
        where = {"store_id": o.store_id, "terminal_id": o.terminal_id, "hq_state": o.state,
                 "hq_amount_fen": o.amount_fen, "platform_txn_id": out.platform_txn_id}
        if why:
            result.differences.append(Difference(Kind.STATE, o.out_trade_no, "payment",
                                                 f"{why} ({out.code or out.status})", **where))
        elif o.state in HOLDS:
            result.matched["payments"] += 1
            result.matched["paid_fen"] += o.amount_fen
        elif o.state in GIVEN_BACK:
            result.matched["returns"] += 1
            result.matched["returned_fen"] += o.amount_fen
    if failed:
        result.state, result.retryable = DayState.ERROR, True
        result.error = f"{len(failed)} of {result.queried} queries had no definite answer: " + "; ".join(failed[:3])
    return result


def _query_disagrees(state: str, status: Status) -> str:
    """Why head office's state and the platform's query answer disagree ("" when they agree)."""
    if state in HOLDS and status is not Status.PAID:
        return f"{state} at head office, {status} on the platform"
    if state in RETURNED | {"declined"} and status is Status.PAID:
        return f"{state} at head office, paid on the platform"
    if state in OPEN and status is Status.PAID:
        return f"{state} at head office, paid on the platform"
    return ""


# --- one platform, one day -----------------------------------------------------------------------


def reconcile(store: Store, provider: Provider, day: dt.date, *, now: float | None = None) -> Result:
    """Fetch the bill (or query), match it, and return the result (not stored: `save`)."""
    now = time.time() if now is None else now
    check_day(day, now)
    if not provider.has_bill:
        return by_query(provider, day, load_orders(store, day))
    try:
        bill = provider.bill(day)
    except BillError as e:
        return Result(day, provider.name, provider.kind, "bill", DayState.ERROR, error=str(e), retryable=e.retryable)
    except ApplianceError as e:  # anything else an adapter raises: a fault of this attempt, named
        return Result(day, provider.name, provider.kind, "bill", DayState.ERROR, error=f"platform {provider.name}: "
                      f"bill of {day}: {e}", retryable=e.retryable)
    if bill.state is BillState.NOT_YET:
        return Result(day, provider.name, provider.kind, "bill", DayState.NOT_YET, note=bill.detail)
    orders = load_orders(store, day, {x.out_trade_no for x in bill.lines})
    diffs, matched = match(day, provider.name, provider.kind, bill.lines, orders,
                           elsewhere(store, day, provider.name, orders))
    state = DayState.FETCHED if bill.state is BillState.FETCHED else DayState.NO_TRANSACTIONS
    return Result(day, provider.name, provider.kind, "bill", state, diffs, matched,
                  fee_fen=totals_of(bill.lines).fee_fen if state is DayState.FETCHED else 0, stated=bill.totals,
                  lines=bill.lines, note=bill.detail)


def next_try(day: dt.date, now: float, retry_every_s: float, retry_for_days: int) -> float | None:
    """When to ask again for `day`'s bill: `retry_every_s` from now, not before 10:00 Beijing the next
    day; None once `retry_for_days` days have passed since the day ended."""
    ended = day_start(day) + 86_400
    if now - ended > retry_for_days * 86_400:
        return None
    return max(now + retry_every_s, ended + FETCH_FROM_HOUR * 3600)


def save(store: Store, result: Result, now: float) -> bool:
    """Store `result` as the day's for its platform, replacing what was there, in one transaction.
    A result that is not final never replaces a final one (only its attempt is counted). Returns
    whether the result was stored."""
    R, D, B = store.Reconciliation, store.Difference, store.BillLine
    day = result.day.isoformat()
    with store.guard(), store.atomic():
        old = R.get_or_none((R.day == day) & (R.platform == result.platform))
        result.attempts = (old.attempts + 1) if old else 1
        if old is not None and DayState(old.state).final and not result.state.final:
            R.update(attempts=result.attempts).where((R.day == day) & (R.platform == result.platform)).execute()
            return False
        for model in (R, D, B):
            model.delete().where((model.day == day) & (model.platform == result.platform)).execute()
        R.insert(day=day, platform=result.platform, kind=result.kind, method=result.method, state=str(result.state),
                 differences=len(result.differences), attempts=result.attempts, checked_at=rfc3339_at(now),
                 next_try_at=_rfc3339(result.next_try_at), error=result.error,
                 summary=json.dumps(result.summary(), ensure_ascii=False)).execute()
        for i in range(0, len(result.differences), 200):  # rows built a chunk at a time: a big day stays small
            D.insert_many([{"day": day, "platform": result.platform, **d.as_dict()}
                           for d in result.differences[i:i + 200]]).execute()
        for i in range(0, len(result.lines), 200):
            B.insert_many([{"day": day, "platform": result.platform, "out_trade_no": x.out_trade_no,
                            "platform_txn_id": x.platform_txn_id, "movement": str(x.kind), "amount_fen": x.amount_fen,
                            "fee_fen": x.fee_fen, "at": x.at, "state": x.state, "out_refund_no": x.out_refund_no}
                           for x in result.lines[i:i + 200]]).execute()
    return True


def stored(store: Store, day: dt.date | None = None) -> list[dict]:
    """The stored reconciliations (of `day`, or all), each with its differences, by day and platform."""
    R, D = store.Reconciliation, store.Difference
    q = R.select().order_by(R.day, R.platform)
    if day is not None:
        q = q.where(R.day == day.isoformat())
    out = []
    with store.guard():
        for r in q:
            diffs = [{k: getattr(d, k) for k in ("kind", "out_trade_no", "movement", "detail", "store_id",
                                                 "terminal_id", "hq_state", "hq_amount_fen", "bill_amount_fen",
                                                 "platform_txn_id", "at")}
                     for d in D.select().where((D.day == r.day) & (D.platform == r.platform))
                     .order_by(D.kind, D.out_trade_no, D.movement)]
            out.append({"day": r.day, "platform": r.platform, "kind": r.kind, "method": r.method, "state": r.state,
                        "final": DayState(r.state).final, "differences": diffs, "attempts": r.attempts,
                        "checked_at": r.checked_at, "next_try_at": r.next_try_at, "error": r.error,
                        "summary": json.loads(r.summary)})
    return out


# --- the command ---------------------------------------------------------------------------------


def due(store: Store, platforms: list[str], now: float, retry_for_days: int) -> list[tuple[dt.date, str]]:
    """The (day, platform) pairs the schedule should try now, among the last `retry_for_days` days
    (yesterday included): a day never tried; a day not final whose next try has come; and, once, a
    final day with differences after the next day's bill was stored (a movement on the other side
    of midnight, or a lane's late events, then match)."""
    R = store.Reconciliation
    yesterday = beijing_day(now) - dt.timedelta(days=1)
    days = [yesterday - dt.timedelta(days=k) for k in range(retry_for_days)]
    with store.guard():
        kept = {(r.day, r.platform): r for r in R.select().where(R.day.in_([d.isoformat() for d in days]))}
    out = []
    for day in sorted(days):
        for p in platforms:
            r = kept.get((day.isoformat(), p))
            after = kept.get(((day + dt.timedelta(days=1)).isoformat(), p))
            if r is None:
                out.append((day, p))
            elif not DayState(r.state).final:
                if r.next_try_at is not None and r.next_try_at <= rfc3339_at(now):
                    out.append((day, p))
            elif r.differences and after is not None and DayState(after.state).final \
                    and after.checked_at > r.checked_at:
                out.append((day, p))
    return out


def run_day(store: Store, providers: dict[str, Provider], day: dt.date, *, now: float, retry_every_s: float,
            retry_for_days: int) -> list[Result]:
    """Reconcile `day` for each of `providers` and store each result."""
    results = []
    for provider in providers.values():
        result = reconcile(store, provider, day, now=now)
        if not result.state.final:
            result.next_try_at = next_try(day, now, retry_every_s, retry_for_days)
        kept = save(store, result, now)
        _log(result, kept)
        results.append(result)
    return results


def _log(r: Result, kept: bool) -> None:
    where = f"reconcile {r.platform} {r.day}"
    if r.state is DayState.ERROR:
        log.error("%s: %s%s", where, r.error, "" if kept else " (the earlier final result is kept)")
    elif r.state is DayState.NOT_YET:
        log.info("%s: bill not yet available; next try %s", where, _rfc3339(r.next_try_at) or "by hand")
    elif r.differences:
        log.warning("%s: %s, %d difference(s)", where, r.state, len(r.differences))
    else:
        log.info("%s: %s, no differences", where, r.state)


def exit_code(results: list[Result]) -> int:
    if any(r.state is DayState.ERROR and not r.retryable for r in results):
        return EXIT_ERROR
    if any(r.differences for r in results):
        return EXIT_DIFFERENCES
    if any(not r.state.final for r in results):
        return EXIT_LATER
    return EXIT_OK


def render(results: list[Result]) -> str:
    """The results as text for a terminal."""
    out = []
    for r in results:
        m = r.matched
        head = f"{r.day} {r.platform} ({r.kind}, by {r.method}): {STATE_WORDS[r.state]}"
        if r.state.final:
            head += (f"; matched {m['payments']} payment(s) {format_amount(m['paid_fen'])}, {m['returns']} "
                     f"return(s) {format_amount(m['returned_fen'])}")
            head += f"; fees {format_amount(r.fee_fen)}" if r.fee_fen is not None else ""
            head += f"; {len(r.differences)} difference(s)" if r.differences else "; no differences"
        if r.error:
            head += f"\n  {r.error}"
        if r.next_try_at is not None:
            head += f"\n  next try {_rfc3339(r.next_try_at)}"
        elif not r.state.final:
            head += f"\n  no more tries are scheduled: run `appliance hq reconcile --date {r.day}` by hand"
        if r.note:
            head += f"\n  {r.note}"
        out.append(head)
        for d in r.differences:
            lane = f"lane {d.store_id}/{d.terminal_id}" if d.store_id else "no lane"
            amounts = " / ".join(f"{w} {format_amount(a)}" for w, a in (("head office", d.hq_amount_fen),
                                                                        ("bill", d.bill_amount_fen)) if a is not None)
            out.append(f"  {MEANING[d.kind]:<32} {d.movement:<8} {d.out_trade_no}  {amounts}  {lane}: {d.detail}")
    fees = [r for r in results if r.fee_fen is not None]
    if fees:
        out.append("Fees: " + ", ".join(f"{r.platform} {format_amount(r.fee_fen)}" for r in fees)
                   + f"; total {format_amount(sum(r.fee_fen for r in fees))}")
    return "\n".join(out) if out else "(no platforms to reconcile)"


STATE_WORDS = {DayState.FETCHED: "bill fetched", DayState.NO_TRANSACTIONS: "no transactions on the bill",
               DayState.BY_QUERY: "reconciled by query", DayState.NOT_YET: "bill not yet available",
               DayState.ERROR: "failed"}


def as_json(results: list[Result]) -> dict:
    fees = {r.platform: r.fee_fen for r in results if r.fee_fen is not None}
    return {"results": [r.as_dict() for r in results],
            "fees": {"per_platform": fees, "total_fen": sum(fees.values()),
                     "total": format_amount(sum(fees.values()))}}


def make_providers(file, names: list[str] | None, state_dir: Path) -> dict[str, Provider]:
    """The `[providers]` of head office's config (those `names`, or all). Raises ConfigError."""
    if not file.providers:
        raise ConfigError("providers", "no merchant accounts are configured: add a [providers.NAME] table per "
                                       "platform, named as the lanes name it")
    for n in names or ():
        if n not in file.providers:
            raise ConfigError("providers", f"no [providers.{n}] in head office's config "
                                           f"(configured: {', '.join(sorted(file.providers))})")
    return {n: make_provider(n, p, state_dir) for n, p in sorted(file.providers.items()) if not names or n in names}


def run(store: Store, file, *, day: dt.date | None, platform: str | None, scheduled: bool, as_json_: bool,
        now: float | None = None) -> int:
    """`appliance hq reconcile`: `day` (default yesterday in Beijing), or with `scheduled` every
    (day, platform) that is due. Prints the results; returns the exit code (EXIT_*)."""
    now = time.time() if now is None else now
    providers = make_providers(file, [platform] if platform else None, Path(os.environ.get("STATE_DIRECTORY") or "."))
    cfg = file.reconcile
    results: list[Result] = []
    try:
        if scheduled:
            work = due(store, list(providers), now, cfg.retry_for_days)
            for d, name in work:
                results += run_day(store, {name: providers[name]}, d, now=now, retry_every_s=cfg.retry_every_s,
                                   retry_for_days=cfg.retry_for_days)
        else:
            day = day or beijing_day(now) - dt.timedelta(days=1)
            try:
                check_day(day, now)
            except ValueError as e:
                raise ConfigError("--date", str(e)) from None
            results = run_day(store, providers, day, now=now, retry_every_s=cfg.retry_every_s,
                              retry_for_days=cfg.retry_for_days)
    finally:
        for p in providers.values():
            p.close()
        store.close()
    print(json.dumps(as_json(results), ensure_ascii=False) if as_json_ else
          render(results) if results else "nothing is due")
    return exit_code(results)


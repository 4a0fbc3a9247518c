"""For reconciliation tests: a shop that drives a real adapter the way a lane does, on a settable clock,
and stores the txn events the lane would send into head office's database.

The ledger of the simulator and the events share the clock, so a day of payments can be made in
the past (the bill of a day exists only from the next morning) and its bill fetched "the next day".
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from types import SimpleNamespace

from appliance.config import ProviderConfig
from appliance.hq.reconcile import rfc3339_at
from appliance.hq.store import Store
from appliance.money import format_amount
from appliance.payments import PayRequest, Provider, Status, make_provider, providers
from appliance.payments.bills import day_start
from appliance.resolver import refund_number
from appliance.schema import build
from test_schemas import TXN, changed

#: A Beijing day in the past whose bills the tests fetch.
DAY = dt.date(2026, 11, 20)
NOON = day_start(DAY) + 12 * 3600
NEXT_MORNING = day_start(DAY) + 86_400 + 10 * 3600
#: An adapter's time limits in these tests: a simulator on loopback answers at once.
FAST = {"connect_timeout_s": 1.0, "read_timeout_s": 2.0}

_numbers = itertools.count(1)


class Clock:
    """A settable clock (Unix seconds) for the simulator's ledger and the shop's events."""

    def __init__(self, t: float = NOON):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def tick(self, seconds: float = 60.0) -> float:
        self.t += seconds
        return self.t


class Shop:
    """One lane (S0001/L01) paying through `provider`, its events stored in `store` as the lane sends
    them (pending, then paid / declined / unknown; cancel_requested, then cancelled / refunded)."""

    def __init__(self, provider: Provider, store: Store, clock: Clock, *, code_prefix: str = "13",
                 store_id: str = "S0001", terminal_id: str = "L01"):
        self.provider, self.store, self.clock = provider, store, clock
        self.code_prefix, self.store_id, self.terminal_id = code_prefix, store_id, terminal_id
        self.seq = itertools.count(1)
        self.amounts: dict[str, int] = {}
        self.states: dict[str, str] = {}

    def code(self, scenario: str) -> str:
        return f"{self.code_prefix}{next(_numbers) + 10**9:014d}{scenario}"

    def number(self) -> str:
        return f"{self.store_id}_{self.terminal_id}_{dt.datetime.fromtimestamp(self.clock()):%Y%m%d}" \
               f"{uuid.uuid4().int % 10**12:012d}"

    def event(self, out_trade_no: str, state: str, *, platform: str | None = None, record: bool = True) -> None:
        previous = self.states.get(out_trade_no)
        self.states[out_trade_no] = state
        if not record:
            return
        kind = "refund" if state == "refunded" else "cancel" if state in ("cancel_requested", "cancelled") else "pay"
        fen = self.amounts[out_trade_no]
        msg = changed(TXN, event_id=uuid.uuid4().hex, seq=next(self.seq), store_id=self.store_id,
                      terminal_id=self.terminal_id, txn_id=1, out_trade_no=out_trade_no, state=state,
                      previous_state=previous, txn_kind=kind, amount_fen=fen, amount=format_amount(fen),
                      platform=platform or self.provider.name, business_date=DAY.isoformat(),
                      created_at=rfc3339_at(self.clock()), at=rfc3339_at(self.clock()))
        self.store.add_event(msg, rfc3339_at(self.clock()))

    def pay(self, scenario: str = "00", fen: int = 1000, *, record: bool = True) -> str:
        """A payment as the lane makes it; `record` False: head office never hears of it."""
        no = self.number()
        self.amounts[no] = fen
        self.event(no, "pending", record=record)
        out = self.provider.pay(PayRequest(no, fen, self.code(scenario), "Order", self.store_id, self.terminal_id))
        self.clock.tick(5)
        state = {Status.PAID: "paid", Status.DECLINED: "declined"}.get(out.status, "unknown")
        self.event(no, state, record=record)
        return no

    def reverse_unknown(self, no: str) -> None:
        """The resolver giving up on an uncertain payment: reverse it."""
        assert self.provider.reverse(no).status is Status.REVERSED
        self.clock.tick(5)
        self.event(no, "reversed")

    def cancel(self, no: str, *, refund: bool = False) -> None:
        """The cancel card, driven to its end as the resolver does: reverse the paid payment, refund
        it when the platform refuses the reverse (or at once with `refund`)."""
        self.clock.tick(60)
        self.event(no, "cancel_requested")
        if not refund:
            out = self.provider.reverse(no)
            if out.status is Status.REVERSED:
                self.event(no, "cancelled")
                return
            assert out.status is Status.DECLINED, out
        out = self.provider.refund(no, self.amounts[no], self.amounts[no], refund_number_of(no))
        while out.status is Status.UNKNOWN:  # accepted, processing: query until it is done
            self.clock.tick(10)
            out = self.provider.query_refund(no, refund_number_of(no))
        assert out.status is Status.REFUNDED, out
        self.event(no, "refunded")

def refund_number_of(out_trade_no: str) -> str:
    """The lane's refund number of a payment (the resolver's rule reads out_trade_no only)."""
    return refund_number(SimpleNamespace(out_trade_no=out_trade_no))


def adapter(sim, name: str, tmp_path):
    """The real adapter of `sim`'s kind, configured through the schema as head office's config would be."""
    raw = dict(sim.provider_options())
    kind = raw.pop("kind")
    options = build(providers.get(kind, "kind").options, raw | FAST,
                    f"providers.{name}", tmp_path)
    return make_provider(name, ProviderConfig(kind, options), tmp_path)

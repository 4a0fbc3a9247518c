"""The journal checked against the platform's own ledger (the sandbox's): the proof after faults."""

from __future__ import annotations

from collections import Counter

from appliance.journal import OPEN_STATES, Journal, State
from appliance.payments.sandbox import SandboxProvider

#: What the platform may hold for a payment the journal has in each final state.
AGREES = {
    State.PAID: {"SUCCESS"},
    State.DECLINED: {None, "PAYERROR", "CLOSED"},  # None: refused before sending, or never forwarded
    State.REVERSED: {None, "CLOSED", "REFUND"},
    State.CANCELLED: {"REFUND", "CLOSED", None},  # None: cancelled before it was forwarded
    State.REFUNDED: {"REFUND"},
}


def check_against_ledger(journal: Journal, ledger: SandboxProvider) -> int:
    """Assert nothing lost (every trade the platform has is journaled), nobody charged twice (per
    code and per order), every payment final, and each final state agreeing with the platform.
    Returns how many payments were checked."""
    payments = {t.out_trade_no: t for t in journal.recent(limit=1_000_000)}
    trades = ledger.trades()
    lost = set(trades) - set(payments)
    assert not lost, f"charged at the platform with no journal record: {lost}"
    success = [no for no, (state, _) in trades.items() if state == "SUCCESS"]
    assert max(Counter(trades[no][1] for no in success).values(), default=0) <= 1, "a code charged twice"
    assert max(Counter(payments[no].order for no in success).values(), default=0) <= 1, "an order charged twice"
    for no, txn in payments.items():
        assert txn.state not in OPEN_STATES, f"{no} is still {txn.state}"
        held = trades.get(no, (None, None))[0]
        assert held in AGREES[txn.state], f"{no}: journal {txn.state}, platform {held}"
    return len(payments)

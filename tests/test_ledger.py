"""The simulators' shared books: the scenario table, single-use codes, reverse and refund rules."""

from __future__ import annotations

import pytest

from appliance.simulators.ledger import Decline, Ledger, RefundError, Reverse


def code(tail: str, serial: int = 0) -> str:
    return f"13{serial:014d}{tail}"


#: tail -> (state after pay, decline, state after the 1st query, after the 2nd query)
TABLE = {
    "00": ("SUCCESS", None, "SUCCESS", "SUCCESS"),
    "79": ("SUCCESS", None, "SUCCESS", "SUCCESS"),
    "80": ("SUCCESS", None, "SUCCESS", "SUCCESS"),
    "81": ("PAYING", None, "PAYING", "PAYING"),
    "82": ("PAYERROR", Decline.INVALID, "PAYERROR", "PAYERROR"),
    "90": ("PAYERROR", Decline.NOT_ENOUGH, "PAYERROR", "PAYERROR"),
    "91": ("PAYERROR", Decline.EXPIRED, "PAYERROR", "PAYERROR"),
    "92": ("PAYING", None, "PAYING", "SUCCESS"),
    "93": ("PAYING", None, "PAYING", "PAYING"),
    "94": ("SUCCESS", None, "SUCCESS", "SUCCESS"),
    "96": ("SUCCESS", None, "SUCCESS", "SUCCESS"),
    "97": ("SUCCESS", None, "SUCCESS", "SUCCESS"),
    "98": ("SUCCESS", None, "SUCCESS", "SUCCESS"),
}


@pytest.mark.parametrize("tail", TABLE)
def test_the_scenario_table(tail):
    after_pay, decline, q1, q2 = TABLE[tail]
    ledger = Ledger()
    trade, new = ledger.pay("T1", code(tail), 100)
    assert new and (trade.state, trade.decline) == (after_pay, decline)
    assert ledger.query("T1").state == q1
    assert ledger.query("T1").state == q2
    assert ledger.charges("T1") == (1 if q2 == "SUCCESS" else 0)


def test_above_the_password_free_limit_the_customer_confirms_first():
    ledger = Ledger(password_above_fen=1000_00)
    assert ledger.pay("T1", code("00"), 1000_01)[0].state == "PAYING"
    assert ledger.pay("T2", code("00", 1), 1000_00)[0].state == "SUCCESS"
    ledger.query("T1")
    assert ledger.query("T1").state == "SUCCESS"


def test_a_repeated_out_trade_no_charges_nothing_more():
    ledger = Ledger()
    first, new = ledger.pay("T1", code("00"), 100)
    again, new_again = ledger.pay("T1", code("00"), 100)
    assert new and not new_again and again is first and ledger.charges("T1") == 1


def test_a_code_is_single_use_even_after_a_decline():
    ledger = Ledger()
    ledger.pay("T1", code("90"), 100)
    trade, _ = ledger.pay("T2", code("90"), 100)
    assert (trade.state, trade.decline) == ("PAYERROR", Decline.CODE_USED)
    assert ledger.kept(code("90")) == 0


def test_reverse_closes_unpaid_refunds_paid_and_retries_when_scripted():
    ledger = Ledger()
    ledger.pay("PAID", code("00"), 100)
    ledger.pay("OPEN", code("93", 1), 100)
    ledger.pay("RETRY", code("81", 2), 100)
    assert ledger.reverse("PAID") == (Reverse.DONE, ledger.trades["PAID"]) and ledger.trades["PAID"].state == "REFUND"
    assert ledger.reverse("OPEN")[0] is Reverse.DONE and ledger.trades["OPEN"].state == "CLOSED"
    assert [ledger.reverse("RETRY")[0] for _ in range(3)] == [Reverse.RETRY, Reverse.RETRY, Reverse.DONE]
    assert ledger.trades["RETRY"].state == "CLOSED" and ledger.kept(code("00")) == 0


def test_a_reverse_before_the_pay_closes_the_number():
    ledger = Ledger()
    assert ledger.reverse("LATE")[0] is Reverse.DONE
    trade, new = ledger.pay("LATE", code("00"), 100)
    assert not new and trade.state == "CLOSED" and ledger.kept(code("00")) == 0


def test_outside_the_window_a_paid_trade_must_be_refunded():
    ledger = Ledger(reverse_window_s=-1.0)
    ledger.pay("T1", code("00"), 100)
    assert ledger.reverse("T1")[0] is Reverse.EXPIRED and ledger.trades["T1"].paid


def test_refunds():
    ledger = Ledger()
    ledger.pay("T1", code("00"), 100)
    ledger.pay("T2", code("98", 1), 100)
    ledger.pay("T3", code("93", 2), 100)
    assert ledger.refund("T3", "R3", 100) is RefundError.NOT_PAID
    assert ledger.refund("NONE", "R0", 100) is RefundError.NOT_PAID
    assert ledger.refund("T1", "R1", 100, total_fen=99) is RefundError.AMOUNT
    assert ledger.refund("T1", "R1", 101) is RefundError.AMOUNT
    r1 = ledger.refund("T1", "R1", 100, total_fen=100)
    assert r1.state == "SUCCESS" and ledger.trades["T1"].state == "REFUND"
    assert ledger.refund("T1", "R1", 100) is r1  # the same out_refund_no: the same refund
    assert ledger.refund("T1", "R1b", 1) is RefundError.AMOUNT  # nothing left to refund
    r2 = ledger.refund("T2", "R2", 100)
    assert r2.state == "PROCESSING" and ledger.trades["T2"].paid
    assert [ledger.query_refund("R2").state for _ in range(2)] == ["PROCESSING", "SUCCESS"]
    assert ledger.trades["T2"].state == "REFUND" and ledger.query_refund("NONE") is None


def test_a_partial_refund_leaves_the_trade_paid():
    ledger = Ledger()
    ledger.pay("T1", code("00"), 100)
    ledger.refund("T1", "R1", 40)
    assert ledger.trades["T1"].paid and ledger.kept(code("00")) == 1
    ledger.refund("T1", "R2", 60)
    assert ledger.trades["T1"].state == "REFUND"

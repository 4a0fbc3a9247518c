"""appliance/payments/wechat_bill.py: WeChat's bill file (v2 and v3) -> a checked Bill, table-driven
over the layouts of payments.md §8.3; and the simulators' writer read back by it."""

from __future__ import annotations

import datetime as dt
import gzip
import itertools
import time

import pytest

from appliance.payments import PayRequest, Status
from appliance.payments.bills import BillError, BillState, BillTotals, BillUnavailable, LineKind, beijing_day, \
    day_start
from appliance.payments.wechat_bill import parse_bill, unpacked
from appliance.simulators.ledger import Ledger
from appliance.simulators.wechat_bill import HEADER, SUMMARY_HEADER, bill_text, refusal, Refusal

DAY = dt.date(2026, 11, 20)
PLATFORM = "wx"

ALL = HEADER.split(",")
SUCCESS = ("交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,"
           "应结订单金额,代金券金额,商品名称,商户数据包,手续费,费率,订单金额,费率备注").split(",")
LEGACY = ("交易时间,公众账号ID,商户号,子商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,"
          "总金额,企业红包金额,微信退款单号,商户退款单号,退款金额,企业红包退款金额,退款类型,退款状态,商品名称,商户数据包,"
          "手续费,费率").split(",")
REFUND_LAYOUT = ALL[:14] + ["退款申请时间", "退款成功时间"] + ALL[14:]
ALL_SUMMARY = SUMMARY_HEADER.split(",")
SUCCESS_SUMMARY = ["总交易单数", "应结订单总金额", "手续费总金额", "订单总金额"]
LEGACY_SUMMARY = ["总交易单数", "总交易额", "总退款金额", "总企业红包退款金额", "手续费总金额"]

PAY = {"交易时间": "2026-11-20 10:00:01", "微信订单号": "4200000001", "商户订单号": "S1_L1_A1", "交易状态": "SUCCESS",
       "应结订单金额": "12.34", "订单金额": "12.34", "总金额": "12.34", "手续费": "0.07000", "特约商户号": "0"}
REFUND = {"交易时间": "2026-11-20 11:00:00", "微信订单号": "4200000002", "商户订单号": "S1_L1_A2", "交易状态": "REFUND",
          "应结订单金额": "0.00", "订单金额": "0.00", "总金额": "0.00", "微信退款单号": "5000000001",
          "商户退款单号": "R1", "退款金额": "6.00", "申请退款金额": "6.00", "退款状态": "PROCESSING",
          "手续费": "-0.04000"}
REVOKED = {**REFUND, "交易状态": "REVOKED", "商户退款单号": "", "退款状态": "SUCCESS", "微信订单号": "4200000003",
           "商户订单号": "S1_L1_A3"}


def text(header: list[str], rows: list[dict], summary_header: list[str], summary: dict, *, eol: str = "\r\n",
         tick: str = "`") -> bytes:
    """A bill file: the header, each row's values by header name (a missing amount 0.00, anything
    else empty), the summary."""
    def line(names, row):
        return ",".join(tick + row.get(n, "0.00" if "金额" in n else "") for n in names)
    return (eol.join([",".join(header), *(line(header, r) for r in rows), ",".join(summary_header),
                      line(summary_header, summary)]) + eol).encode()


def all_summary(lines="3", paid="12.34", returned="12.00", fee="-0.01000") -> dict:
    return {"总交易单数": lines, "应结订单总金额": paid, "退款总金额": returned, "充值券退款总金额": "0.00",
            "手续费总金额": fee, "订单总金额": paid, "申请退款总金额": returned}


GOOD_ALL = text(ALL, [PAY, REFUND, REVOKED], ALL_SUMMARY, all_summary())


# --- what a good bill reads as -------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    GOOD_ALL,
    text(ALL, [PAY, REFUND, REVOKED], ALL_SUMMARY, all_summary(), eol="\n"),
    text(ALL, [PAY, REFUND, REVOKED], ALL_SUMMARY, all_summary(), tick=""),  # no backticks at all
    text(REFUND_LAYOUT, [PAY, REFUND, REVOKED], ALL_SUMMARY, all_summary()),
    b"\xef\xbb\xbf" + GOOD_ALL + b"\r\n\r\n",  # a UTF-8 byte order mark, blank lines at the end
], ids=["ALL-CRLF", "ALL-LF", "no-backticks", "REFUND-layout", "BOM-and-blank-lines"])
def test_an_all_bill_reads_as_its_lines(data):
    bill = parse_bill(PLATFORM, DAY, data)
    assert bill.state is BillState.FETCHED and (bill.platform, bill.day) == (PLATFORM, DAY)
    assert [(x.kind, x.out_trade_no, x.amount_fen, x.fee_fen, x.state, x.out_refund_no) for x in bill.lines] == [
        (LineKind.PAYMENT, "S1_L1_A1", 1234, 7, "SUCCESS", ""),
        (LineKind.REFUND, "S1_L1_A2", 600, -4, "REFUND/PROCESSING", "R1"),
        (LineKind.REVOKED, "S1_L1_A3", 600, -4, "REVOKED/SUCCESS", ""),
    ]
    assert bill.lines[0].platform_txn_id == "4200000001" and bill.lines[0].at == "2026-11-20 10:00:01"
    assert bill.totals == BillTotals(lines=3, paid_fen=1234, returned_fen=1200, fee_fen=-1)


def test_the_success_only_layout():
    bill = parse_bill(PLATFORM, DAY, text(SUCCESS, [PAY, {**PAY, "商户订单号": "S1_L1_A9", "订单金额": "1.00",
                                                           "应结订单金额": "1.00", "手续费": "0.01000"}],
                                          SUCCESS_SUMMARY, {"总交易单数": "2", "应结订单总金额": "13.34",
                                                            "手续费总金额": "0.08000", "订单总金额": "13.34"}))
    assert [(x.kind, x.amount_fen) for x in bill.lines] == [(LineKind.PAYMENT, 1234), (LineKind.PAYMENT, 100)]
    assert bill.totals == BillTotals(lines=2, paid_fen=1334, returned_fen=None, fee_fen=8)


def test_the_legacy_layout_reads_总金额_and_its_summary():
    legacy_pay = {**PAY, "订单金额": "", "应结订单金额": "", "总金额": "12.34"}
    bill = parse_bill(PLATFORM, DAY, text(LEGACY, [legacy_pay, REFUND], LEGACY_SUMMARY,
                                          {"总交易单数": "2", "总交易额": "12.34", "总退款金额": "6.00",
                                           "总企业红包退款金额": "0.00", "手续费总金额": "0.03000"}))
    assert [(x.kind, x.amount_fen, x.fee_fen) for x in bill.lines] == [(LineKind.PAYMENT, 1234, 7),
                                                                       (LineKind.REFUND, 600, -4)]
    assert bill.totals == BillTotals(lines=2, paid_fen=1234, returned_fen=600, fee_fen=3)


def test_a_reversal_with_no_refund_amount_gives_back_the_order_amount():
    """Some bills write a REVOKED line with the order's amount and zero refund amounts. (Whether
    WeChat's 订单总金额 then counts it is not documented: this summary counts it as given back.)"""
    revoked = {**REVOKED, "退款金额": "0.00", "申请退款金额": "0.00", "订单金额": "5.00", "应结订单金额": "5.00"}
    bill = parse_bill(PLATFORM, DAY, text(ALL, [revoked], ALL_SUMMARY,
                                          all_summary("1", paid="0.00", returned="5.00", fee="-0.04000")))
    assert [(x.kind, x.amount_fen) for x in bill.lines] == [(LineKind.REVOKED, 500)]


# --- every malformed thing is a BillError naming the line ----------------------------------------


def replaced(data: bytes, old: str, new: str, count: int = 1) -> bytes:
    assert old.encode() in data
    return data.replace(old.encode(), new.encode(), count)


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"\r\n \r\n", "empty"),
    ("交易时间,微信订单号\r\n".encode(), "line 1: not a WeChat bill header"),
    (replaced(GOOD_ALL, "手续费,", "服务费,"), "line 1: not a WeChat bill header (no 手续费)"),
    (replaced(GOOD_ALL, "`12.34,", "`12.34,`x,"), "line 2: 28 columns, the header has 27"),
    (replaced(GOOD_ALL, "`6.00", "`6,00"), "line 3: 28 columns"),
    (replaced(GOOD_ALL, "`0.07000", "`0.07500"), "line 2: 手续费: an amount finer than a fen"),
    (replaced(GOOD_ALL, "`12.34", "`12.3x"), "line 2: 应结订单金额: not an amount in yuan: '12.3x'"),
    (replaced(GOOD_ALL, "`12.34", "`１２.34"), "line 2:"),
    (replaced(GOOD_ALL, "`SUCCESS", "`PAYERROR"), "line 2: 交易状态 'PAYERROR'"),
    (replaced(GOOD_ALL, "`2026-11-20 10:00:01", "`2026/11/20 10:00:01"), "line 2: 交易时间"),
    (GOOD_ALL.split("总交易单数".encode())[0], "no summary"),
    (GOOD_ALL.rsplit(b"`3", 1)[0], "line 5: a summary header without its summary line"),
    (GOOD_ALL + b"`extra\r\n", "line 7: text after the summary line"),
    (replaced(GOOD_ALL, "`3,", "`three,"), "line 6: 总交易单数: not a count"),
    (replaced(GOOD_ALL, "`3,", "`4,"), "lines 4 stated, 3 in the lines"),
    (replaced(GOOD_ALL, "`12.34,`12.00\r\n", "`12.35,`12.00\r\n"), "paid_fen 1235 stated, 1234 in the lines"),
    (replaced(GOOD_ALL, "`-0.01000", "`0.01000"), "fee_fen 1 stated, -1 in the lines"),
    (GOOD_ALL.decode().encode("gbk"), "line 1: not UTF-8"),
    (replaced(GOOD_ALL, "S1_L1_A2", "S1_L1_Ä2").replace("Ä".encode(), b"\xc4"), "line 3: not UTF-8"),
    (text(ALL, [PAY, {**REFUND, "退款金额": "0.00", "申请退款金额": "0.00"}], ALL_SUMMARY, all_summary()),
     "line 3: a REFUND line without a positive amount"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_malformed_bill_is_a_bill_error_naming_the_line(data, words):
    with pytest.raises(BillError) as e:
        parse_bill(PLATFORM, DAY, data)
    assert words in str(e.value)
    assert str(e.value).startswith(f"platform {PLATFORM}: bill of {DAY.isoformat()}: ")


# --- gzip or plain --------------------------------------------------------------------------------


def test_unpacked_takes_gzip_or_plain_and_refuses_broken_or_oversized_streams():
    packed = gzip.compress(GOOD_ALL)
    assert unpacked(PLATFORM, DAY, packed) == GOOD_ALL == unpacked(PLATFORM, DAY, GOOD_ALL)
    with pytest.raises(BillError, match="truncated"):
        unpacked(PLATFORM, DAY, packed[:-12])
    with pytest.raises(BillError, match="not a valid gzip stream"):
        unpacked(PLATFORM, DAY, packed[:10] + b"\xff" * 20)
    with pytest.raises(BillError, match="more than 100 bytes"):
        unpacked(PLATFORM, DAY, gzip.compress(b"0" * 10_000), limit=100)


# --- the simulators' file, read back ------------------------------------------------------------


class Clock:
    """A ledger's settable clock (seconds), for a day of payments in the past."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def past_day() -> dt.date:
    """The day the adapters' bill tests fill: ten days ago in Beijing (over, and within three months)."""
    return beijing_day(time.time()) - dt.timedelta(days=10)


def next_morning(day: dt.date, hour: float = 10.0) -> float:
    return day_start(day) + 86_400 + hour * 3600


_codes = itertools.count(1)


def a_day_of_payments(provider, clock: Clock, day: dt.date) -> list[tuple]:
    """Through a real WeChat adapter, from 10:00 Beijing of `day`: two payments, a refund of one
    (succeeded), a scenario-98 payment and its refund (still processing), a payment reversed, a
    declined payment. Returns the bill's lines as (kind, out_trade_no, amount_fen, state)."""
    clock.t = day_start(day) + 10 * 3600

    def pay(number: str, scenario: str, amount_fen: int) -> Status:
        clock.t += 600
        code = f"13{next(_codes):014d}{scenario}"
        return provider.pay(PayRequest(number, amount_fen, code, "Order", "S0001", "L01")).status

    assert pay("B1", "00", 1234) is Status.PAID
    assert pay("B2", "00", 2000) is Status.PAID
    provider.refund("B2", 500, 2000, "B2R1")
    assert pay("B3", "98", 600) is Status.PAID
    provider.refund("B3", 600, 600, "B3R1")
    assert pay("B4", "00", 500) is Status.PAID
    assert provider.reverse("B4").status is Status.REVERSED
    assert pay("B5", "90", 700) is Status.DECLINED
    return [(LineKind.PAYMENT, "B1", 1234, "SUCCESS"), (LineKind.PAYMENT, "B2", 2000, "SUCCESS"),
            (LineKind.REFUND, "B2", 500, "REFUND/SUCCESS"), (LineKind.PAYMENT, "B3", 600, "SUCCESS"),
            (LineKind.REFUND, "B3", 600, "REFUND/PROCESSING"), (LineKind.PAYMENT, "B4", 500, "SUCCESS"),
            (LineKind.REVOKED, "B4", 500, "REVOKED/SUCCESS")]


def a_billed_day(provider, ledger: Ledger, *, hour: float = 10.0) -> tuple[dt.date, list[tuple]]:
    """`a_day_of_payments` on `past_day()` with `ledger` on a settable clock, left at `hour` (Beijing)
    of the next morning. Returns the day and the lines its bill must list."""
    ledger.clock = Clock()
    day = past_day()
    expected = a_day_of_payments(provider, ledger.clock, day)
    ledger.clock.t = next_morning(day, hour)
    return day, expected


def bill_error(provider, day: dt.date, words: str) -> BillError:
    """The BillError (not BillUnavailable) `provider.bill(day)` raises, naming the platform and the day."""
    with pytest.raises(BillError) as e:
        provider.bill(day)
    assert not isinstance(e.value, BillUnavailable)
    assert str(e.value).startswith(f"platform {provider.name}: bill of {day.isoformat()}: ")
    assert words in str(e.value)
    return e.value


def check_fetched(bill, expected: list[tuple], ledger: Ledger) -> None:
    """The bill lists `expected`, each line's fee is the ledger's (negative when money went back),
    and the fees add up to the bill's own summary."""
    assert bill.state is BillState.FETCHED
    assert [(x.kind, x.out_trade_no, x.amount_fen, x.state) for x in bill.lines] == expected
    assert [x.fee_fen for x in bill.lines] == [ledger.fee_fen(a) * (-1 if k is not LineKind.PAYMENT else 1)
                                               for k, _, a, _ in expected]
    assert bill.totals.fee_fen == sum(x.fee_fen for x in bill.lines) == 7 + 12 - 3 + 4 - 4 + 3 - 3
    assert bill.totals.lines == len(expected)
    ids = {x.out_trade_no: x.platform_txn_id for x in bill.lines}
    assert all(ids[x.out_trade_no] == x.platform_txn_id == ledger.trades[x.out_trade_no].transaction_id
               for x in bill.lines)
    assert [x.out_refund_no for x in bill.lines if x.kind is LineKind.REFUND] == ["B2R1", "B3R1"]


def test_the_simulators_file_reads_back_with_fees_that_add_up():
    clock = Clock(day_start(DAY) + 10 * 3600)
    ledger = Ledger(clock=clock)
    ledger.pay("A1", "130000000000000100", 1234)
    ledger.pay("A2", "130000000000000298", 600)
    ledger.refund("A2", "R1", 250, 600)
    ledger.pay("A3", "130000000000000390", 500)  # declined: no line
    clock.t += 86_400
    ledger.pay("A4", "130000000000000400", 100)  # the next day: not in this bill
    data = bill_text(ledger, DAY, appid="wx0000000000000000", mchid="1900000109")
    assert data.count(b"\r\n") == 6 and data.count(b"\n") == 6 and b"`0," in data
    bill = parse_bill(PLATFORM, DAY, data)
    assert [(x.kind, x.out_trade_no, x.amount_fen, x.fee_fen) for x in bill.lines] == [
        (LineKind.PAYMENT, "A1", 1234, 7), (LineKind.PAYMENT, "A2", 600, 4), (LineKind.REFUND, "A2", 250, -2)]
    assert bill.totals.fee_fen == 9 == sum(x.fee_fen for x in bill.lines)
    with pytest.raises(BillError, match="paid_fen"):
        parse_bill(PLATFORM, DAY, bill_text(ledger, DAY, appid="wx", mchid="1", fault="summary"))
    with pytest.raises(BillError, match="line 1: not UTF-8"):
        parse_bill(PLATFORM, DAY, bill_text(ledger, DAY, appid="wx", mchid="1", fault="garbled"))


@pytest.mark.parametrize("now, day, expected", [
    ("2026-11-21 08:59:59", DAY, Refusal.CREATING),
    ("2026-11-21 09:00:00", DAY, Refusal.EMPTY),
    ("2026-11-20 23:00:00", DAY, Refusal.CREATING),
    ("2027-02-20 12:00:00", DAY, Refusal.EMPTY),  # three months back: still there
    ("2027-02-21 12:00:00", DAY, Refusal.OUT_OF_RANGE),
])
def test_when_a_day_has_a_bill(now, day, expected):
    at = dt.datetime.fromisoformat(now + "+08:00").timestamp()
    assert refusal(Ledger(clock=Clock(at)), day) is expected

"""A platform's daily bill (对账单): the optional call `Provider.bill(day)` and what it answers.

Contract for adapters whose platform has a bill API (`has_bill = True`):

  * `day` is one **Beijing** calendar day (UTC+8), the day the platform's bill covers. Callers
    never ask for today or a later day (`check_day`): the bill of a day exists only from the next
    morning (WeChat from 10:00, Alipay before 09:00; fetch after 10:00).
  * It answers a `Bill` in one of three states:
      - FETCHED: the lines, and the totals the bill states about itself, already checked against
        the lines (`check_totals`): a bill whose summary disagrees with its own lines is an error;
      - NOT_YET: the platform says the bill is still being generated (WeChat STATEMENT_CREATING,
        v2 "Bill Creating"; Alipay isp.bill_not_exist, which does not say whether the bill is
        late or the day was empty): ask again later, never in a loop;
      - NO_TRANSACTIONS: the platform says no money moved that day (WeChat NO_STATEMENT_EXIST,
        v2 "No Bill Exist").
  * It raises `BillError` (permanent for this attempt; it names the platform and the day): a
    download whose SHA-1 differs from the one announced, a file that does not parse, a summary that
    disagrees with the lines, a refusal of the request (a date out of range, no permission, our
    signature). Never an empty FETCHED bill in place of an error.
  * It raises `BillUnavailable` (a retryable BillError): the platform could not be reached, did not
    answer, answered 5xx, or its download link expired before use.
  * Amounts are integer fen; a line's `amount_fen` is positive (money in for a payment, money back
    for a refund or a reversal); `fee_fen` is signed (the platform's fee; negative when a refund
    gives fee back).
  * Time: at most two HTTP requests (ask for the link, download), each bounded by the adapter's
    gateway limits; a bill may be up to `MAX_BILL_BYTES`.

Platforms without a bill API (the aggregator) leave `has_bill` False: head office reconciles
their payments by query instead (appliance/hq/reconcile.py).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from enum import StrEnum

from appliance.errors import ProviderError

#: The bills' time zone: every platform here dates its bill lines in Beijing time.
BEIJING = dt.timezone(dt.timedelta(hours=8), "Asia/Shanghai")
#: The largest bill download accepted, in bytes (a busy merchant's day is a few MB uncompressed).
MAX_BILL_BYTES = 64 << 20
#: Hour (Beijing) from which the platforms advise fetching the previous day's bill.
FETCH_FROM_HOUR = 10


class BillState(StrEnum):
    FETCHED = "fetched"
    NOT_YET = "not_yet"  # being generated: ask again later
    NO_TRANSACTIONS = "no_transactions"  # no money moved that day


class LineKind(StrEnum):
    PAYMENT = "payment"  # money in (WeChat SUCCESS, Alipay 交易)
    REFUND = "refund"  # money back by a refund (WeChat REFUND, Alipay 退款)
    REVOKED = "revoked"  # money back by a reversal of a code payment (WeChat REVOKED)


@dataclass(frozen=True, slots=True)
class BillLine:
    """One line of a bill: one money movement of one order."""

    out_trade_no: str
    platform_txn_id: str  # WeChat 微信订单号, Alipay 支付宝交易号
    kind: LineKind
    amount_fen: int  # > 0: the payment's amount, or the amount given back
    fee_fen: int  # the platform's fee on this line; negative when fee is given back
    at: str  # the platform's time of the line, Beijing, "YYYY-MM-DD HH:MM:SS"
    state: str = ""  # the platform's own word for the line (WeChat 交易状态/退款状态, Alipay 业务类型)
    out_refund_no: str = ""  # the merchant's refund number (WeChat 商户退款单号, Alipay 退款批次号/请求号)

    @property
    def returns_money(self) -> bool:
        return self.kind is not LineKind.PAYMENT


@dataclass(frozen=True)
class BillTotals:
    """What a bill states about itself, or what its lines add up to. A field the bill does not
    state is None and is not compared."""

    lines: int | None = None  # all detail lines (WeChat 总交易单数)
    payments: int | None = None  # payment lines (Alipay 交易订单总笔数)
    returns: int | None = None  # refund and reversal lines (Alipay 退款订单总笔数)
    paid_fen: int | None = None  # the payments' amounts (WeChat 订单总金额)
    returned_fen: int | None = None  # the amounts given back (WeChat 申请退款总金额), positive
    net_fen: int | None = None  # paid - returned (Alipay 订单金额 合计)
    fee_fen: int | None = None  # the fees, net of fees given back (WeChat 手续费总金额, Alipay 服务费)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Bill:
    platform: str  # the configured provider name
    day: dt.date  # the Beijing day it covers
    state: BillState
    lines: tuple[BillLine, ...] = ()
    totals: BillTotals | None = None  # as the bill states them (FETCHED only); equal to the lines' sums
    detail: str = field(default="", compare=False)  # for people: the platform's answer, what was checked


class BillError(ProviderError):
    """A bill could not be had: the message names the platform and the day."""

    def __init__(self, platform: str, day: dt.date, reason: str):
        self.platform, self.day, self.reason = platform, day, reason
        super().__init__(f"platform {platform}: bill of {day.isoformat()}: {reason}")


class BillUnavailable(BillError):
    """The platform could not be reached, did not answer, or answered 5xx. Retryable."""

    retryable = True


def totals_of(lines: tuple[BillLine, ...] | list[BillLine]) -> BillTotals:
    """Every figure of `BillTotals`, summed over `lines`."""
    paid = sum(x.amount_fen for x in lines if not x.returns_money)
    returned = sum(x.amount_fen for x in lines if x.returns_money)
    payments = sum(1 for x in lines if not x.returns_money)
    return BillTotals(lines=len(lines), payments=payments, returns=len(lines) - payments, paid_fen=paid,
                      returned_fen=returned, net_fen=paid - returned, fee_fen=sum(x.fee_fen for x in lines))


def check_totals(platform: str, day: dt.date, lines, stated: BillTotals) -> None:
    """Raise BillError naming each figure the bill states that its lines do not add up to."""
    summed = totals_of(lines)
    wrong = [f"{k} {v} stated, {getattr(summed, k)} in the lines" for k, v in stated.as_dict().items()
             if v != getattr(summed, k)]
    if wrong:
        raise BillError(platform, day, "the bill's summary disagrees with its lines: " + "; ".join(wrong))


_YUAN = re.compile(r"(?P<sign>-?)(?P<yuan>[0-9]{1,12})(?:\.(?P<fen>[0-9]{1,6}))?")


def yuan_to_fen(text: str) -> int:
    """A bill's signed yuan amount ("12.30", "-0.04000", "0") -> fen. Digits past the fen must be
    zeros (WeChat writes fees with five decimals, rounded to the fen). Raises ValueError."""
    m = _YUAN.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not an amount in yuan: {text[:24]!r}")
    decimals = (m["fen"] or "").ljust(2, "0")
    if decimals[2:].strip("0"):
        raise ValueError(f"an amount finer than a fen: {text[:24]!r}")
    fen = int(m["yuan"]) * 100 + int(decimals[:2])
    return -fen if m["sign"] else fen


def beijing_time(t: float) -> str:
    """A Unix time as a bill writes it: Beijing, "YYYY-MM-DD HH:MM:SS"."""
    return dt.datetime.fromtimestamp(t, BEIJING).strftime("%Y-%m-%d %H:%M:%S")


def beijing_day(t: float) -> dt.date:
    """The Beijing calendar day of a Unix time."""
    return dt.datetime.fromtimestamp(t, BEIJING).date()


def day_start(day: dt.date) -> float:
    """The Unix time at which Beijing's `day` begins."""
    return dt.datetime.combine(day, dt.time(), BEIJING).timestamp()


def check_day(day: dt.date, now: float) -> None:
    """Refuse today or a later Beijing day (its bill cannot exist yet). Raises ValueError."""
    today = beijing_day(now)
    if day >= today:
        raise ValueError(f"{day.isoformat()} is not over yet in Beijing (today there is {today.isoformat()}): "
                         f"a day's bill exists only from the next morning")

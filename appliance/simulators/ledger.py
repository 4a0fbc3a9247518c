"""A payment platform's books, shared by every simulator: trades by out_trade_no, refunds by
out_refund_no, and a count of every charge.

Each simulator (one file per kind) is a protocol front end over one `Ledger`. The front end checks
signatures, turns the platform's wire format into ledger calls, and turns the ledger's answers into
that platform's codes. So every kind behaves alike for the same payment code, and one table of cases
tests all adapters.

The scenario is chosen by the payment code's last two digits:

    00-79  paid at once; above `password_above_fen` the customer must confirm a password first,
           and the trade is paid at the 2nd query
    80     paid, but the pay answer's signature is damaged (a forged or corrupted answer)
    81     password never confirmed (the trade stays paying), and the first 2 reverses answer
           "retry" (WeChat recall=Y, Alipay retry_flag=Y, a 5xx); the 3rd closes the trade
    82     declined: the code is not a valid payment code
    90     declined: the customer's balance is insufficient
    91     declined: the code has expired (the customer must refresh it)
    92     password: paying, then paid at the 2nd query
    93     password never confirmed: paying until reversed (then closed)
    94     a system error after the platform took the money: the pay answers a system error, and
           the trade is paid
    96     the money is taken and the connection drops: no answer at all
    97     slow: the money is taken at once; the answer comes after `slow_s`, longer than a lane's
           read timeout
    98     paid; a refund of it is first processing, and succeeds at the 2nd refund query

A payment code is single-use: a code already used in one trade is declined in any other
(`Decline.CODE_USED`). A pay repeated with the same out_trade_no charges nothing more: the front end
answers with the trade as it stands. A reverse of an out_trade_no the ledger never saw records
the number as closed, so a pay that arrives late with it is refused.

States (WeChat's words): PAYING, SUCCESS, PAYERROR (declined), CLOSED (reversed while unpaid),
REFUND (paid, then reversed or refunded). Thread-safe. It is kept in memory only.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

#: WeChat's password-free limit (1000.00 yuan), in fen.
PASSWORD_ABOVE_FEN = 1000_00
#: WeChat's reverse window: 7 days.
REVERSE_WINDOW_S = 7 * 86_400.0


class Decline(StrEnum):
    """Why a pay was declined, in the ledger's words; each front end maps it to its platform's code."""

    NOT_ENOUGH = "not_enough"  # insufficient balance
    EXPIRED = "expired"  # the code has expired
    INVALID = "invalid"  # not a valid payment code
    CODE_USED = "code_used"  # the code was used before (codes are single-use)


class Reverse(StrEnum):
    DONE = "done"  # the trade is now CLOSED (it was unpaid) or REFUND (it was paid)
    RETRY = "retry"  # call again (recall=Y, retry_flag=Y, 5xx)
    EXPIRED = "expired"  # outside the reverse window: refund instead


@dataclass
class Trade:
    out_trade_no: str
    amount_fen: int
    code_sha256: str
    scenario: str
    state: str  # PAYING, SUCCESS, PAYERROR, CLOSED, REFUND
    transaction_id: str
    created: float  # wall clock, seconds
    decline: Decline | None = None
    paid_at: float | None = None
    queries: int = 0
    reverses: int = 0
    charges: int = 0  # times money was taken for this trade: never more than 1
    funding: str = "wallet"  # "wallet" (the app's balance) or "card" (a bank card): front ends name it

    @property
    def paid(self) -> bool:
        return self.state == "SUCCESS"


@dataclass
class Refund:
    out_refund_no: str
    out_trade_no: str
    amount_fen: int
    refund_id: str
    state: str  # PROCESSING, SUCCESS
    queries: int = 0


class RefundError(StrEnum):
    NOT_PAID = "not_paid"  # no such trade, or it is not paid
    AMOUNT = "amount"  # the total differs from the trade, or the amount exceeds what is left


@dataclass
class Ledger:
    password_above_fen: int = PASSWORD_ABOVE_FEN
    reverse_window_s: float = REVERSE_WINDOW_S
    slow_s: float = 8.0
    trades: dict[str, Trade] = field(default_factory=dict)
    refunds: dict[str, Refund] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # call name -> how many arrived (for tests)
    _codes: set[str] = field(default_factory=set)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def count(self, call: str) -> None:
        with self._lock:
            self.calls[call] = self.calls.get(call, 0) + 1

    def pay(self, out_trade_no: str, auth_code: str, amount_fen: int) -> tuple[Trade, bool]:
        """Take a pay. Returns (the trade, True) for a new trade, or (the trade as it stands, False)
        for a repeated out_trade_no, which changes and charges nothing."""
        with self._lock:
            known = self.trades.get(out_trade_no)
            if known is not None:
                return known, False
            digest = hashlib.sha256(auth_code.encode()).hexdigest()
            scenario = auth_code[-2:]
            trade = Trade(out_trade_no, amount_fen, digest, scenario, "PAYING", self._new_id("42"), time.time(),
                          funding="card" if out_trade_no[-1:] in "13579" else "wallet")
            self.trades[out_trade_no] = trade
            if digest in self._codes:
                self._decline(trade, Decline.CODE_USED)
                return trade, True
            self._codes.add(digest)
            declined = {"82": Decline.INVALID, "90": Decline.NOT_ENOUGH, "91": Decline.EXPIRED}.get(scenario)
            if declined is not None:
                self._decline(trade, declined)
            elif scenario in ("81", "92", "93") or (scenario < "80" and amount_fen > self.password_above_fen):
                pass  # the customer is asked for a password: paying
            else:
                self._charge(trade)
            return trade, True

    def query(self, out_trade_no: str) -> Trade | None:
        """The trade, after the customer's password step has moved on (paid or given up at the 2nd query)."""
        with self._lock:
            trade = self.trades.get(out_trade_no)
            if trade is None:
                return None
            trade.queries += 1
            if trade.state == "PAYING" and trade.queries >= 2 and trade.scenario not in ("81", "93"):
                self._charge(trade)
            return trade

    def reverse(self, out_trade_no: str) -> tuple[Reverse, Trade]:
        """Reverse (WeChat) or cancel (Alipay) a trade: close it when unpaid, refund it when paid."""
        with self._lock:
            trade = self.trades.get(out_trade_no)
            if trade is None:  # close the number, so that a late pay with it is refused
                trade = Trade(out_trade_no, 0, "", "", "CLOSED", self._new_id("42"), time.time())
                self.trades[out_trade_no] = trade
                return Reverse.DONE, trade
            trade.reverses += 1
            if trade.scenario == "81" and trade.reverses <= 2:
                return Reverse.RETRY, trade
            if trade.state in ("CLOSED", "REFUND", "PAYERROR"):
                if trade.state == "PAYERROR":
                    trade.state = "CLOSED"
                return Reverse.DONE, trade
            if time.time() - trade.created > self.reverse_window_s:
                return Reverse.EXPIRED, trade
            trade.state = "REFUND" if trade.paid else "CLOSED"
            return Reverse.DONE, trade

    def close(self, out_trade_no: str) -> Trade | None:
        """Close an unpaid trade (the aggregator's close). Returns it, or None if there is none.
        A paid trade is left as it is; the front end refuses."""
        with self._lock:
            trade = self.trades.get(out_trade_no)
            if trade is not None and trade.state == "PAYING":
                trade.state = "CLOSED"
            return trade

    def refund(self, out_trade_no: str, out_refund_no: str, amount_fen: int,
               total_fen: int | None = None) -> Refund | RefundError:
        """Refund a paid trade. A repeated out_refund_no returns that refund unchanged. `total_fen`
        (WeChat's order total), when given, must equal the trade's amount."""
        with self._lock:
            done = self.refunds.get(out_refund_no)
            if done is not None:
                return done
            trade = self.trades.get(out_trade_no)
            if trade is None or trade.state not in ("SUCCESS", "REFUND"):
                return RefundError.NOT_PAID
            refunded = sum(r.amount_fen for r in self.refunds.values() if r.out_trade_no == out_trade_no)
            if (total_fen is not None and total_fen != trade.amount_fen) or amount_fen < 1 \
                    or refunded + amount_fen > trade.amount_fen:
                return RefundError.AMOUNT
            state = "PROCESSING" if trade.scenario == "98" else "SUCCESS"
            refund = Refund(out_refund_no, out_trade_no, amount_fen, self._new_id("50"), state)
            self.refunds[out_refund_no] = refund
            self._settle_refund(refund)
            return refund

    def query_refund(self, out_refund_no: str) -> Refund | None:
        with self._lock:
            refund = self.refunds.get(out_refund_no)
            if refund is None:
                return None
            refund.queries += 1
            if refund.state == "PROCESSING" and refund.queries >= 2:
                refund.state = "SUCCESS"
                self._settle_refund(refund)
            return refund

    def charges(self, out_trade_no: str) -> int:
        """How often money was taken for this trade (never more than 1)."""
        with self._lock:
            trade = self.trades.get(out_trade_no)
            return trade.charges if trade else 0

    def kept(self, auth_code: str) -> int:
        """How many trades paid with this code still hold the customer's money (paid, not given back)."""
        digest = hashlib.sha256(auth_code.encode()).hexdigest()
        with self._lock:
            return sum(1 for t in self.trades.values() if t.code_sha256 == digest and t.paid)

    def _charge(self, trade: Trade) -> None:
        trade.state = "SUCCESS"
        trade.paid_at = time.time()
        trade.charges += 1

    def _decline(self, trade: Trade, why: Decline) -> None:
        trade.state = "PAYERROR"
        trade.decline = why

    def _settle_refund(self, refund: Refund) -> None:
        trade = self.trades[refund.out_trade_no]
        done = sum(r.amount_fen for r in self.refunds.values()
                   if r.out_trade_no == refund.out_trade_no and r.state == "SUCCESS")
        if refund.state == "SUCCESS" and done >= trade.amount_fen:
            trade.state = "REFUND"

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{time.strftime('%Y%m%d')}{next(self._ids):010d}"

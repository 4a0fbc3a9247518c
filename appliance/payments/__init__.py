"""The Provider port: one payment platform's barcode-payment API, reduced to five calls.

Contract for adapters (one per file, chosen by `[providers.<name>] kind`):
  * `pay(req)` answers PAID, DECLINED or UNKNOWN. UNKNOWN covers every uncertain end: timeouts,
    resets, 5xx, unparseable or unsigned answers, "user is paying" (USERPAYING, 10003). It raises
    ProviderUnavailable only when provably nothing left this device (connection refused, DNS
    failure before sending): only then may the till treat the payment as not attempted.
  * `query(out_trade_no)` answers PAID, DECLINED (closed, reversed, failed, never arrived) or
    UNKNOWN (still paying, or the query itself failed).
  * `reverse(out_trade_no)` cancels an uncertain or paid trade: REVERSED (closed, or paid and
    refunded), UNKNOWN (call again: recall=Y, retry_flag=Y, transport error) or DECLINED (the
    platform refuses, e.g. outside the reverse window: use refund).
  * `refund(out_trade_no, amount_fen, total_fen, out_refund_no)`: `total_fen` is the order's
    total (WeChat `total_fee`), `amount_fen` what is paid back. REFUNDED only when the platform
    says the money went back; UNKNOWN when the refund was only accepted (WeChat: always; it is
    then confirmed by `query_refund`) or the call failed (retry with the same out_refund_no);
    DECLINED when refused.
  * `query_refund(out_trade_no, out_refund_no)`: REFUNDED (the refund succeeded), UNKNOWN
    (still processing, or the query failed) or DECLINED (the refund failed or never arrived: the
    caller may refund again with the same out_refund_no).
  * Every answer is an `Outcome`: `status`; `code`, the platform's own result or error code
    ("SUCCESS", "NOTENOUGH", "USERPAYING", "ORDERNOTEXIST", "ACQ.TRADE_HAS_CLOSE", ...), so no
    caller ever parses `reason` (text for people); `platform_txn_id`, the platform's transaction
    id; `funding_source` where the platform gives it (WeChat `bank_type`, Alipay
    `fund_bill_list` channels joined with "+", the aggregator's channel), journaled and sent to
    head office.
  * Threads: an adapter is called from the till's thread and the resolver's thread, at the same
    time (never for the same payment). It must be safe for that: no per-call state on `self`
    without a lock; an HTTP session shared across threads only if the library allows it.
  * Time: every call returns within a stated limit: for an HTTP adapter its options'
    `call_limit_s`, `connect_timeout_s` x (addresses) + 2 x `read_timeout_s`, at most
    `http.MAX_CALL_S` = 15 s, half the systemd watchdog interval (WatchdogSec=30 in
    systemd/appliance.service); the sandbox: its configured delays. A call made of several
    requests states its own bound (jeepay's reverse: query, close, query within 4/3 x
    `call_limit_s`, at most 20 s), still under the watchdog interval. The till makes at most one
    call per event and pings the watchdog right before it. A call that runs out of time answers
    UNKNOWN (or raises ProviderUnavailable when provably nothing was sent); it never blocks.
  * `PayRequest.auth_code` is a bearer token: never in a repr, a log line or an exception text.
  * Third-party exceptions never leave an adapter. `ProviderMisconfigured` signals our own
    credentials or request shape are wrong (a fault for the technician, not a decline).
  * `policy` tells the resolver how this platform wants uncertain trades driven to an end.
  * `bill(day)`, optional (`has_bill`): the platform's daily bill of one Beijing day, for head
    office's reconciliation; its contract is in appliance/payments/bills.py. The lane never calls it.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from appliance.errors import Refused
from appliance.payments.bills import Bill, BillError
from appliance.registry import Registry


class Status(StrEnum):
    PAID = "paid"
    DECLINED = "declined"
    UNKNOWN = "unknown"
    REVERSED = "reversed"
    REFUNDED = "refunded"


@dataclass(frozen=True)
class Outcome:
    status: Status
    reason: str = ""  # for people: platform code and text, e.g. "NOTENOUGH: balance insufficient"
    platform_txn_id: str | None = None  # the platform's transaction id (WeChat transaction_id, Alipay trade_no)
    code: str = ""  # the platform's own result/error code, e.g. "SUCCESS", "NOTENOUGH", "USERPAYING"
    funding_source: str | None = None  # WeChat bank_type, Alipay fund_bill_list channels, aggregator channel


@dataclass(frozen=True)
class PayRequest:
    out_trade_no: str
    amount_fen: int
    auth_code: str = field(repr=False)  # the payment code: a bearer token, never log it
    subject: str
    store_id: str
    terminal_id: str


@dataclass(frozen=True)
class ResolutionPolicy:
    """How a platform wants an uncertain payment resolved (seconds, from the pay call).

    first_query_after_s: wait before the first query; query_every_s: between queries;
    reverse_after_s: give up querying and reverse (never earlier); retry_every_s: between
    reverse/refund retries once reversing.
    """

    first_query_after_s: float = 5.0
    query_every_s: float = 10.0
    reverse_after_s: float = 45.0
    retry_every_s: float = 10.0


class Provider(ABC):
    """A payment platform account (see the module docstring for the contract)."""

    kind = "abstract"
    #: Whether `bill(day)` is implemented: the platform has a daily bill API.
    has_bill = False

    def __init__(self, name: str, policy: ResolutionPolicy):
        self.name = name
        self.policy = policy

    @abstractmethod
    def pay(self, req: PayRequest) -> Outcome: ...

    @abstractmethod
    def query(self, out_trade_no: str) -> Outcome: ...

    @abstractmethod
    def reverse(self, out_trade_no: str) -> Outcome: ...

    @abstractmethod
    def refund(self, out_trade_no: str, amount_fen: int, total_fen: int, out_refund_no: str) -> Outcome: ...

    @abstractmethod
    def query_refund(self, out_trade_no: str, out_refund_no: str) -> Outcome: ...

    def bill(self, day: dt.date) -> Bill:
        """The platform's bill of one Beijing day (contract: appliance/payments/bills.py). Here: the
        platform has none, BillError; head office reconciles such a platform by query."""
        raise BillError(self.name, day, f"{self.kind} has no bill API: reconcile its orders by query")

    def close(self) -> None:
        """Release connections. Idempotent."""


#: kind -> options and factory `(name, options, state_dir) -> Provider`; each adapter file registers
#: itself (`@providers.register("sandbox", SandboxOptions)`), plug-ins through entry points.
providers = Registry("provider", {
    "sandbox": "appliance.payments.sandbox",
    "alipay": "appliance.payments.alipay",
    "jeepay": "appliance.payments.jeepay",
    "wechat_v2": "appliance.payments.wechat_v2",
    "wechat_v3": "appliance.payments.wechat_v3",
})


def provider_options() -> dict[str, type]:
    """Adapter kind -> its options dataclass (what `[providers.<name>]` may contain besides kind)."""
    return {kind: a.options for kind, a in providers.all().items()}


def make_provider(name: str, pcfg, state_dir: Path) -> Provider:
    """The provider `[providers.<name>]` configures (a ProviderConfig). Raises ConfigError naming its kind."""
    adapter = providers.get(pcfg.kind, f"providers.{name}.kind")
    return adapter.factory(name, pcfg.options, state_dir)


class Router:
    """Maps payment types to configured providers."""

    def __init__(self, providers: dict[str, Provider], routing: dict[str, str]):
        self.providers = providers
        self._routing = dict(routing)

    @classmethod
    def from_config(cls, cfg, state_dir: Path) -> "Router":
        """The configured providers, each `Watched` (its last result and error kept for the status)."""
        from appliance.payments.watched import Watched

        providers = {name: Watched(make_provider(name, p, state_dir)) for name, p in cfg.providers.items()}
        return cls(providers, cfg.routing)

    def route(self, payment_type: str) -> Provider:
        """The provider for a payment type. Raises Refused when none is configured."""
        name = self._routing.get(payment_type)
        if name is None:
            raise Refused(f"no payment platform is configured for {payment_type} codes")
        return self.providers[name]

    def by_name(self, name: str) -> Provider:
        try:
            return self.providers[name]
        except KeyError:
            raise Refused(f"platform {name!r} is no longer configured") from None

    def health(self) -> dict[str, dict]:
        """Provider name -> {"kind", "last_result", "last_error"} (a provider that is not `Watched`:
        its kind, both None). Safe from any thread."""
        return {name: p.health() if hasattr(p, "health") else {"kind": p.kind, "last_result": None, "last_error": None}
                for name, p in self.providers.items()}

    def close(self) -> None:
        for p in self.providers.values():
            p.close()

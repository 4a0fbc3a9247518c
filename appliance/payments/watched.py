"""A provider that remembers its last answer and its last error, for `appliance status`.

`Watched(provider)` is a Provider that passes every call to `provider` unchanged (same answers,
same exceptions, same timing) and keeps, per platform, what the technician asks first: when did
it last answer, what, and when did it last fail, why. The Router wraps each configured provider
in one (`Router.from_config`); anything else (`name`, `policy`, an adapter's own methods such as
the sandbox's `charges`) reads through to the wrapped provider.

`health()` is safe from any thread (the till's and the resolver's threads call at the same time):
each record is replaced whole, never changed in place. Nothing secret is kept: the payment code
is never seen here beyond the PayRequest (not stored), and reasons are cut to a printable line
with every run of 16+ digits masked (a platform's error text may quote the request it refused).

"last_result": the last call that returned an Outcome: {"at", "call", "status", "code"}.
"last_error": the last call that raised, or answered UNKNOWN (a timeout, a 5xx, an unparseable
answer: the platform did not give a definite answer): {"at", "call", "reason"}. A DECLINED
answer is a result, not an error (the customer's balance, not the platform, said no).
"""

from __future__ import annotations

from typing import Callable

from appliance.journal import rfc3339, utc_now
from appliance.payments import Outcome, PayRequest, Provider, Status
from appliance.redact import mask_digit_runs, printable

#: The longest reason kept for a last error.
REASON_CHARS = 200


class Watched(Provider):
    """`provider`, with its last result and last error kept (see the module docstring). Every other
    attribute is the wrapped provider's (`name`, `policy`, `kind`, `options`, ...), read or set."""

    _OWN = frozenset({"wrapped", "_clock", "_last_result", "_last_error"})

    def __init__(self, provider: Provider, *, clock: Callable = utc_now):
        self.wrapped = provider
        self._clock = clock
        self._last_result: dict | None = None
        self._last_error: dict | None = None

    name = property(lambda self: self.wrapped.name)
    policy = property(lambda self: self.wrapped.policy)
    kind = property(lambda self: self.wrapped.kind)  # type: ignore[assignment]
    has_bill = property(lambda self: self.wrapped.has_bill)  # type: ignore[assignment]

    def __getattr__(self, name: str):  # only for names Watched itself lacks (adapter extras)
        return getattr(self.__dict__["wrapped"], name)

    def __setattr__(self, name: str, value) -> None:
        # A method of this class set on an instance (a test's stand-in for `query`) replaces the
        # recorded call here; data (`options`, `policy`) belongs to the wrapped provider.
        if name in self._OWN or callable(getattr(type(self), name, None)):
            object.__setattr__(self, name, value)
        else:
            setattr(self.wrapped, name, value)

    def health(self) -> dict:
        """{"kind", "last_result", "last_error"}: copies, from any thread."""
        return {"kind": self.kind, "last_result": self._last_result, "last_error": self._last_error}

    def _call(self, call: str, fn: Callable[..., Outcome], *args) -> Outcome:
        try:
            out = fn(*args)
        except Exception as e:
            self._last_error = {"at": rfc3339(self._clock()), "call": call,
                                "reason": _reason(f"{type(e).__name__}: {e}")}
            raise
        at = rfc3339(self._clock())
        self._last_result = {"at": at, "call": call, "status": str(out.status), "code": printable(out.code, 64)}
        if out.status is Status.UNKNOWN:
            self._last_error = {"at": at, "call": call, "reason": _reason(out.reason or out.code or "no answer")}
        return out

    def pay(self, req: PayRequest) -> Outcome:
        return self._call("pay", self.wrapped.pay, req)

    def query(self, out_trade_no: str) -> Outcome:
        return self._call("query", self.wrapped.query, out_trade_no)

    def reverse(self, out_trade_no: str) -> Outcome:
        return self._call("reverse", self.wrapped.reverse, out_trade_no)

    def refund(self, out_trade_no: str, amount_fen: int, total_fen: int, out_refund_no: str) -> Outcome:
        return self._call("refund", self.wrapped.refund, out_trade_no, amount_fen, total_fen, out_refund_no)

    def query_refund(self, out_trade_no: str, out_refund_no: str) -> Outcome:
        return self._call("query_refund", self.wrapped.query_refund, out_trade_no, out_refund_no)

    def bill(self, day):
        return self.wrapped.bill(day)  # head office's call: not a lane's platform health

    def close(self) -> None:
        self.wrapped.close()


def _reason(text: str) -> str:
    text = mask_digit_runs(" ".join(text.split()))
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 1] + "…"

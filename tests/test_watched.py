"""appliance/payments/watched.py: a provider's last result and last error, kept without secrets."""

import pytest
from conftest import WECHAT_PAID, WECHAT_SYSTEMERROR, WECHAT_UNREACHABLE

from appliance.errors import ProviderError, ProviderUnavailable
from appliance.payments import Outcome, PayRequest, Provider, ResolutionPolicy, Status
from appliance.payments.sandbox import SandboxOptions, SandboxProvider
from appliance.payments.watched import Watched


def req(code: str, n: int) -> PayRequest:
    return PayRequest(f"S1_L1_2026112900000{n}", 100, code, "Order A", "S1", "L1")


@pytest.fixture
def sandbox(tmp_path):
    p = Watched(SandboxProvider("sbx", SandboxOptions(), tmp_path))
    yield p
    p.close()


def test_results_and_errors_of_a_real_provider(sandbox):
    assert sandbox.health() == {"kind": "sandbox", "last_result": None, "last_error": None}
    assert sandbox.pay(req(WECHAT_PAID, 1)).status is Status.PAID
    h = sandbox.health()
    assert (h["last_result"]["call"], h["last_result"]["status"], h["last_result"]["code"]) == ("pay", "paid", "SUCCESS")
    assert h["last_error"] is None
    assert sandbox.pay(req(WECHAT_SYSTEMERROR, 2)).status is Status.UNKNOWN  # no definite answer: an error
    err = sandbox.health()["last_error"]
    assert (err["call"], err["reason"]) == ("pay", "SYSTEMERROR: result unknown")
    with pytest.raises(ProviderUnavailable):  # raised through unchanged
        sandbox.pay(req(WECHAT_UNREACHABLE, 3))
    h = sandbox.health()
    assert h["last_error"]["reason"] == "ProviderUnavailable: sandbox: platform unreachable (code ends 95)"
    assert h["last_result"]["code"] == "SYSTEMERROR"  # the last answer is still the one before
    assert sandbox.query(req(WECHAT_PAID, 1).out_trade_no).status is Status.PAID
    assert sandbox.health()["last_result"]["call"] == "query"
    assert sandbox.name == "sbx" and sandbox.policy == sandbox.wrapped.policy
    assert sandbox.charges(WECHAT_PAID) == 1  # the adapter's own methods read through


class Quoting(Provider):
    """A platform whose error texts quote the payment code it refused."""

    kind = "quoting"

    def __init__(self):
        super().__init__("q", ResolutionPolicy())

    def pay(self, req):
        raise ProviderError(f"gateway said: bad auth_code {req.auth_code}\n retry")

    def query(self, out_trade_no):
        return Outcome(Status.UNKNOWN, f"upstream 502 for code {WECHAT_PAID} " + "x" * 500)

    reverse = refund = query_refund = query


def test_reasons_are_masked_one_line_and_short():
    p = Watched(Quoting())
    with pytest.raises(ProviderError):
        p.pay(req(WECHAT_PAID, 1))
    reason = p.health()["last_error"]["reason"]
    assert WECHAT_PAID not in reason and "1345**********6700" in reason and "\n" not in reason
    p.query("x")
    reason = p.health()["last_error"]["reason"]
    assert WECHAT_PAID not in reason and len(reason) == 200 and reason.endswith("…")
    assert p.health()["last_result"] == {**p.health()["last_result"], "status": "unknown", "code": ""}

import pytest

from appliance.errors import ProviderUnavailable
from appliance.payments import PayRequest, Status
from appliance.payments.sandbox import SandboxOptions, SandboxProvider


@pytest.fixture
def sandbox(tmp_path):
    p = SandboxProvider("sbx", SandboxOptions(slow_ms=0), tmp_path)
    yield p
    p.close()


def _req(code, no="T1", amount=100):
    return PayRequest(no, amount, code, "Order X", "S1", "L1")


@pytest.mark.parametrize("tail,pay,queries", [
    ("00", Status.PAID, [Status.PAID]),
    ("90", Status.DECLINED, [Status.DECLINED]),
    ("91", Status.DECLINED, [Status.DECLINED]),
    ("92", Status.UNKNOWN, [Status.UNKNOWN, Status.PAID, Status.PAID]),
    ("93", Status.UNKNOWN, [Status.UNKNOWN, Status.DECLINED]),
    ("94", Status.UNKNOWN, [Status.UNKNOWN, Status.UNKNOWN, Status.UNKNOWN]),
    ("96", Status.UNKNOWN, [Status.PAID]),
    ("97", Status.PAID, [Status.PAID]),
])
def test_outcomes_by_last_digits(sandbox, tail, pay, queries):
    assert sandbox.pay(_req("1345678901234567" + tail)).status is pay
    assert [sandbox.query("T1").status for _ in queries] == queries


def test_unreachable_sends_nothing(sandbox):
    with pytest.raises(ProviderUnavailable):
        sandbox.pay(_req("134567890123456795"))
    assert sandbox.query("T1").status is Status.DECLINED  # ORDERNOTEXIST


def test_large_amount_needs_password(sandbox):
    assert sandbox.pay(_req("134567890123456700", amount=1000_01)).status is Status.UNKNOWN
    assert [sandbox.query("T1").status for _ in range(2)] == [Status.UNKNOWN, Status.PAID]


def test_retry_of_the_same_attempt_does_not_charge_twice(sandbox):
    code = "134567890123456700"
    sandbox.pay(_req(code))
    assert sandbox.pay(_req(code)).status is Status.PAID
    assert sandbox.charges(code) == 1


def test_reverse_paid_refunds_and_unpaid_closes(sandbox):
    sandbox.pay(_req("134567890123456700", no="P"))
    sandbox.pay(_req("134567890123456794", no="U"))
    assert sandbox.reverse("P").status is Status.REVERSED
    assert sandbox.query("P").status is Status.REFUNDED
    assert sandbox.reverse("U").status is Status.REVERSED
    assert sandbox.query("U").status is Status.DECLINED
    assert sandbox.charges("134567890123456700") == 0


def test_outside_reverse_window_refund_instead(tmp_path):
    p = SandboxProvider("sbx", SandboxOptions(reverse_window_s=0.000001), tmp_path)
    p.pay(_req("134567890123456700"))
    assert p.reverse("T1").status is Status.DECLINED
    assert p.refund("T1", 99, "T1R").status is Status.DECLINED  # wrong amount
    assert p.refund("T1", 100, "T1R").status is Status.REFUNDED
    p.close()


def test_ledger_survives_a_restart(tmp_path):
    a = SandboxProvider("sbx", SandboxOptions(), tmp_path)
    a.pay(_req("134567890123456700"))
    a.close()
    b = SandboxProvider("sbx", SandboxOptions(), tmp_path)
    assert b.query("T1").status is Status.PAID
    assert b.query("nope").status is Status.DECLINED
    b.close()
    assert b"134567890123456700" not in (tmp_path / "sandbox-ledger.sqlite").read_bytes()

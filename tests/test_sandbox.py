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
    ("00", (Status.PAID, "SUCCESS"), [(Status.PAID, "SUCCESS")]),
    ("90", (Status.DECLINED, "NOTENOUGH"), [(Status.DECLINED, "PAYERROR")]),
    ("91", (Status.DECLINED, "AUTHCODEEXPIRE"), [(Status.DECLINED, "PAYERROR")]),
    ("92", (Status.UNKNOWN, "USERPAYING"), [(Status.UNKNOWN, "USERPAYING"), (Status.PAID, "SUCCESS"),
                                            (Status.PAID, "SUCCESS")]),
    ("93", (Status.UNKNOWN, "USERPAYING"), [(Status.UNKNOWN, "USERPAYING"), (Status.DECLINED, "PAYERROR")]),
    ("94", (Status.UNKNOWN, "SYSTEMERROR"), [(Status.UNKNOWN, "SYSTEMERROR")] * 3),
    ("96", (Status.UNKNOWN, ""), [(Status.PAID, "SUCCESS")]),  # the answer was lost: no code at all
    ("97", (Status.PAID, "SUCCESS"), [(Status.PAID, "SUCCESS")]),
])
def test_outcomes_and_codes_by_last_digits(sandbox, tail, pay, queries):
    out = sandbox.pay(_req("1345678901234567" + tail))
    assert (out.status, out.code) == pay
    assert [(o.status, o.code) for o in (sandbox.query("T1") for _ in queries)] == queries


@pytest.mark.parametrize("no,source", [("T0", "CFT"), ("T1", "CMB_DEBIT"), ("T8", "CFT"), ("T9", "CMB_DEBIT")])
def test_a_paid_trade_has_an_id_and_a_funding_source_unpaid_ones_none(sandbox, no, source):
    paid = sandbox.pay(_req("134567890123456700", no=no))
    assert (paid.platform_txn_id, paid.funding_source) == (f"sbx{no}", source)
    assert sandbox.query(no).funding_source == source
    declined = sandbox.pay(_req("134567890123456790", no=no + "D"))
    assert declined.funding_source is None and declined.platform_txn_id is None
    assert sandbox.query("nope").code == "ORDERNOTEXIST"


def test_the_payment_code_is_in_no_repr(sandbox):
    req = _req("134567890123456700")
    assert "134567890123456700" not in repr(req) and "134567890123456700" not in str(req)


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
    assert p.refund("T1", 99, 99, "T1R").status is Status.DECLINED  # wrong total
    assert p.refund("T1", 99, 100, "T1R").status is Status.DECLINED  # partial: not in the sandbox
    assert p.query_refund("T1", "T1R").code == "REFUNDNOTEXIST"
    assert p.refund("T1", 100, 100, "T1R").status is Status.REFUNDED
    assert p.query_refund("T1", "T1R").status is Status.REFUNDED
    assert p.query("T1").status is Status.REFUNDED
    p.close()


@pytest.mark.parametrize("steps", [
    # (call, answer status, answer code, the trade's state at the platform after it)
    [("refund", Status.UNKNOWN, "PROCESSING", "SUCCESS"), ("query_refund", Status.UNKNOWN, "PROCESSING", "SUCCESS"),
     ("query_refund", Status.REFUNDED, "SUCCESS", "REFUND"), ("query_refund", Status.REFUNDED, "SUCCESS", "REFUND")],
    [("refund", Status.UNKNOWN, "PROCESSING", "SUCCESS"), ("refund", Status.UNKNOWN, "PROCESSING", "SUCCESS"),
     ("query_refund", Status.UNKNOWN, "PROCESSING", "SUCCESS"), ("refund", Status.UNKNOWN, "PROCESSING", "SUCCESS"),
     ("query_refund", Status.REFUNDED, "SUCCESS", "REFUND"), ("refund", Status.REFUNDED, "SUCCESS", "REFUND")],
])
def test_a_refund_of_a_code_ending_98_is_first_processing(tmp_path, steps):
    p = SandboxProvider("sbx", SandboxOptions(reverse_window_s=0.000001), tmp_path)
    assert p.pay(_req("134567890123456798")).status is Status.PAID
    for call, status, code, trade in steps:
        out = p.refund("T1", 100, 100, "T1R") if call == "refund" else p.query_refund("T1", "T1R")
        assert (call, out.status, out.code, p.trades()["T1"][0]) == (call, status, code, trade)
    assert p.charges("134567890123456798") == 0
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

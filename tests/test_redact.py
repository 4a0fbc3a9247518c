import pytest
from hypothesis import given, strategies as st

from appliance.redact import mask, mask_digit_runs, printable


@pytest.mark.parametrize("text,masked", [
    ("134567890123456789", "1345**********6789"),
    ("1345678901", "13******01"),
    ("1234567", "*******"),
    ("", ""),
])
def test_mask(text, masked):
    assert mask(text) == masked


def test_mask_long_input_is_summarised():
    m = mask("9" * 10_000)
    assert "10000 chars" in m and len(m) < 40


def test_mask_hides_control_characters():
    assert "\x1b" not in mask("\x1b[31m" + "1" * 20)


@given(st.text(alphabet="0123456789", min_size=8, max_size=48))  # longer ones print their length
def test_mask_never_shows_more_than_8_digits_and_keeps_most_hidden(code):
    shown = sum(c.isdigit() for c in mask(code))
    assert shown <= 8
    assert shown <= len(code) // 2


def test_printable_escapes():
    assert printable("a\nb") == "a\\nb"
    assert printable("x" * 100, limit=10).startswith("xxxxxxxxxx…")


def test_objects_that_carry_a_payment_code_never_show_it_in_their_repr(tmp_path):
    from appliance.journal import Journal, State
    from appliance.payments import PayRequest
    from appliance.scan import Scan

    code = "134567890123456795"
    journal = Journal(tmp_path, "S0001", "L01")
    txn = journal.open_payment(order="A1", amount_fen=100, payment_type="wechat", platform="sandbox", code=code)
    deferred = journal.transition(txn.txn_id, State.DEFERRED, auth_code=code)
    journal.close()
    assert deferred.auth_code == code
    for obj in (PayRequest("S_L_1", 100, code, "Order A1", "S", "L"), Scan(code, "stdin"), deferred):
        assert code not in repr(obj) and code not in str(obj), type(obj).__name__
    assert mask(code) in repr(Scan(code, "stdin"))


@pytest.mark.parametrize("text,shown", [
    ("系统：auth_code=134567890123456700 invalid", "系统：auth_code=1345**********6700 invalid"),
    ("codes 2861234567890123456789 and 6212345678901234566", "codes 2861**************6789 and 6212***********4566"),
    ("order P1797000000000000001 failed", "order P1797000000000000001 failed"),  # an id, not a code
    ("trade 4200001234202611290012345678", "trade 4200" + "*" * 20 + "5678"),
    ("amount 123456789012345 fen", "amount 123456789012345 fen"),  # 15 digits: not a payment code
    ("", ""),
])
def test_digit_runs_that_may_be_payment_codes_are_masked(text, shown):
    assert mask_digit_runs(text) == shown

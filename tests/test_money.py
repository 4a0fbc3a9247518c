import pytest
from hypothesis import given, strategies as st

from appliance.errors import BadInput
from appliance.money import MAX_FEN, format_amount, parse_amount


@pytest.mark.parametrize("text,fen", [
    ("12.34", 1234), ("12", 1200), ("12.3", 1230), ("0.01", 1), ("0.10", 10), ("007.50", 750),
    (" 5.00 ", 500), ("100000000.00", MAX_FEN),
])
def test_ok__parse(text, fen):
    assert parse_amount(text) == fen


@pytest.mark.parametrize("text,why", [
    ("", "empty"), ("   ", "empty"), ("-1.00", "negative"), ("0", "zero"), ("0.00", "zero"),
    ("12.345", "more than two decimals"), ("1e9", "not a decimal"), ("1E2", "not a decimal"),
    ("100000000.01", "exceeds"), ("999999999999", "exceeds"), ("12,34", "not a decimal"),
    ("¥12", "not a decimal"), ("12.", "not a decimal"), (".5", "not a decimal"), ("+3", "not a decimal"),
    ("nan", "not a decimal"), ("inf", "not a decimal"), ("１２", "not a decimal"), ("1" * 100, "characters long"),
    ("0x10", "not a decimal"), ("1_000", "not a decimal"),
])
def test_fail__parse(text, why):
    with pytest.raises(BadInput, match=why):
        parse_amount(text)


@pytest.mark.parametrize("fen,text", [(1, "0.01"), (10, "0.10"), (1234, "12.34"), (100, "1.00"), (-5, "-0.05")])
def test_format(fen, text):
    assert format_amount(fen) == text


@given(st.integers(min_value=1, max_value=MAX_FEN))
def test_roundtrip(fen):
    assert parse_amount(format_amount(fen)) == fen


@given(st.text(max_size=30))
def test_any_text_parses_or_raises_badinput(text):
    try:
        fen = parse_amount(text)
    except BadInput:
        return
    assert isinstance(fen, int) and 1 <= fen <= MAX_FEN


@given(st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-10, max_value=10))
def test_three_decimal_inputs_never_round(d):
    text = f"{d:.3f}"
    if text.endswith("0") or text.startswith("-"):
        return
    with pytest.raises(BadInput):
        parse_amount(text)

import re
import subprocess
import sys
from textwrap import dedent

import pytest
from hypothesis import given, strategies as st

from appliance.classify import MAX_SCAN_LEN, Classifier, compile_order_pattern, load_rules
from appliance.config import ClassifyConfig

ORDER = ClassifyConfig().order_pattern


@pytest.fixture(scope="module")
def classifier():
    return Classifier(load_rules(None), ORDER, {"CMD:CANCEL": "cancel"})


@pytest.mark.parametrize("code,ptype", [
    ("101234567890123456", "wechat"), ("151234567890123456", "wechat"), ("134567890123456789", "wechat"),
    ("2512345678901234", "alipay"), ("301234567890123456789012", "alipay"), ("286123456789012345", "alipay"),
    ("6212345678901234567", "unionpay"), ("0112345678901234567", "ecny"),
    ("181234567890123456", "jdpay"), ("511234567890123456", "bestpay"),
])
def test_ok__payment_types(classifier, code, ptype):
    c = classifier.classify(code)
    assert (c.kind, c.payment_type) == ("payment", ptype)
    assert code not in c.masked and code not in str(c.as_dict())


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("1" * 10_000, "too long"),
    ("1345678901234\x1b56789", "control characters"),
    ("134567890123456789\t", "control characters"),
    ("１３４５６７８９０１２３４５６７８９", "non-ASCII"),
    ("13456789éé", "non-ASCII"),
    ("1345678901", "too short: 10 digits, wechat codes with this prefix have 18"),
    ("13456789012345678", "too short: 17 digits"),
    ("1345678901234567890", "wrong length: 19 digits"),
    ("161234567890123456", "no rule for 18-digit codes starting 16"),
    ("9912", "too short: 4 digits"),
    ("HELLO", "not digits"),
    (" 134567890123456789", "whitespace"),
    ("ORD:A1:12.345", "not digits"),
    ("ORD:A1:0.00", "order ticket with bad amount"),
    ("2412345678901234", "no rule"),
])
def test_fail__unknown_with_reason(classifier, text, reason):
    c = classifier.classify(text)
    assert c.kind == "unknown"
    assert reason in c.reason


def test_order_ticket(classifier):
    c = classifier.classify("ORD:A-1001_x:12.34")
    assert (c.kind, c.order, c.amount_fen) == ("order", "A-1001_x", 1234)


def test_command_card(classifier):
    c = classifier.classify("CMD:CANCEL")
    assert (c.kind, c.command) == ("command", "cancel")


def test_json_shape(classifier):
    assert set(classifier.classify("134567890123456789").as_dict()) == {"input_masked", "kind", "payment_type", "reason"}


def test_local_file_adds_overrides_disables_and_more_specific_prefix_wins(tmp_path):
    local = tmp_path / "payment_types.toml"
    local.write_text('''
[[rule]]
type = "longpay"
lengths = [19]
prefixes = ["6220105", "6230105"]

[[rule]]
type = "jdpay"
enabled = false

[[rule]]
type = "ecny"
lengths = [19, 20]
prefixes = ["01"]
''')
    c = Classifier(load_rules(local), ORDER, {})
    assert c.classify("6220105123456789012").payment_type == "longpay"  # longer prefix beats unionpay's 62
    assert c.classify("6212345678901234567").payment_type == "unionpay"
    assert c.classify("181234567890123456").kind == "unknown"          # disabled
    assert c.classify("01123456789012345678").payment_type == "ecny"    # replaced: 20 digits now allowed


def test_tie_goes_to_local_then_file_order(tmp_path):
    local = tmp_path / "r.toml"
    local.write_text('[[rule]]\ntype = "mywallet"\nlengths = [18]\nprefixes = ["13"]\n')
    assert Classifier(load_rules(local), ORDER, {}).classify("134567890123456789").payment_type == "mywallet"


@pytest.mark.parametrize("body,msg", [
    ("[[rule]]\ntype = 'x'\nlengths = [18]\n", "needs 'lengths' and 'prefixes'"),
    ("[[rule]]\ntype = 'X Y'\nlengths = [18]\nprefixes=['1']\n", "type"),
    ("[[rule]]\ntype = 'x'\nlengths = '20-10'\nprefixes=['1']\n", "empty"),
    ("[[rule]]\ntype = 'x'\nlengths = [18]\nprefixes=['1-22']\n", "mixes widths"),
    ("[[rule]]\ntype = 'x'\nlengths = [3]\nprefixes=['1']\n", "8-64"),
    ("[[rule]]\ntype = 'x'\nlength = [18]\nprefixes=['1']\n", "unknown key"),
    ("[rules]\n", "unknown key"),
    ("not toml [", "not valid TOML"),
    ("[[rule]]\ntype = 'x'\nlengths = '8-80000000000'\nprefixes=['1']\n", "more than 10000 values"),
    ("[[rule]]\ntype = 'x'\nlengths = [18]\nprefixes=['0000000000-9999999999']\n", "more than 10000 values"),
    ("[[rule]]\ntype = 'x'\nlengths = [18]\nprefixes=['1000-5999', '6000-9999', '00000-02000']\n",
     "more than 10000 values"),
    ("[[rule]]\ntype = 'x'\nlengths = [18]\nprefixes=['" + "1" * 5000 + "']\n", "is not a number or a range"),
    ("a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
])
def test_fail__bad_rules_file(tmp_path, body, msg):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(ValueError, match=msg):
        load_rules(f)


DEFAULT = Classifier(load_rules(None), ORDER, {"CMD:CANCEL": "cancel"})


@given(st.text(max_size=300))
def test_property_never_raises_and_never_leaks_a_code(text):
    c = DEFAULT.classify(text)
    assert c.kind in ("payment", "order", "command", "unknown")
    if c.kind in ("payment", "unknown") and len(text) >= 8:
        assert text not in c.masked
    if c.kind == "unknown":
        assert c.reason


@given(st.from_regex(r"1[0-5][0-9]{16}", fullmatch=True))
def test_property_every_official_wechat_code_is_wechat(code):
    assert DEFAULT.classify(code).payment_type == "wechat"


@given(st.from_regex(r"(2[5-9]|30)[0-9]{14,22}", fullmatch=True))
def test_property_every_official_alipay_code_is_alipay(code):
    assert DEFAULT.classify(code).payment_type == "alipay"


@given(st.text(alphabet="0123456789", min_size=1, max_size=40))
def test_property_digit_strings_agree_with_the_reference_regexes(digits):
    c = DEFAULT.classify(digits)
    expected = None
    for ptype, rx in [("wechat", r"1[0-5]\d{16}"), ("alipay", r"(2[5-9]|30)\d{14,22}"), ("unionpay", r"62\d{17}"),
                      ("ecny", r"01\d{17}"), ("jdpay", r"18\d{16}"), ("bestpay", r"51\d{16}")]:
        if re.fullmatch(rx, digits):
            expected = ptype
    assert c.payment_type == expected
    assert (c.kind == "payment") == (expected is not None)


def test_max_scan_len_boundary(classifier):
    assert classifier.classify("A" * MAX_SCAN_LEN).reason.startswith("not digits")
    assert classifier.classify("A" * (MAX_SCAN_LEN + 1)).reason.startswith("too long")


# --- the order pattern is configured, so it is user input: RE2, linear time -------------------

#: Nested quantifiers: with a backtracking engine, 30 'a's already take minutes (2**30 paths).
CATASTROPHIC = r"(?P<order>(a+)+)b(?P<amount>x)"


def test_pathological_order_pattern_cannot_hang_the_classifier():
    """In a child process with a timeout, so that a backtracking engine fails the test instead of hanging it."""
    child = dedent(f"""
        import time
        from appliance.classify import Classifier, compile_order_pattern, load_rules
        classifier = Classifier(load_rules(None), {CATASTROPHIC!r}, {{}})
        worst = 0.0
        for text in ("a" * 30, "a" * {MAX_SCAN_LEN}, "a" * 65536):
            start = time.perf_counter()
            c = classifier.classify(text)
            worst = max(worst, time.perf_counter() - start)
            assert c.kind == "unknown", c
        engine = compile_order_pattern({CATASTROPHIC!r})  # the engine itself, past the length bound
        start = time.perf_counter()
        assert engine.fullmatch("a" * 65536) is None and engine.search("a" * 65536) is None
        print(worst, time.perf_counter() - start)
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    classify_s, engine_s = map(float, r.stdout.split())
    assert classify_s < 0.1 and engine_s < 0.5, r.stdout


@pytest.mark.parametrize("pattern,reason", [
    (r"(?P<order>a+)\1(?P<amount>[0-9.]+)",
     r"uses a feature the linear-time engine (RE2) does not support: invalid escape sequence: \1"),
    (r"(?=ORD)(?P<order>\w+):(?P<amount>[0-9.]+)",
     "uses a feature the linear-time engine (RE2) does not support: invalid perl operator: (?="),
    (r"(?P<order>\w+)(?<!x):(?P<amount>[0-9.]+)", "does not support: invalid perl operator: (?<"),
    (r"(?P<order>\pL{1000})(?P<amount>x)", "is too large for the linear-time engine (RE2): pattern too large"),
    (r"(?P<order>(a{100}){100})(?P<amount>x)", "does not support: invalid repetition size: {100}"),
    ("ORD:(", "is not a valid regular expression: missing ), unterminated subpattern"),
    # found by the config fuzzer: Python's re warns "possible set difference" before refusing it
    ("ORD:(?P<order>[A--Z]+):(?P<amount>.*)", "is not a valid regular expression: bad character range A--"),
    ("ORD:(?P<order>.*)", "missing ['amount']"),
])
def test_fail__order_pattern_the_linear_engine_cannot_run_is_a_config_error(tmp_path, capfd, pattern, reason):
    from appliance.config import ConfigError, from_dict
    from conftest import lane_dict

    with pytest.raises(ConfigError) as e:
        from_dict(lane_dict(tmp_path, classify={"order_pattern": pattern}))
    assert e.value.key == "classify.order_pattern"
    assert reason in e.value.reason
    assert capfd.readouterr().err == ""  # RE2's own logging is off: the error says it once, by key


def test_order_pattern_with_an_optional_group_that_did_not_match_is_unknown():
    c = Classifier([], r"ORD:(?P<order>[A-Z0-9]+)?:(?P<amount>[0-9.]+)", {})
    assert c.classify("ORD::12.00").reason == "order ticket without order or amount"
    assert (c.classify("ORD:A1:12.00").order, c.classify("ORD:A1:12.00").amount_fen) == ("A1", 1200)


def test_default_and_example_patterns_run_on_re2():
    assert compile_order_pattern(ORDER).fullmatch("ORD:A-1001_x:12.34")["amount"] == "12.34"

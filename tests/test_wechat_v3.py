"""`kind = "wechat_v3"`: the adapter against its simulator over loopback HTTP, and its pure parts
(signature strings, answer verification, the code tables) against published vectors and tables.

No mocks of our own code: the simulators are the real protocol front ends over the shared Ledger.
Where a test needs an answer no honest platform gives (tampered, unsigned, re-signed), a subclass
of the simulator changes that one answer on its way out.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from appliance.config import load
from appliance.errors import ConfigError, ProviderMisconfigured, ProviderUnavailable
from appliance.payments import PayRequest, Status, providers
from appliance.payments.bills import BillError, BillState, BillUnavailable, beijing_day
from appliance.payments.keys import generate_rsa, load_private_key, rsa_sign, rsa_verify
from appliance.payments.wechat_v3 import (Answer, MAX_CLOCK_SKEW_S, WechatV3Options, WechatV3Provider, answer_message,
                                          authorization, pay_outcome, query_outcome, refund_outcome, request_message,
                                          reverse_outcome, signature_problem)
from appliance.schema import SecretFile, build
from appliance.simulators import Request, simulator_class
from appliance.simulators.ledger import Ledger
from appliance.simulators.wechat_v3 import MCHID, MERCHANT_SERIAL, PUBLIC_KEY_ID, WechatV3Simulator
from conftest import ROOT, appliance_cmd, lane_dict, subprocess_env, write_config
from test_wechat_bill import a_billed_day, bill_error, check_fetched, next_morning, past_day

NAME = "wx"  # the [providers.NAME] the tests configure
_numbers = iter(range(1, 10**9))


def code(scenario: str) -> str:
    """A fresh WeChat-style payment code (18 digits, single-use) whose last two digits pick the scenario."""
    return f"13{next(_numbers):014d}{scenario}"


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def sim(tmp_path):
    with WechatV3Simulator(tmp_path / "keys", Ledger(slow_s=3.0)) as s:
        yield s


def options(sim: WechatV3Simulator, base: Path, **override) -> WechatV3Options:
    """The options `sim.provider_options()` gives, through the config schema, with fast timings."""
    raw = {k: v for k, v in sim.provider_options().items() if k != "kind"}
    raw |= {"connect_timeout_s": 0.5, "read_timeout_s": 1.0} | override
    return build(WechatV3Options, raw, f"providers.{NAME}", base)


@pytest.fixture
def make(sim, tmp_path):
    """make(**option overrides) -> a WechatV3Provider on `sim`, closed after the test."""
    made = []

    def factory(**override) -> WechatV3Provider:
        provider = providers.get("wechat_v3", "kind").factory(NAME, options(sim, tmp_path, **override), tmp_path)
        made.append(provider)
        return provider
    yield factory
    for p in made:
        p.close()


@pytest.fixture
def wx(make):
    return make()


def pay_request(scenario: str = "00", amount_fen: int = 1234, *, number: str | None = None) -> PayRequest:
    out_trade_no = number or f"S0001_L01_2026112900{next(_numbers):06d}"
    return PayRequest(out_trade_no, amount_fen, code(scenario), "Order A1", "S0001", "L01")


def security_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("SECURITY")]


# --- signatures: published vectors ---------------------------------------------------------------

# SHA256withRSA vector published with WeChat Pay's own Go SDK (wechatpay-apiv3/wechatpay-go,
# core/auth/signers/sha256withrsa_signer_test.go, Apache-2.0): this test key signs "source" to this.
PUBLISHED_KEY = """-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDZUJN33V+dSfvd
fL0Mu+39XrZNXFFMQSy1V15FpncHeV47SmV0TzTqZc7hHB0ddqAdDi8Z5k3TKqb7
6sOwYr5TcAfuR6PIPaleyE0/0KrljBum2Isa2Nyq7Dgc3ElBQ6YN4l/a+DpvKaz1
FSKmKrhLNskqokWVSlu4g8OlKlbPXQ9ibII14MZRQrrkTmHYHzfi7GXXM0thAKuR
0HNvyhTHBh4/lrYM3GaMvmWwkwvsMavnOex6+eioZHBOb1/EIZ/LzC6zuHArPpyW
3daGaZ1rtQB1vVzTyERAVVFsXXgBHvfFud3w3ShsJYk8JvMwK2RpJ5/gV0QSARcm
LDRUAlPzAgMBAAECggEBAMc7rDeUaXiWv6bMGbZ3BTXpg1FhdddnWUnYE8HfX/km
OFI7XtBHXcgYFpcjYz4D5787pcsk7ezPidAj58zqenuclmjKnUmT3pfbI5eCA2v4
C9HnbYDrmUPK1ZcADtka4D6ScDccpNYNa1g2TFHzkIrEa6H+q7S3O2fqxY/DRVtN
0JIXalBb8daaqL5QVzSmM2BMVnHy+YITJWIkP2a3pKs9C0W65JGDsnG0wVrHinHF
+cnhFZIbaPEI//DAFMc9NkrWOKVRTEgcCUxCFaHOZVNxDWZD7A2ZfJB2rK6eg//y
gEiFDR2h6mTaDowMB4YF2n2dsIO4/dCG8vPHI20jn4ECgYEA/ZGu6lEMlO0XZnam
AZGtiNgLcCfM/C2ZERZE7QTRPZH1WdK92Al9ndldsswFw4baJrJLCmghjF/iG4zi
hhBvLnOLksnZUfjdumxoHDWXo2QBWbI5QsWIE7AuTiWgWj1I7X4fCXSQf6i+M/y2
6TogQ7d0ANpZFyOkTNMn/tiJvLECgYEA22XqlamG/yfAGWery5KNH2DGlTIyd6xJ
WtJ9j3jU99lZ0bCQ5xhiBbU9ImxCi3zgTsoqLWgA/p00HhNFNoUcTl9ofc0G3zwT
D1y0ZzcnVKxGJdZ6ohW52V0hJStAigtjYAsUgjm7//FH7PiQDBDP1Wa6xSRkDQU/
aSbQxvEE8+MCgYEA3bb8krW7opyM0XL9RHH0oqsFlVO30Oit5lrqebS0oHl3Zsr2
ZGgoBlWBsEzk3UqUhTFwm/DhJLTSJ/TQPRkxnhQ5/mewNhS9C7yua7wQkzVmWN+V
YeUGTvDGDF6qDz12/vJAgSwDDRym8x4NcXD5tTw7mmNRcwIfL22SkysThIECgYAV
BgccoEoXWS/HP2/u6fQr9ZIR6eV8Ij5FPbZacTG3LlS1Cz5XZra95UgebFFUHHtC
EY1JHJY7z8SWvTH8r3Su7eWNaIAoFBGffzqqSVazfm6aYZsOvRY6BfqPHT3p/H1h
Tq6AbBffxrcltgvXnCTORjHPglU0CjSxVs7awW3AEQKBgB5WtaC8VLROM7rkfVIq
+RXqE5vtJfa3e3N7W3RqxKp4zHFAPfr82FK5CX2bppEaxY7SEZVvVInKDc5gKdG/
jWNRBmvvftZhY59PILHO2X5vO4FXh7suEjy6VIh0gsnK36mmRboYIBGsNuDHjXLe
BDa+8mDLkWu5nHEhOxy2JJZl
-----END PRIVATE KEY-----
"""
PUBLISHED_SIGNATURE = (
    "BKyAfU4iMCuvXMXS0Wzam3V/cnxZ+JaqigPM5OhljS2iOT95OO6Fsuml2JkFANJU9K6q9bLlDhPXuoVz+pp4hAm6"
    "pHU4ld815U4jsKu1RkyaII+1CYBUYC8TK0XtJ8FwUXXz8vZHh58rrAVN1XwNyvD1vfpxrMT4SL536GLwvpUHlCqIMzoZUguLli/K8V29QiOh"
    "uH6IEqLNJn8e9b3nwNcQ7be3CzYGpDAKBfDGPCqCv8Rw5zndhlffk2FEA70G4hvMwe51qMN/RAJbknXG23bSlObuTCN7Ndj1aJGH6/L+hdwf"
    "LpUtJm4QYVazzW7DFD27EpSQEqA8bX9+8m1rLg==")


def published_key():
    return serialization.load_pem_private_key(PUBLISHED_KEY.encode(), password=None)


def test_sha256_with_rsa_matches_the_published_vector():
    key = published_key()
    assert rsa_sign(key, b"source") == PUBLISHED_SIGNATURE
    assert rsa_verify(key.public_key(), b"source", PUBLISHED_SIGNATURE)
    assert not rsa_verify(key.public_key(), b"sourcE", PUBLISHED_SIGNATURE)


@pytest.mark.parametrize("built,expected", [
    # WeChat Pay's signing guide (签名生成): the GET example, whose body line is empty.
    (request_message("GET", "/v3/certificates", "1554208460", "593BEC0C930BF1AFEB40B4A08C8FB242", b""),
     b"GET\n/v3/certificates\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n\n"),
    (request_message("POST", "/v3/pay/transactions/codepay", "1554208460", "N", b'{"a":1}'),
     b'POST\n/v3/pay/transactions/codepay\n1554208460\nN\n{"a":1}\n'),
    # WeChat Pay's verification guide (构造验签名串), public-key mode example.
    (answer_message("1722850421", "d824f2e086d3c1df967785d13fcd22ef",
                    b'{"code_url":"weixin://wxpay/bizpayurl?pr=JyC91EIz1"}'),
     b'1722850421\nd824f2e086d3c1df967785d13fcd22ef\n{"code_url":"weixin://wxpay/bizpayurl?pr=JyC91EIz1"}\n'),
    (answer_message("1722850421", "n", b""), b"1722850421\nn\n\n"),  # 204: the body line is empty
])
def test_signed_strings_are_wechats(built, expected):
    assert built == expected


def test_authorization_header_carries_the_signature_of_the_request_string():
    key = published_key()
    header = authorization(key, mchid="1900009191", serial="F5765756002FDD77", method="GET", url="/v3/certificates",
                           body=b"", timestamp="1554208460", nonce="593BEC0C930BF1AFEB40B4A08C8FB242")
    scheme, _, rest = header.partition(" ")
    fields = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    assert scheme == "WECHATPAY2-SHA256-RSA2048"
    assert fields == {"mchid": "1900009191", "nonce_str": "593BEC0C930BF1AFEB40B4A08C8FB242",
                      "timestamp": "1554208460", "serial_no": "F5765756002FDD77", "signature": fields["signature"]}
    assert rsa_verify(key.public_key(), b"GET\n/v3/certificates\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n\n",
                      fields["signature"])


# --- answer verification (pure) --------------------------------------------------------------------


def signed_headers(key, body: bytes, *, timestamp: int | None = None, serial: str = PUBLIC_KEY_ID,
                   kind: str = "WECHATPAY2-SHA256-RSA2048") -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {"wechatpay-timestamp": ts, "wechatpay-nonce": "abc", "wechatpay-serial": serial,
            "wechatpay-signature-type": kind, "wechatpay-signature": rsa_sign(key, answer_message(ts, "abc", body))}


BODY = b'{"trade_state":"SUCCESS"}'


@pytest.mark.parametrize("change,problem", [
    (lambda h, b: (h, b), None),
    (lambda h, b: (h, b.replace(b"SUCCESS", b"SUCCEED")), "does not verify"),
    (lambda h, b: ({**h, "wechatpay-serial": "PUB_KEY_ID_OTHER"}, b), "not platform_public_key_id"),
    (lambda h, b: ({**h, "wechatpay-signature-type": "WECHATPAY2-SM2-WITH-SM3"}, b), "signature type"),
    (lambda h, b: ({**h, "wechatpay-nonce": ""}, b), "malformed"),
    (lambda h, b: ({**h, "wechatpay-timestamp": "17e9"}, b), "malformed"),
    (lambda h, b: ({**h, "wechatpay-signature": "not base64!"}, b), "does not verify"),
    (lambda h, b: ({**h, "wechatpay-signature": ""}, b), "does not verify"),
])
def test_signature_problem_table(change, problem):
    key = published_key()
    headers, body = change(signed_headers(key, BODY), BODY)
    why = signature_problem(headers, body, key.public_key(), PUBLIC_KEY_ID, time.time())
    assert (why is None) if problem is None else (problem in why), why


@pytest.mark.parametrize("skew_s,trusted", [(0, True), (MAX_CLOCK_SKEW_S - 5, True), (-(MAX_CLOCK_SKEW_S - 5), True),
                                            (MAX_CLOCK_SKEW_S + 5, False), (-(MAX_CLOCK_SKEW_S + 5), False)])
def test_an_answer_more_than_5_minutes_from_our_clock_is_refused(skew_s, trusted):
    key, now = published_key(), time.time()
    headers = signed_headers(key, BODY, timestamp=int(now - skew_s))
    why = signature_problem(headers, BODY, key.public_key(), PUBLIC_KEY_ID, now)
    assert (why is None) == trusted, why


def test_an_answer_signed_by_another_key_is_refused():
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    why = signature_problem(signed_headers(other, BODY), BODY, published_key().public_key(), PUBLIC_KEY_ID, time.time())
    assert "does not verify" in why


# --- the code tables (pure) -------------------------------------------------------------------------

PAID_DOC = {"trade_state": "SUCCESS", "transaction_id": "4200001", "bank_type": "CMB_DEBIT", "out_trade_no": "T1"}
MIS = "misconfigured"


def decided(to_outcome, answer: Answer, *args):
    """`to_outcome(answer, "T1", *args)`, or MIS when it raises ProviderMisconfigured."""
    try:
        return to_outcome(answer, "T1", *args)
    except ProviderMisconfigured as e:
        assert answer.code in str(e)
        return MIS


@pytest.mark.parametrize("http,doc,signed,expected,code", [
    (200, PAID_DOC, True, Status.PAID, "SUCCESS"),
    (202, {"trade_state": "USERPAYING"}, True, Status.UNKNOWN, "USERPAYING"),
    (200, {"trade_state": "SUCCESS", "out_trade_no": "T2"}, True, Status.UNKNOWN, ""),  # about another trade
    (200, {"trade_state": "REFUND", "out_trade_no": "T1"}, True, Status.UNKNOWN, "REFUND"),
    (403, {"code": "NOTENOUGH"}, True, Status.DECLINED, "NOTENOUGH"),
    (403, {"code": "NOT_ENOUGH"}, True, Status.DECLINED, "NOT_ENOUGH"),
    (400, {"code": "AUTHCODEEXPIRE"}, True, Status.DECLINED, "AUTHCODEEXPIRE"),
    (400, {"code": "AUTH_CODE_EXPIRED"}, True, Status.DECLINED, "AUTH_CODE_EXPIRED"),
    (400, {"code": "AUTH_CODE_INVALID"}, True, Status.DECLINED, "AUTH_CODE_INVALID"),
    (400, {"code": "INVALID_REQUEST"}, True, Status.DECLINED, "INVALID_REQUEST"),
    (400, {"code": "PARAM_ERROR"}, True, Status.DECLINED, "PARAM_ERROR"),
    (403, {"code": "ORDER_CLOSED"}, True, Status.DECLINED, "ORDER_CLOSED"),
    (403, {"code": "ORDERREVERSED"}, True, Status.DECLINED, "ORDERREVERSED"),
    (403, {"code": "BUYER_MISMATCH"}, True, Status.DECLINED, "BUYER_MISMATCH"),
    (403, {"code": "RULE_LIMIT"}, True, Status.DECLINED, "RULE_LIMIT"),
    (403, {"code": "USERPAYING"}, True, Status.UNKNOWN, "USERPAYING"),
    (500, {"code": "SYSTEM_ERROR"}, True, Status.UNKNOWN, "SYSTEM_ERROR"),
    (500, {"code": "SYSTEMERROR"}, True, Status.UNKNOWN, "SYSTEMERROR"),
    (500, {"code": "BANK_ERROR"}, True, Status.UNKNOWN, "BANK_ERROR"),
    (500, {"code": "NOT_ENOUGH"}, True, Status.UNKNOWN, "NOT_ENOUGH"),  # a 5xx never declines
    (403, {"code": "TRADE_ERROR"}, True, Status.UNKNOWN, "TRADE_ERROR"),
    (403, {"code": "ORDER_PAID"}, True, Status.UNKNOWN, "ORDER_PAID"),  # a repeated number may be paid
    (403, {"code": "OUT_TRADE_NO_USED"}, True, Status.UNKNOWN, "OUT_TRADE_NO_USED"),
    (429, {"code": "FREQUENCY_LIMITED"}, True, Status.UNKNOWN, "FREQUENCY_LIMITED"),
    (403, {"code": "SOMETHING_NEW"}, True, Status.UNKNOWN, "SOMETHING_NEW"),
    (401, {"code": "SIGN_ERROR"}, True, MIS, ""),
    (400, {"code": "APPID_MCHID_NOT_MATCH"}, True, MIS, ""),
    (400, {"code": "MCH_NOT_EXISTS"}, True, MIS, ""),
    (403, {"code": "NO_AUTH"}, True, MIS, ""),
    # Unsigned error answers: at most UNKNOWN, never a decline, never a configuration fault.
    (403, {"code": "NOT_ENOUGH"}, False, Status.UNKNOWN, ""),
    (401, {"code": "SIGN_ERROR"}, False, Status.UNKNOWN, ""),
    (400, {"code": "MCH_NOT_EXISTS"}, False, Status.UNKNOWN, ""),
    (502, {}, False, Status.UNKNOWN, ""),
    (403, {"code": "NOT_ENOUGH\nSECURITY: x", "message": "a\nb"}, True, Status.UNKNOWN, "NOT_ENOUGH SECURITY: x"),
])
def test_pay_answer_table(http, doc, signed, expected, code):
    out = decided(pay_outcome, Answer(http, doc, signed))
    assert out == MIS if expected == MIS else (out.status, out.code) == (expected, code), out
    assert out == MIS or out.reason.isprintable(), out  # a platform's text never breaks a log line
    if expected is Status.PAID:
        assert (out.platform_txn_id, out.funding_source) == ("4200001", "CMB_DEBIT")


@pytest.mark.parametrize("http,doc,signed,expected", [
    (200, PAID_DOC, True, Status.PAID),
    (200, {"trade_state": "REFUND"}, True, Status.REFUNDED),
    (200, {"trade_state": "NOTPAY"}, True, Status.UNKNOWN),
    (200, {"trade_state": "USERPAYING"}, True, Status.UNKNOWN),
    (200, {"trade_state": "ACCEPT"}, True, Status.UNKNOWN),
    (200, {"trade_state": "CLOSED"}, True, Status.DECLINED),
    (200, {"trade_state": "REVOKED"}, True, Status.DECLINED),
    (200, {"trade_state": "PAYERROR"}, True, Status.DECLINED),
    (200, {"trade_state": "BRAND_NEW"}, True, Status.UNKNOWN),
    (200, {}, True, Status.UNKNOWN),
    (404, {"code": "ORDER_NOT_EXIST"}, True, Status.DECLINED),
    (404, {"code": "ORDERNOTEXIST"}, True, Status.DECLINED),
    (404, {"code": "ORDER_NOT_EXIST"}, False, Status.UNKNOWN),
    (500, {"code": "ORDER_NOT_EXIST"}, True, Status.UNKNOWN),
    (500, {"code": "SYSTEM_ERROR"}, True, Status.UNKNOWN),
    (400, {"code": "PARAM_ERROR"}, True, Status.UNKNOWN),
    (403, {"code": "NO_AUTH"}, True, MIS),
])
def test_query_answer_table(http, doc, signed, expected):
    out = decided(query_outcome, Answer(http, doc, signed))
    assert out == MIS if expected == MIS else out.status is expected, out


@pytest.mark.parametrize("http,doc,signed,expected", [
    (200, {"appid": "wx", "mchid": MCHID, "out_trade_no": "T1"}, True, Status.REVERSED),
    (204, {}, True, Status.REVERSED),
    (200, {"out_trade_no": "T2"}, True, Status.UNKNOWN),
    (500, {"code": "SYSTEM_ERROR"}, True, Status.UNKNOWN),
    (503, {}, False, Status.UNKNOWN),
    (403, {"code": "USERPAYING"}, True, Status.UNKNOWN),
    (400, {"code": "SYSTEM_ERROR"}, True, Status.UNKNOWN),
    (403, {"code": "REVERSE_EXPIRE"}, True, Status.DECLINED),
    (403, {"code": "TRADE_ERROR"}, True, Status.DECLINED),
    (403, {"code": "REVERSE_EXPIRE"}, False, Status.UNKNOWN),
    (403, {"code": "NO_AUTH"}, True, MIS),
])
def test_reverse_answer_table(http, doc, signed, expected):
    out = decided(reverse_outcome, Answer(http, doc, signed))
    assert out == MIS if expected == MIS else out.status is expected, out


@pytest.mark.parametrize("call,http,doc,signed,expected", [
    ("refund", 200, {"status": "SUCCESS", "transaction_id": "4200001"}, True, Status.REFUNDED),
    ("refund", 200, {"status": "PROCESSING"}, True, Status.UNKNOWN),
    ("refund", 200, {"status": "ABNORMAL"}, True, Status.UNKNOWN),
    ("refund", 200, {"status": "CLOSED"}, True, Status.DECLINED),
    ("refund", 200, {"status": "SUCCESS", "out_trade_no": "T2"}, True, Status.UNKNOWN),
    ("refund", 500, {"code": "SYSTEM_ERROR"}, True, Status.UNKNOWN),
    ("refund", 429, {"code": "FREQUENCY_LIMITED"}, True, Status.UNKNOWN),
    ("refund", 403, {"code": "NOT_ENOUGH"}, True, Status.DECLINED),
    ("refund", 404, {"code": "RESOURCE_NOT_EXISTS"}, True, Status.DECLINED),
    ("refund", 400, {"code": "INVALID_REQUEST"}, True, Status.DECLINED),
    ("refund", 400, {"code": "INVALID_REQUEST"}, False, Status.UNKNOWN),
    ("refund", 401, {"code": "SIGN_ERROR"}, True, MIS),
    ("query_refund", 200, {"status": "SUCCESS"}, True, Status.REFUNDED),
    ("query_refund", 200, {"status": "PROCESSING"}, True, Status.UNKNOWN),
    ("query_refund", 404, {"code": "RESOURCE_NOT_EXISTS"}, True, Status.DECLINED),
    ("query_refund", 404, {"code": "RESOURCE_NOT_EXISTS"}, False, Status.UNKNOWN),
    ("query_refund", 400, {"code": "PARAM_ERROR"}, True, Status.UNKNOWN),
])
def test_refund_answer_table(call, http, doc, signed, expected):
    out = decided(refund_outcome, Answer(http, doc, signed), call)
    assert out == MIS if expected == MIS else out.status is expected, out
    if expected is Status.REFUNDED and "transaction_id" in doc:
        assert out.platform_txn_id == "4200001"  # the payment's id, never the refund's (it would replace it)


# --- the adapter against the simulator ----------------------------------------------------------------


@pytest.mark.parametrize("scenario,status,code", [
    ("00", Status.PAID, "SUCCESS"),
    ("82", Status.DECLINED, "AUTH_CODE_INVALID"),
    ("90", Status.DECLINED, "NOT_ENOUGH"),
    ("91", Status.DECLINED, "AUTH_CODE_EXPIRED"),
    ("92", Status.UNKNOWN, "USERPAYING"),
    ("94", Status.UNKNOWN, "SYSTEM_ERROR"),
    ("96", Status.UNKNOWN, ""),
])
def test_pay_outcomes_from_the_simulator(wx, sim, scenario, status, code):
    req = pay_request(scenario)
    out = wx.pay(req)
    assert (out.status, out.code) == (status, code), out
    charged = 1 if scenario in ("00", "94", "96") else 0
    assert sim.ledger.charges(req.out_trade_no) == charged


def test_paid_answer_carries_transaction_id_and_funding_source(wx, sim):
    req = pay_request(number="S0001_L01_202611290000000011")  # odd: the ledger's card
    out = wx.pay(req)
    trade = sim.ledger.trades[req.out_trade_no]
    assert (out.platform_txn_id, out.funding_source) == (trade.transaction_id, "CMB_DEBIT")
    assert wx.query(req.out_trade_no) == out


def test_query_follows_the_trade(wx, sim):
    paying = pay_request("92")
    assert wx.pay(paying).status is Status.UNKNOWN
    assert wx.query(paying.out_trade_no).status is Status.UNKNOWN  # 1st query: still paying
    assert wx.query(paying.out_trade_no).status is Status.PAID  # 2nd: the password was entered
    declined = pay_request("90")
    wx.pay(declined)
    assert wx.query(declined.out_trade_no).code == "PAYERROR"
    assert wx.query("S0001_L01_NEVER").status is Status.DECLINED
    assert wx.reverse(paying.out_trade_no).status is Status.REVERSED
    assert wx.query(paying.out_trade_no).status is Status.REFUNDED  # paid, then reversed: refunded
    stuck = pay_request("93")
    wx.pay(stuck)
    assert wx.reverse(stuck.out_trade_no).status is Status.REVERSED
    assert (wx.query(stuck.out_trade_no).status, wx.query(stuck.out_trade_no).code) == (Status.DECLINED, "REVOKED")


def test_reverse_is_retried_while_the_platform_answers_system_error(wx, sim):
    req = pay_request("81")
    assert wx.pay(req).code == "USERPAYING"
    assert [wx.reverse(req.out_trade_no).status for _ in range(3)] == [Status.UNKNOWN, Status.UNKNOWN,
                                                                        Status.REVERSED]
    assert sim.ledger.trades[req.out_trade_no].state == "CLOSED"


def test_outside_the_reverse_window_reverse_declines_and_refund_gives_the_money_back(tmp_path):
    with WechatV3Simulator(tmp_path / "keys", Ledger(reverse_window_s=0.0)) as sim:
        wx = providers.get("wechat_v3", "kind").factory(NAME, options(sim, tmp_path), tmp_path)
        try:
            req = pay_request("00")
            assert wx.pay(req).status is Status.PAID
            time.sleep(0.01)
            out = wx.reverse(req.out_trade_no)
            assert (out.status, out.code) == (Status.DECLINED, "REVERSE_EXPIRE")
            refund = wx.refund(req.out_trade_no, req.amount_fen, req.amount_fen, f"{req.out_trade_no}R")
            assert (refund.status, refund.code) == (Status.REFUNDED, "SUCCESS")
            assert wx.query_refund(req.out_trade_no, f"{req.out_trade_no}R").status is Status.REFUNDED
            assert sim.ledger.kept(req.auth_code) == 0
        finally:
            wx.close()


def test_a_refund_first_processing_succeeds_at_the_second_query(wx, sim):
    req = pay_request("98")
    wx.pay(req)
    number = f"{req.out_trade_no}R"
    assert wx.refund(req.out_trade_no, req.amount_fen, req.amount_fen, number).code == "PROCESSING"
    assert wx.refund(req.out_trade_no, req.amount_fen, req.amount_fen, number).code == "PROCESSING"  # same refund
    assert [wx.query_refund(req.out_trade_no, number).status for _ in range(2)] == [Status.UNKNOWN, Status.REFUNDED]
    assert len([r for r in sim.ledger.refunds.values() if r.out_trade_no == req.out_trade_no]) == 1


def test_refund_refusals(wx):
    unpaid = pay_request("90")
    wx.pay(unpaid)
    assert wx.refund(unpaid.out_trade_no, 100, 100, "N1").status is Status.DECLINED
    assert wx.refund("S0001_L01_NEVER", 100, 100, "N2").code == "RESOURCE_NOT_EXISTS"
    paid = pay_request("00", 500)
    wx.pay(paid)
    assert wx.refund(paid.out_trade_no, 500, 499, "N3").code == "PARAM_ERROR"  # the total must be the order's
    assert wx.query_refund(paid.out_trade_no, "N4").status is Status.DECLINED  # never asked for


def test_a_payment_code_is_single_use_and_a_repeated_pay_charges_nothing_more(wx, sim):
    first = pay_request("00")
    assert wx.pay(first).status is Status.PAID
    again = wx.pay(first)  # the same attempt, repeated (same out_trade_no and code)
    assert again.status is Status.PAID and sim.ledger.charges(first.out_trade_no) == 1
    other = PayRequest(f"{first.out_trade_no}X", first.amount_fen, first.auth_code, "Order A2", "S0001", "L01")
    out = wx.pay(other)
    assert (out.status, out.code) == (Status.DECLINED, "AUTH_CODE_INVALID")
    assert sim.ledger.kept(first.auth_code) == 1


def test_forged_pay_answer_is_unknown_with_one_security_line_and_a_signed_query_decides(wx, sim, caplog):
    req = pay_request("80")
    outs = [wx.pay(req) for _ in range(3)]  # the first and two repeats: all forged
    assert {o.status for o in outs} == {Status.UNKNOWN}
    lines = security_lines(caplog)
    assert len(lines) == 1 and req.out_trade_no in lines[0] and "pay" in lines[0]
    assert wx.query(req.out_trade_no).status is Status.PAID
    assert sim.ledger.charges(req.out_trade_no) == 1


def test_slow_answer_is_unknown_within_the_stated_limit(make, sim):
    wx = make(connect_timeout_s=0.3, read_timeout_s=0.4)
    limit = wx.options.call_limit_s
    req = pay_request("97")
    started = time.monotonic()
    out = wx.pay(req)
    elapsed = time.monotonic() - started
    assert out.status is Status.UNKNOWN and "no answer" in out.reason
    assert elapsed <= limit + 0.5, (elapsed, limit)
    assert wx.query(req.out_trade_no).status is Status.PAID


def test_unreachable_platform_raises_unavailable_then_serves_again(wx, sim):
    sim.stop()
    req = pay_request("00")
    with pytest.raises(ProviderUnavailable):
        wx.pay(req)
    assert sim.ledger.charges(req.out_trade_no) == 0
    sim.start()
    assert wx.pay(req).status is Status.PAID


def test_calls_from_many_threads_at_once(wx, sim):
    reqs = [pay_request("00") for _ in range(8)]
    results: dict[str, Status] = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r.out_trade_no, wx.pay(r).status))
               for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {r.out_trade_no: Status.PAID for r in reqs}
    assert wx.query(reqs[3].out_trade_no).status is Status.PAID


# --- the request on the wire -----------------------------------------------------------------------


class Recording(WechatV3Simulator):
    """The real simulator, keeping every request it was sent."""

    def __init__(self, *args, **kwargs):
        self.seen: list[Request] = []
        super().__init__(*args, **kwargs)

    def handle(self, req: Request):
        self.seen.append(req)
        return super().handle(req)


def test_request_shape(tmp_path):
    with Recording(tmp_path / "keys") as sim:
        wx = WechatV3Provider(NAME, options(sim, tmp_path), tmp_path)
        try:
            req = PayRequest("S0001_L01_2026112900000042", 12_345_678, code("00"), "Order A1", "S0001", "L01")
            auth_code = req.auth_code
            wx.pay(req)
            wx.query(req.out_trade_no)
            wx.reverse(req.out_trade_no)
            wx.refund(req.out_trade_no, 100, 12_345_678, "S0001_L01_2026112900000042R")
            wx.query_refund(req.out_trade_no, "S0001_L01_2026112900000042R")
        finally:
            wx.close()
    pay, query, reverse, refund, query_refund = sim.seen
    assert json.loads(pay.body) == {
        "appid": "wxd678efh567hg6787", "mchid": MCHID, "description": "Order A1",
        "out_trade_no": "S0001_L01_2026112900000042", "payer": {"auth_code": auth_code},
        "amount": {"total": 12_345_678, "currency": "CNY"},  # integer fen, never yuan or a float
        "scene_info": {"store_info": {"out_id": "S0001"}, "device_id": "L01"}}
    assert (pay.method, pay.path) == ("POST", "/v3/pay/transactions/codepay")
    assert (query.method, query.path, query.query) == (
        "GET", "/v3/pay/transactions/out-trade-no/S0001_L01_2026112900000042", {"mchid": MCHID})
    assert query.body == b""
    assert (reverse.path, json.loads(reverse.body)) == (
        "/v3/pay/transactions/out-trade-no/S0001_L01_2026112900000042/reverse",
        {"appid": "wxd678efh567hg6787", "mchid": MCHID})
    assert (refund.path, json.loads(refund.body)) == ("/v3/refund/domestic/refunds", {
        "out_trade_no": "S0001_L01_2026112900000042", "out_refund_no": "S0001_L01_2026112900000042R",
        "amount": {"refund": 100, "total": 12_345_678, "currency": "CNY"}})
    assert (query_refund.method, query_refund.path) == ("GET", "/v3/refund/domestic/refunds/S0001_L01_2026112900000042R")
    for r in sim.seen:
        assert r.headers["accept"] == "application/json"
        assert r.headers["wechatpay-serial"] == PUBLIC_KEY_ID
        assert r.headers["user-agent"].startswith("lane-appliance/")
        assert r.headers["authorization"].startswith('WECHATPAY2-SHA256-RSA2048 mchid="1900000109",')
        assert auth_code not in json.dumps(r.headers)
    assert pay.headers["content-type"] == "application/json" and "content-type" not in query.headers


def test_an_out_trade_no_is_sent_percent_encoded_and_signed_as_sent(tmp_path):
    with Recording(tmp_path / "keys") as sim:
        wx = WechatV3Provider(NAME, options(sim, tmp_path), tmp_path)
        try:
            assert wx.query("A|B*C").status is Status.DECLINED  # signed and verified, then "no such order"
        finally:
            wx.close()
    assert sim.seen[0].path == "/v3/pay/transactions/out-trade-no/A%7CB%2AC"


# --- answers that must not be trusted -----------------------------------------------------------------


class Tampering(WechatV3Simulator):
    """The real simulator; `spoil(call, answer)` may change each answer on its way out."""

    spoil = staticmethod(lambda call, answer: answer)

    def handle(self, req: Request):
        answer = super().handle(req)
        call = self._route(req)[0]
        return self.spoil(call, answer) if call else answer


def _tamper_body(answer):
    answer.body = answer.body.replace(b"SUCCESS", b"SUCCES5")
    return answer


def _drop_signature(answer):
    answer.headers.pop("Wechatpay-Signature", None)
    return answer


def _wrong_serial(answer):
    answer.headers["Wechatpay-Serial"] = "PUB_KEY_ID_0000000000000000000000000000000099"
    return answer


def _stale(answer):
    answer.headers["Wechatpay-Timestamp"] = str(int(time.time()) - 3600)
    return answer


@pytest.mark.parametrize("spoil,why", [(_tamper_body, "does not verify"), (_drop_signature, "without Wechatpay-Signature"),
                                       (_wrong_serial, "not platform_public_key_id"), (_stale, "clock")])
def test_untrusted_pay_answers_are_unknown_with_exactly_one_security_line(tmp_path, caplog, spoil, why):
    with Tampering(tmp_path / "keys") as sim:
        sim.spoil = lambda call, answer: spoil(answer) if call == "pay" else answer
        wx = WechatV3Provider(NAME, options(sim, tmp_path), tmp_path)
        try:
            req = pay_request("00")
            outs = [wx.pay(req) for _ in range(3)]
            assert {(o.status, o.code) for o in outs} == {(Status.UNKNOWN, "")}
            assert why in outs[0].reason
            assert wx.query(req.out_trade_no).status is Status.PAID  # the signed query decides
        finally:
            wx.close()
    lines = security_lines(caplog)
    assert len(lines) == 1 and req.out_trade_no in lines[0], lines


def test_a_platform_key_other_than_the_simulators_trusts_nothing(sim, make, tmp_path, caplog):
    generate_rsa(tmp_path / "other.pem", tmp_path / "other_pub.pem")
    wx = make(platform_public_key_file=str(tmp_path / "other_pub.pem"))
    req = pay_request("90")
    assert wx.pay(req).status is Status.UNKNOWN  # a decline nobody can prove is not a decline
    assert wx.query(req.out_trade_no).status is Status.UNKNOWN
    assert len(security_lines(caplog)) == 2  # one per (call, out_trade_no)


def test_an_unsigned_error_answer_is_unknown_never_a_decline_and_no_security_event(tmp_path, caplog):
    with Tampering(tmp_path / "keys") as sim:
        sim.spoil = lambda call, answer: _drop_signature(answer)
        wx = WechatV3Provider(NAME, options(sim, tmp_path), tmp_path)
        try:
            req = pay_request("90")
            out = wx.pay(req)
            assert (out.status, out.code) == (Status.UNKNOWN, "") and "NOT_ENOUGH" in out.reason
            assert "without a signature" in out.reason
            assert wx.query("S0001_L01_NEVER").status is Status.UNKNOWN  # an unsigned 404 is not "never arrived"
        finally:
            wx.close()
    assert security_lines(caplog) == []


# --- our own configuration refused -----------------------------------------------------------------


def test_the_simulator_refuses_a_bad_request_signature(sim, tmp_path):
    generate_rsa(tmp_path / "wrong.pem", tmp_path / "wrong_pub.pem")
    from appliance.payments.keys import load_private_key
    from appliance.schema import SecretFile
    wrong = load_private_key(SecretFile(tmp_path / "wrong.pem"))
    body = b'{"appid":"wxd678efh567hg6787","mchid":"1900000109"}'
    path = "/v3/pay/transactions/out-trade-no/T1/reverse"
    cases = {
        "wrong key": authorization(wrong, mchid=MCHID, serial="5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
                                   method="POST", url=path, body=body, timestamp=str(int(time.time())), nonce="N"),
        "stale": authorization(load_private_key(SecretFile(sim.merchant_key_file)), mchid=MCHID,
                               serial="5157F09EFDC096DE15EBE81A47057A7232F1B8E1", method="POST", url=path, body=body,
                               timestamp=str(int(time.time()) - 600), nonce="N"),
        "no header": None,
    }
    for name, header in cases.items():
        r = httpx.post(sim.url + path, content=body, headers={"Authorization": header} if header else {})
        assert r.status_code == 401 and r.json()["code"] == "SIGN_ERROR", name
        assert "wechatpay-signature" not in r.headers, name  # WeChat cannot sign what it did not accept
    assert "T1" not in sim.ledger.trades  # nothing was reversed (closed)


def test_a_wrong_merchant_key_is_unknown_not_a_decline_and_logged_once(sim, make, tmp_path, caplog):
    generate_rsa(tmp_path / "wrong.pem", tmp_path / "wrong_pub.pem")
    wx = make(merchant_key_file=str(tmp_path / "wrong.pem"))
    outs = [wx.pay(pay_request("00")) for _ in range(3)]
    assert all(o.status is Status.UNKNOWN and "SIGN_ERROR" in o.reason for o in outs)
    assert sim.ledger.trades == {} and sim.ledger.calls == {"pay": 3}
    refused = [r for r in caplog.records if "refuses our request signature" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR and "merchant_key_file" in refused[0].getMessage()
    assert security_lines(caplog) == []  # our fault, not a forged answer


def test_a_signature_accepted_again_is_logged_once(sim, make, tmp_path, caplog):
    """The merchant uploads the matching certificate: the same platform now knows our key."""
    keys = tmp_path / "reissued"
    keys.mkdir()
    generate_rsa(keys / "apiclient_key.pem", keys / "merchant_pub.pem")
    for name in ("wechatpay_private.pem", "pub_key.pem"):  # the platform's own keys stay
        (keys / name).write_bytes((sim.keys_dir / name).read_bytes())
        (keys / name).chmod(0o600)
    wx = make(merchant_key_file=str(keys / "apiclient_key.pem"))
    assert wx.pay(pay_request("00")).status is Status.UNKNOWN  # the platform does not know this key yet
    sim.stop()
    with WechatV3Simulator(keys, sim.ledger, port=sim.port):
        assert [wx.pay(pay_request("00")).status for _ in range(2)] == [Status.PAID, Status.PAID]
    said = [r.getMessage() for r in caplog.records if "request signature" in r.getMessage()]
    assert len(said) == 2 and "refuses" in said[0] and "accepts our request signature again" in said[1], said


def test_a_signed_refusal_of_our_app_id_is_a_configuration_fault(sim, make):
    wx = make(appid="wx0000000000000000")
    req = pay_request("00")
    with pytest.raises(ProviderMisconfigured, match="APPID_MCHID_NOT_MATCH") as e:
        wx.pay(req)
    assert req.auth_code not in str(e.value)
    assert sim.ledger.trades == {}


# --- secrets never shown -----------------------------------------------------------------------------


def test_the_payment_code_never_reaches_a_log_line_a_repr_or_an_exception(sim, make, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    for chatty in ("httpx", "httpcore"):  # held back to warnings by logs.setup(): here they speak
        caplog.set_level(logging.DEBUG, logger=chatty)
    wx = make(read_timeout_s=0.3)
    shown, reqs = [], [pay_request(s) for s in ("00", "80", "82", "90", "92", "94", "96", "97", "00", "00")]
    for req in reqs[:-2]:
        out = wx.pay(req)
        shown += [repr(req), repr(out), str(out)]
    with pytest.raises(ProviderMisconfigured) as refused:
        make(appid="wx0000000000000000").pay(reqs[-2])
    sim.stop()
    with pytest.raises(ProviderUnavailable) as unreachable:
        wx.pay(reqs[-1])
    shown += [str(e) for e in (refused.value, unreachable.value)] + [repr(e) for e in (refused.value, unreachable.value)]
    shown += [r.getMessage() for r in caplog.records] + [repr(wx), repr(wx.options)]
    assert len(caplog.records) > 10  # DEBUG: the HTTP client's own lines are among them
    assert not [(r.auth_code[-2:], s) for r in reqs for s in shown if r.auth_code in s]


def test_options_repr_shows_key_files_not_keys(sim, tmp_path):
    opts = options(sim, tmp_path)
    key_text = sim.merchant_key_file.read_text().splitlines()[1]
    assert key_text not in repr(opts) and "apiclient_key.pem" in repr(opts)


# --- options and key files -----------------------------------------------------------------------------


def test_defaults_are_wechats(sim, tmp_path):
    raw = {k: v for k, v in sim.provider_options().items() if k not in ("kind", "base_url", "backup_base_urls")}
    opts = build(WechatV3Options, raw, f"providers.{NAME}", tmp_path)
    assert (opts.base_url, opts.backup_base_urls) == ("https://api.mch.weixin.qq.com",
                                                      ("https://api2.mch.weixin.qq.com",))
    policy = opts.policy()
    assert (policy.first_query_after_s, policy.query_every_s, policy.reverse_after_s, policy.retry_every_s) == (
        5.0, 10.0, 45.0, 10.0)
    assert opts.call_limit_s <= 15.0


def _ec_key(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _small_rsa(path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


KEY_FILE_CASES = {
    "missing": ("merchant_key_file", None, 0o600, "does not exist"),
    "open to others": ("merchant_key_file", "copy", 0o644, "open to others"),
    "not a key": ("merchant_key_file", b"hello\n", 0o600, "not an unencrypted RSA private key"),
    "an EC key": ("merchant_key_file", _ec_key, 0o600, "not an RSA key"),
    "a 1024-bit key": ("merchant_key_file", _small_rsa, 0o600, "at least 2048 bits"),
    "the public key in its place": ("merchant_key_file", "public", 0o600, "not an unencrypted RSA private key"),
    "public key missing": ("platform_public_key_file", None, 0o644, "No such file"),
    "public key not a key": ("platform_public_key_file", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                             0o644, "not an RSA public key"),
    "a private key in its place": ("platform_public_key_file", "copy", 0o600, "not an RSA public key"),
}


def _key_file(sim: WechatV3Simulator, tmp_path: Path, content, mode: int) -> Path:
    path = tmp_path / "bad.pem"
    if content == "copy":
        path.write_bytes(sim.merchant_key_file.read_bytes())
    elif content == "public":
        path.write_bytes(sim.platform_public_file.read_bytes())
    elif callable(content):
        content(path)
    elif content is not None:
        path.write_bytes(content)
    if path.exists():
        path.chmod(mode)
    return path


@pytest.mark.parametrize("case", KEY_FILE_CASES)
def test_key_file_problems_are_config_errors_naming_the_option(sim, tmp_path, case):
    option, content, mode, reason = KEY_FILE_CASES[case]
    path = _key_file(sim, tmp_path, content, mode)
    with pytest.raises(ConfigError) as e:
        options(sim, tmp_path, **{option: str(path)})
    assert e.value.key == f"providers.{NAME}.{option}" and reason in e.value.reason, e.value
    if content == "copy":
        assert sim.merchant_key_file.read_text().splitlines()[1] not in str(e.value)


@pytest.mark.parametrize("option,value", [("mchid", "19000O0109"), ("mchid", ""), ("appid", "wx123"),
                                          ("appid", "gh_0123456789abcdef"), ("merchant_serial", "not-hex!"),
                                          ("platform_public_key_id", "0114000"), ("base_url", "http://example.com"),
                                          ("backup_base_urls", ["http://api2.mch.weixin.qq.com"]),
                                          ("read_timeout_s", 7.0)])
def test_option_shapes_are_checked(sim, tmp_path, option, value):
    with pytest.raises(ConfigError) as e:
        options(sim, tmp_path, connect_timeout_s=2.0, **{option: value})
    assert e.value.key.startswith(f"providers.{NAME}.{option}"), e.value


def test_a_key_file_ending_in_newlines_works(sim, make, tmp_path):
    key = tmp_path / "key_with_newlines.pem"
    key.write_bytes(sim.merchant_key_file.read_bytes() + b"\n\n")
    key.chmod(0o640)  # group read is allowed
    public = tmp_path / "pub_crlf.pem"
    public.write_bytes(sim.platform_public_file.read_bytes().replace(b"\n", b"\r\n") + b"\r\n")
    wx = make(merchant_key_file=str(key), platform_public_key_file=str(public))
    assert wx.pay(pay_request("00")).status is Status.PAID


def test_bare_base64_platform_public_key_works(sim, make, tmp_path):
    pem = sim.platform_public_file.read_text().splitlines()
    bare = tmp_path / "pub_bare.txt"
    bare.write_text("".join(line for line in pem if not line.startswith("-----")) + "\n")
    assert base64.b64decode(bare.read_text())
    assert make(platform_public_key_file=str(bare)).pay(pay_request("00")).status is Status.PAID


@pytest.mark.integration
@pytest.mark.parametrize("case", ["open to others", "an EC key", "a private key in its place"])
def test_check_config_exits_2_naming_the_key_option(sim, tmp_path, case):
    option, content, mode, reason = KEY_FILE_CASES[case]
    provider = dict(sim.provider_options(), **{option: str(_key_file(sim, tmp_path, content, mode))})
    doc = lane_dict(tmp_path / "state", providers={"wx": provider}, routing={"wechat": "wx"})
    conf = write_config(tmp_path / "appliance.toml", doc)
    r = subprocess.run(appliance_cmd() + ["check-config", "--config", str(conf)], capture_output=True, text=True,
                       env=subprocess_env(), timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"providers.wx.{option}" in r.stderr and reason in r.stderr


# --- the example config ----------------------------------------------------------------------------------


def test_the_example_config_is_valid_with_real_key_files(tmp_path):
    text = (ROOT / "examples" / "wechat_v3.toml").read_text()
    keys = tmp_path / "keys"
    keys.mkdir()
    generate_rsa(keys / "apiclient_key.pem", keys / "apiclient_pub.pem")
    generate_rsa(keys / "wechatpay_private.pem", keys / "pub_key.pem")
    paths = dict(re.findall(r'^(merchant_key_file|platform_public_key_file)\s*=\s*"([^"]+)"', text, re.M))
    assert set(paths) == {"merchant_key_file", "platform_public_key_file"}
    text = text.replace(paths["merchant_key_file"], str(keys / "apiclient_key.pem"))
    text = text.replace(paths["platform_public_key_file"], str(keys / "pub_key.pem"))
    conf = tmp_path / "wechat_v3.toml"
    conf.write_text(text)
    cfg = load(conf)
    (name, provider), = cfg.providers.items()
    assert provider.kind == "wechat_v3" and cfg.routing["wechat"] == name
    assert provider.options.base_url == "https://api.mch.weixin.qq.com"
    wx = WechatV3Provider(name, provider.options, tmp_path)
    wx.close()


def test_the_simulator_is_found_by_its_kind():
    assert simulator_class("wechat_v3") is WechatV3Simulator


def test_an_unsigned_error_answer_nested_too_deep_for_json_is_unknown_not_an_exception(tmp_path):
    """json raises RecursionError (not a ValueError) for a deeply nested document; an unsigned error
    answer is parsed before anything is verified, so whoever answers can send one. The pay was sent:
    the call must answer UNKNOWN, not raise."""
    with Tampering(tmp_path / "keys") as sim:
        def nested(call, answer):
            answer.status, answer.body = 502, b"[" * 100_000 + b"]" * 100_000
            return _drop_signature(answer)
        sim.spoil = nested
        wx = WechatV3Provider(NAME, options(sim, tmp_path), tmp_path)
        try:
            req = pay_request("00")
            out = wx.pay(req)
            assert out.status is Status.UNKNOWN and "not a JSON object" in out.reason
            assert wx.query(req.out_trade_no).status is Status.UNKNOWN
        finally:
            wx.close()


def test_an_answer_that_cannot_be_decompressed_is_unknown_not_an_httpx_exception(tmp_path):
    """An answer whose Content-Encoding does not match its body makes httpx raise DecodingError, which
    is not a TransportError. The pay was sent (and charged): it must answer UNKNOWN, not raise."""
    with Tampering(tmp_path / "keys") as sim:
        def garbled(call, answer):
            answer.headers["Content-Encoding"] = "gzip"  # the body is plain JSON
            return answer
        sim.spoil = garbled
        wx = WechatV3Provider(NAME, options(sim, tmp_path), tmp_path)
        try:
            req = pay_request("00")
            out = wx.pay(req)
            assert out.status is Status.UNKNOWN and "DecodingError" in out.reason
            assert req.auth_code not in out.reason
            assert sim.ledger.charges(req.out_trade_no) == 1
        finally:
            wx.close()


# --- the daily bill (head office's call) ------------------------------------------------------------


def test_the_bill_of_a_day_lists_its_payments_refunds_and_reversals(wx, sim):
    day, expected = a_billed_day(wx, sim.ledger)
    bill = wx.bill(day)
    check_fetched(bill, expected, sim.ledger)
    assert sim.ledger.calls["bill"] == sim.ledger.calls["bill_download"] == 1


@pytest.mark.parametrize("fault", [None, "plain"], ids=["gzip", "plain"])
def test_a_bill_is_read_gzipped_or_plain(wx, sim, fault):
    day, expected = a_billed_day(wx, sim.ledger)
    sim.bill_fault = fault
    check_fetched(wx.bill(day), expected, sim.ledger)


def test_not_yet_before_nine_the_next_morning_and_no_transactions_on_an_empty_day(wx, sim):
    day, _ = a_billed_day(wx, sim.ledger, hour=8.99)
    assert wx.bill(day).state is BillState.NOT_YET
    sim.ledger.clock.t = next_morning(day, hour=9)
    assert wx.bill(day).state is BillState.FETCHED
    assert wx.bill(day - dt.timedelta(days=1)).state is BillState.NO_TRANSACTIONS


@pytest.mark.parametrize("fault, words", [
    ("hash", "hash mismatch"),
    ("summary", "the bill's summary disagrees with its lines: paid_fen"),
    ("garbled", "line 1: not UTF-8"),
])
def test_a_wrong_file_is_a_bill_error_naming_the_platform_and_the_day(wx, sim, fault, words):
    day, _ = a_billed_day(wx, sim.ledger)
    sim.bill_fault = fault
    bill_error(wx, day, words)


def test_an_expired_download_link_is_unavailable_not_an_error(wx, sim):
    day, _ = a_billed_day(wx, sim.ledger)
    sim.bill_link_s = -1.0
    with pytest.raises(BillUnavailable, match="INVALID_REQUEST"):
        wx.bill(day)
    sim.bill_link_s = 30.0
    assert wx.bill(day).state is BillState.FETCHED  # apply again: a fresh link


@pytest.mark.parametrize("base", ["http://192.0.2.10:8080", "ftp://127.0.0.1:21", "http://user:pw@127.0.0.1:1"])
def test_a_download_link_that_is_not_https_or_loopback_is_refused_unfetched(wx, sim, base):
    day, _ = a_billed_day(wx, sim.ledger)
    sim.bill_link_base = base
    bill_error(wx, day, "download_url not fetched: ")
    assert "bill_download" not in sim.ledger.calls


def test_the_download_needs_a_signature_over_its_path_and_query(tmp_path):
    with Recording(tmp_path / "keys") as sim:
        wx = WechatV3Provider(NAME, options(sim, tmp_path), tmp_path)
        try:
            day, _ = a_billed_day(wx, sim.ledger)
            wx.bill(day)
        finally:
            wx.close()
        apply, download = [r for r in sim.seen if "bill" in r.path]
        assert (apply.path, apply.query) == ("/v3/bill/tradebill", {"bill_date": day.isoformat(), "bill_type": "ALL",
                                                                    "tar_type": "GZIP"})
        assert download.path == "/v3/billdownload/file" and download.query["tartype"] == "gzip"
        link = f"{sim.url}{download.path}?token={download.query['token']}&tartype=gzip"
        unsigned = httpx.get(link)
        assert unsigned.status_code == 401 and "wechatpay-signature" not in unsigned.headers
        key = load_private_key(SecretFile(sim.merchant_key_file))
        over_path_only = authorization(key, mchid=MCHID, serial=MERCHANT_SERIAL, method="GET", url=download.path,
                                       body=b"", timestamp=str(int(time.time())), nonce="N1")
        assert httpx.get(link, headers={"Authorization": over_path_only}).status_code == 401
        answer = httpx.get(link, headers={"Authorization": download.headers["authorization"]})
        assert answer.status_code == 200 and not any(k.lower().startswith("wechatpay") for k in answer.headers)


def test_days_that_cannot_have_a_bill(wx, sim):
    """Today and later are not asked for by head office (reconcile refuses them); the simulator
    answers them STATEMENT_CREATING. A day older than WeChat keeps is INVALID_REQUEST."""
    today = beijing_day(sim.ledger.clock())
    assert wx.bill(today).state is wx.bill(today + dt.timedelta(days=1)).state is BillState.NOT_YET
    with pytest.raises(BillError, match="INVALID_REQUEST"):
        wx.bill(today - dt.timedelta(days=100))


def test_an_unreachable_platform_is_unavailable(wx, sim):
    sim.stop()
    with pytest.raises(BillUnavailable, match=f"platform {NAME}: bill of"):
        wx.bill(past_day())


def test_an_apply_answer_that_does_not_verify_is_an_error_and_a_security_event(sim, make, tmp_path, caplog):
    generate_rsa(tmp_path / "other.pem", tmp_path / "other_pub.pem")
    wx = make(platform_public_key_file=str(tmp_path / "other_pub.pem"))
    with pytest.raises(BillError, match="does not verify") as e:
        wx.bill(past_day())
    assert not isinstance(e.value, BillUnavailable)
    assert len(security_lines(caplog)) == 1 and "bill" in security_lines(caplog)[0]
    assert "bill_download" not in sim.ledger.calls


def test_a_refused_request_signature_is_an_error(sim, make, tmp_path):
    generate_rsa(tmp_path / "wrong.pem", tmp_path / "wrong_pub.pem")
    wx = make(merchant_key_file=str(tmp_path / "wrong.pem"))
    with pytest.raises(BillError, match="SIGN_ERROR") as e:
        wx.bill(past_day())
    assert not isinstance(e.value, BillUnavailable)


def test_the_adapter_says_it_has_a_bill(wx):
    assert wx.has_bill

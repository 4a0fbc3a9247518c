"""WeChat Pay v2 (`kind = "wechat_v2"`): the protocol, the adapter against its simulator over loopback
HTTP (and HTTPS with a client certificate), the key files, the example config.

Platform behaviour the ledger does not script (tampered answers, every err_code) comes from
subclasses of the simulator that change what goes on the wire: the adapter under test is always
the real one, talking HTTP.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from appliance.config import from_dict, load
from appliance.errors import ConfigError, ProviderError, ProviderMisconfigured, ProviderUnavailable
from appliance.payments import PayRequest, Status, make_provider
from appliance.payments.bills import BillError, BillState, BillUnavailable, beijing_day
from appliance.payments.wechat_v2 import (MISCONFIGURED, PAY_DECLINED, PAY_UNKNOWN, WechatV2Options, from_xml, sign,
                                          signed_correctly, to_xml)
from appliance.simulators import Answer, Request
from appliance.simulators.ledger import Ledger
from appliance.simulators.wechat_v2 import APPID, MCH_ID, WechatV2Simulator, new_certificate, private_pem
from conftest import ALL_TYPES, ROOT, appliance_cmd, lane_dict, subprocess_env, write_config
from test_wechat_bill import a_billed_day, bill_error, check_fetched, next_morning, past_day

CODE = "134567890123456700"  # paid at once (the ledger's scenario table: the last two digits)


def code(tail: str, serial: int = 0) -> str:
    return f"13{serial:014d}{tail}"


def pay_request(out_trade_no: str = "S0001_L01_A1", amount_fen: int = 1234, auth_code: str = CODE) -> PayRequest:
    return PayRequest(out_trade_no, amount_fen, auth_code, "Order A1", "S0001", "L01")


class Lab:
    """Adapters built through the config schema, as `appliance run` builds them; all closed at the end."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.providers = []

    def options(self, table: dict, **overrides):
        doc = lane_dict(self.tmp / "state", providers={"wx": {**table, **overrides}},
                        routing={t: "wx" for t in ALL_TYPES})
        return from_dict(doc).providers["wx"]

    def provider(self, table: dict, **overrides):
        p = make_provider("wx", self.options(table, **overrides), self.tmp / "state")
        self.providers.append(p)
        return p

    def close(self):
        for p in self.providers:
            p.close()


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


@pytest.fixture
def sim(tmp_path):
    s = WechatV2Simulator(tmp_path / "keys", Ledger(slow_s=2.0)).start()
    yield s
    s.stop()


@pytest.fixture
def wx(lab, sim):
    """The adapter pointed at the simulator, with short time limits."""
    return lab.provider(sim.provider_options(), connect_timeout_s=0.5, read_timeout_s=0.5)


def security_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "SECURITY" in r.getMessage()]


# --- the signature: WeChat's published vector (payments.md §2.3) -------------------------------------

VECTOR = {"appid": "wxd930ea5d5a258f4f", "mch_id": "10000100", "device_info": "1000", "body": "test",
          "nonce_str": "ibuaiVcKdpRxkhJA"}
VECTOR_KEY = "192006250b4c09247ec02edce69f6a2d"


@pytest.mark.parametrize("sign_type, expected", [
    ("MD5", "9A0A8659F005D6984697E2CA0A9CF3B7"),
    ("HMAC-SHA256", "6A9AE1657590FD6257D693A078E1C3E4BB6BA4DC30B23E0EE2496E54170DACD6"),
])
def test_signature_matches_the_published_vector(sign_type, expected):
    assert sign(VECTOR, VECTOR_KEY, sign_type) == expected


@pytest.mark.parametrize("fields", [
    {**VECTOR, "sign": "ANYTHING"},  # sign itself is not signed
    {**VECTOR, "attach": ""},  # empty fields are left out
    dict(reversed(VECTOR.items())),  # the order given does not matter: sorted by name
], ids=["sign-excluded", "empty-excluded", "order-free"])
def test_signature_covers_exactly_the_non_empty_fields(fields):
    assert sign(fields, VECTOR_KEY, "MD5") == "9A0A8659F005D6984697E2CA0A9CF3B7"


@pytest.mark.parametrize("change", [{"body": "test2"}, {"device_info": ""}, {"extra": "1"}],
                         ids=["value", "emptied", "added"])
def test_signature_changes_with_any_signed_field(change):
    assert sign({**VECTOR, **change}, VECTOR_KEY, "MD5") != "9A0A8659F005D6984697E2CA0A9CF3B7"


def test_signed_correctly_needs_the_sign_of_this_key_and_type():
    signed = {**VECTOR, "sign": sign(VECTOR, VECTOR_KEY, "HMAC-SHA256")}
    assert signed_correctly(signed, VECTOR_KEY, "HMAC-SHA256")
    assert not signed_correctly(signed, VECTOR_KEY, "MD5")
    assert not signed_correctly(signed, "0" * 32, "HMAC-SHA256")
    assert not signed_correctly(VECTOR, VECTOR_KEY, "HMAC-SHA256")  # no sign at all


# --- the XML --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, fields", [
    ("<xml><return_code><![CDATA[SUCCESS]]></return_code><total_fee>1</total_fee></xml>",
     {"return_code": "SUCCESS", "total_fee": "1"}),
    ("<xml><err_code_des><![CDATA[余额不足]]></err_code_des><attach></attach></xml>",
     {"err_code_des": "余额不足", "attach": ""}),
    ("<xml>\n  <body>a &amp; b &lt;c&gt;</body>\n</xml>", {"body": "a & b <c>"}),
])
def test_from_xml_reads_flat_documents(text, fields):
    assert from_xml(text) == fields


@pytest.mark.parametrize("text", [
    '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><xml><k>&b;</k></xml>',
    "<xml><a><b>1</b></a></xml>",
    "<xml><a>1</a><a>2</a></xml>",
    "<root><a>1</a></root>",
    "return_code=SUCCESS",
    "<xml><a>1</a>",
    "",
], ids=["entities", "nested", "repeated", "other-root", "not-xml", "truncated", "empty"])
def test_from_xml_refuses_anything_else(text):
    with pytest.raises(ValueError):
        from_xml(text)


@pytest.mark.parametrize("cdata", [False, True])
def test_to_xml_round_trips_any_text(cdata):
    fields = {"body": "Order <1> & ]]> 订单", "total_fee": "1234", "empty": ""}
    assert from_xml(to_xml(fields, cdata=cdata).decode("utf-8")) == fields


# --- the requests, as the platform receives them -------------------------------------------------------


class Recording(WechatV2Simulator):
    """The simulator, keeping every request it was sent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[Request] = []

    def handle(self, req: Request) -> Answer:
        self.seen.append(req)
        return super().handle(req)

    def fields(self, i: int = -1) -> dict[str, str]:
        return from_xml(self.seen[i].body.decode("utf-8"))


@pytest.fixture
def recording(tmp_path):
    s = Recording(tmp_path / "keys").start()
    yield s
    s.stop()


def test_pay_request_carries_fen_ids_and_a_verifiable_signature(lab, recording):
    wx = lab.provider(recording.provider_options())
    assert wx.pay(pay_request(amount_fen=1234)).status is Status.PAID
    req, f = recording.seen[-1], recording.fields()
    assert (req.method, req.path) == ("POST", "/pay/micropay")
    assert req.headers["content-type"] == "text/xml; charset=utf-8"
    assert set(f) == {"appid", "mch_id", "nonce_str", "sign_type", "sign", "body", "out_trade_no", "total_fee",
                      "spbill_create_ip", "auth_code", "device_info", "attach"}
    assert (f["appid"], f["mch_id"]) == (APPID, MCH_ID)
    assert f["total_fee"] == "1234"  # fen, an integer
    assert f["out_trade_no"] == "S0001_L01_A1" and f["auth_code"] == CODE
    assert (f["device_info"], f["attach"], f["body"]) == ("L01", "S0001", "Order A1")  # terminal, store, subject
    ipaddress.ip_address(f["spbill_create_ip"])
    assert f["sign_type"] == "HMAC-SHA256" and len(f["nonce_str"]) == 32
    assert signed_correctly(f, recording.api_key, "HMAC-SHA256")


def test_every_request_has_its_own_nonce(lab, recording):
    wx = lab.provider(recording.provider_options())
    for _ in range(3):
        wx.query("S0001_L01_A1")
    assert len({from_xml(r.body.decode())["nonce_str"] for r in recording.seen}) == 3


def test_md5_requests_send_no_sign_type_and_are_answered_in_md5(lab, recording):
    wx = lab.provider(recording.provider_options(), sign_type="MD5")
    assert wx.pay(pay_request()).status is Status.PAID  # the answer verified with MD5
    f = recording.fields()
    assert "sign_type" not in f and signed_correctly(f, recording.api_key, "MD5")


def test_body_is_clipped_to_127_bytes_without_commas(lab, recording):
    wx = lab.provider(recording.provider_options())
    wx.pay(PayRequest("S0001_L01_A2", 100, CODE, "订单,一" * 40, "S0001", "L01"))
    body = recording.fields()["body"]
    assert len(body.encode("utf-8")) <= 127 and "," not in body and body.startswith("订单 一")


@pytest.mark.parametrize("call, args, path, fields", [
    ("query", ("T1",), "/pay/orderquery", {"out_trade_no": "T1"}),
    ("reverse", ("T1",), "/secapi/pay/reverse", {"out_trade_no": "T1"}),
    ("refund", ("T1", 500, 1234, "T1R"), "/secapi/pay/refund",
     {"out_trade_no": "T1", "out_refund_no": "T1R", "refund_fee": "500", "total_fee": "1234"}),
    ("query_refund", ("T1", "T1R"), "/pay/refundquery", {"out_refund_no": "T1R"}),
])
def test_each_call_goes_to_its_path_with_its_fields(lab, recording, call, args, path, fields):
    wx = lab.provider(recording.provider_options())
    getattr(wx, call)(*args)
    assert recording.seen[-1].path == path
    f = recording.fields()
    assert {k: f[k] for k in fields} == fields
    assert set(f) - set(fields) == {"appid", "mch_id", "nonce_str", "sign_type", "sign"}
    assert signed_correctly(f, recording.api_key, "HMAC-SHA256")


# --- the scenario table, in WeChat's codes ----------------------------------------------------------------


@pytest.mark.parametrize("tail, status, err_code, then", [
    ("00", Status.PAID, "SUCCESS", Status.PAID),
    ("82", Status.DECLINED, "AUTH_CODE_INVALID", Status.DECLINED),
    ("90", Status.DECLINED, "NOTENOUGH", Status.DECLINED),
    ("91", Status.DECLINED, "AUTHCODEEXPIRE", Status.DECLINED),
    ("92", Status.UNKNOWN, "USERPAYING", Status.UNKNOWN),  # the 2nd query finds it paid
    ("93", Status.UNKNOWN, "USERPAYING", Status.UNKNOWN),
    ("94", Status.UNKNOWN, "SYSTEMERROR", Status.PAID),  # money taken all the same
    ("96", Status.UNKNOWN, "", Status.PAID),  # connection dropped after the charge: no code came back
])
def test_pay_answers_in_wechat_codes_and_the_query_agrees(wx, sim, tail, status, err_code, then):
    out = wx.pay(pay_request(auth_code=code(tail)))
    assert (out.status, out.code) == (status, err_code), out.reason
    assert wx.query("S0001_L01_A1").status is then
    assert sim.ledger.charges("S0001_L01_A1") == (1 if then is Status.PAID else 0)


def test_paid_answers_carry_the_transaction_id_and_bank_type(wx, sim):
    paid = wx.pay(pay_request("S0001_L01_A2"))  # even out_trade_no: the wallet's balance (the ledger's rule)
    card = wx.pay(pay_request("S0001_L01_A3", auth_code=code("00", 1)))  # odd: a bank card
    trade = sim.ledger.trades["S0001_L01_A2"]
    assert (paid.platform_txn_id, paid.funding_source) == (trade.transaction_id, "CFT")
    assert card.funding_source == "CMB_DEBIT"
    queried = wx.query("S0001_L01_A2")
    assert (queried.status, queried.platform_txn_id, queried.funding_source) == (Status.PAID, trade.transaction_id,
                                                                                "CFT")


def test_user_paying_is_paid_at_the_second_query(wx):
    assert wx.pay(pay_request(auth_code=code("92"))).status is Status.UNKNOWN
    assert [wx.query("S0001_L01_A1").status for _ in range(2)] == [Status.UNKNOWN, Status.PAID]


def test_a_code_is_single_use_and_a_retry_charges_once(wx, sim):
    assert wx.pay(pay_request("S0001_L01_A1")).status is Status.PAID
    assert wx.pay(pay_request("S0001_L01_A1")).status is Status.PAID  # the same attempt again: as it stands
    used = wx.pay(pay_request("S0001_L01_A2"))  # the same code in a new attempt
    assert (used.status, used.code) == (Status.DECLINED, "AUTH_CODE_INVALID")
    assert sim.ledger.kept(CODE) == 1 and sim.ledger.charges("S0001_L01_A1") == 1


def test_query_of_a_trade_never_sent_is_declined(wx):
    out = wx.query("S0001_L01_NONE")
    assert (out.status, out.code) == (Status.DECLINED, "ORDERNOTEXIST")


def test_reverse_of_an_unpaid_trade_closes_it_and_the_query_says_revoked(wx, sim):
    wx.pay(pay_request(auth_code=code("93")))
    assert wx.reverse("S0001_L01_A1").status is Status.REVERSED
    out = wx.query("S0001_L01_A1")
    assert (out.status, out.code) == (Status.DECLINED, "REVOKED")
    assert sim.ledger.kept(code("93")) == 0


def test_reverse_of_a_paid_trade_refunds_it_and_the_query_says_refund(wx, sim):
    wx.pay(pay_request())
    assert wx.reverse("S0001_L01_A1").status is Status.REVERSED
    assert wx.query("S0001_L01_A1").status is Status.REFUNDED
    assert sim.ledger.kept(CODE) == 0


def test_recall_y_is_obeyed_with_either_result_code(wx, sim):
    wx.pay(pay_request(auth_code=code("81")))
    first, second, third = (wx.reverse("S0001_L01_A1") for _ in range(3))
    assert (first.status, first.code) == (Status.UNKNOWN, "SUCCESS")  # result SUCCESS, recall=Y
    assert (second.status, second.code) == (Status.UNKNOWN, "SYSTEMERROR")  # result FAIL, recall=Y
    assert third.status is Status.REVERSED
    assert sim.ledger.trades["S0001_L01_A1"].reverses == 3


def test_reverse_outside_the_window_is_declined_and_the_refund_confirmed_by_query(wx, sim):
    sim.ledger.reverse_window_s = 0.0
    wx.pay(pay_request(auth_code=code("98")))  # its refund is processing at first
    time.sleep(0.01)
    out = wx.reverse("S0001_L01_A1")
    assert (out.status, out.code) == (Status.DECLINED, "REVERSE_EXPIRE")
    accepted = wx.refund("S0001_L01_A1", 1234, 1234, "S0001_L01_A1R")
    assert (accepted.status, accepted.code) == (Status.UNKNOWN, "SUCCESS")  # only accepted
    assert wx.refund("S0001_L01_A1", 1234, 1234, "S0001_L01_A1R").status is Status.UNKNOWN  # same number: same refund
    states = [wx.query_refund("S0001_L01_A1", "S0001_L01_A1R") for _ in range(2)]
    assert [(s.status, s.code) for s in states] == [(Status.UNKNOWN, "PROCESSING"), (Status.REFUNDED, "SUCCESS")]
    assert states[1].platform_txn_id == sim.ledger.trades["S0001_L01_A1"].transaction_id
    assert sim.ledger.kept(code("98")) == 0 and len(sim.ledger.refunds) == 1


@pytest.mark.parametrize("args, err_code", [
    (("S0001_L01_NONE", 1234, 1234, "S0001_L01_NONER"), "ORDERNOTEXIST"),
    (("S0001_L01_A1", 1234, 9999, "S0001_L01_A1R"), "INVALID_REQUEST"),  # not the order's total
    (("S0001_L01_A1", 2000, 1234, "S0001_L01_A1R"), "INVALID_REQUEST"),  # more than was paid
])
def test_a_refused_refund_is_declined(wx, sim, args, err_code):
    wx.pay(pay_request())
    out = wx.refund(*args)
    assert (out.status, out.code) == (Status.DECLINED, err_code)
    assert sim.ledger.kept(CODE) == 1


def test_query_of_a_refund_never_made_is_declined(wx):
    wx.pay(pay_request())
    out = wx.query_refund("S0001_L01_A1", "S0001_L01_A1R")
    assert (out.status, out.code) == (Status.DECLINED, "REFUNDNOTEXIST")


# --- every err_code, as a platform sending exactly that would -------------------------------------------


class Scripted(WechatV2Simulator):
    """Answers every call with `script[path]`, signed (or `raw`, an Answer as it is)."""

    script: dict[str, dict[str, str]] = {}
    raw: Answer | None = None

    def handle(self, req: Request) -> Answer:
        if self.raw is not None:
            return self.raw
        sign_type = from_xml(req.body.decode("utf-8")).get("sign_type") or "MD5"
        return self.signed_answer(sign_type, self.script[req.path])


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """One scripted platform and one adapter for it, for the whole table (building adapters is slow)."""
    tmp = tmp_path_factory.mktemp("scripted")
    s = Scripted(tmp / "keys").start()
    lab = Lab(tmp)
    s.wx = lab.provider(s.provider_options())
    yield s
    lab.close()
    s.stop()


@pytest.fixture
def script(scripted):
    """The scripted platform, its script and raw answer reset after each test."""
    yield scripted
    scripted.script, scripted.raw = {}, None


def ok(**more):
    return {"result_code": "SUCCESS", **more}


def fail(err_code, **more):
    return {"result_code": "FAIL", "err_code": err_code, "err_code_des": f"text of {err_code}", **more}


CALLS = {
    "pay": ("/pay/micropay", lambda p: p.pay(pay_request())),
    "query": ("/pay/orderquery", lambda p: p.query("S0001_L01_A1")),
    "reverse": ("/secapi/pay/reverse", lambda p: p.reverse("S0001_L01_A1")),
    "refund": ("/secapi/pay/refund", lambda p: p.refund("S0001_L01_A1", 1234, 1234, "S0001_L01_A1R")),
    "query_refund": ("/pay/refundquery", lambda p: p.query_refund("S0001_L01_A1", "S0001_L01_A1R")),
}

MAPPING = [
    ("pay", ok(transaction_id="4200", bank_type="CFT"), Status.PAID, "SUCCESS"),
    *[("pay", fail(c), Status.DECLINED, c) for c in sorted(PAY_DECLINED)],
    *[("pay", fail(c), Status.UNKNOWN, c) for c in sorted(PAY_UNKNOWN)],
    ("pay", fail("SOMETHING_NEW"), Status.UNKNOWN, "SOMETHING_NEW"),  # unknown codes: a query decides
    ("query", ok(trade_state="SUCCESS", transaction_id="4200"), Status.PAID, "SUCCESS"),
    ("query", ok(trade_state="REFUND"), Status.REFUNDED, "REFUND"),
    *[("query", ok(trade_state=s), Status.UNKNOWN, s) for s in ("NOTPAY", "USERPAYING", "ACCEPT", "NEWSTATE")],
    *[("query", ok(trade_state=s), Status.DECLINED, s) for s in ("CLOSED", "REVOKED", "PAYERROR")],
    ("query", fail("ORDERNOTEXIST"), Status.DECLINED, "ORDERNOTEXIST"),
    ("query", fail("SYSTEMERROR"), Status.UNKNOWN, "SYSTEMERROR"),
    ("reverse", ok(recall="N"), Status.REVERSED, "SUCCESS"),
    ("reverse", ok(), Status.REVERSED, "SUCCESS"),
    ("reverse", ok(recall="Y"), Status.UNKNOWN, "SUCCESS"),
    ("reverse", fail("SYSTEMERROR", recall="Y"), Status.UNKNOWN, "SYSTEMERROR"),
    ("reverse", fail("SYSTEMERROR", recall="N"), Status.UNKNOWN, "SYSTEMERROR"),
    ("reverse", fail("REVERSE_EXPIRE", recall="N"), Status.DECLINED, "REVERSE_EXPIRE"),
    ("reverse", fail("TRADE_ERROR", recall="N"), Status.DECLINED, "TRADE_ERROR"),
    ("refund", ok(refund_id="5000"), Status.UNKNOWN, "SUCCESS"),  # accepted only
    *[("refund", fail(c), Status.UNKNOWN, c) for c in ("SYSTEMERROR", "BIZERR_NEED_RETRY", "FREQUENCY_LIMITED")],
    *[("refund", fail(c), Status.DECLINED, c) for c in ("NOTENOUGH", "TRADE_OVERDUE", "INVALID_REQUEST", "ERROR",
                                                         "USER_ACCOUNT_ABNORMAL", "TRADE_STATE_ERROR")],
    ("query_refund", ok(refund_status_0="SUCCESS"), Status.REFUNDED, "SUCCESS"),
    ("query_refund", ok(refund_status_0="PROCESSING"), Status.UNKNOWN, "PROCESSING"),
    ("query_refund", ok(refund_status_0="CHANGE"), Status.DECLINED, "CHANGE"),
    ("query_refund", ok(refund_status_0="REFUNDCLOSE"), Status.DECLINED, "REFUNDCLOSE"),
    ("query_refund", fail("REFUNDNOTEXIST"), Status.DECLINED, "REFUNDNOTEXIST"),
    ("query_refund", fail("SYSTEMERROR"), Status.UNKNOWN, "SYSTEMERROR"),
]


@pytest.mark.parametrize("call, result, status, platform_code", MAPPING,
                         ids=[f"{c}-{r.get('err_code') or r.get('trade_state') or r.get('refund_status_0') or 'OK'}"
                              f"-{r.get('recall', '')}" for c, r, _, _ in MAPPING])
def test_each_answer_maps_to_its_status_and_keeps_the_platform_code(script, call, result, status, platform_code):
    path, invoke = CALLS[call]
    script.script = {path: result}
    out = invoke(script.wx)
    assert (out.status, out.code) == (status, platform_code), out.reason
    if "transaction_id" in result:
        assert out.platform_txn_id == result["transaction_id"]


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("err_code", sorted(MISCONFIGURED))
def test_a_verified_refusal_of_our_configuration_raises_misconfigured(script, call, err_code):
    path, invoke = CALLS[call]
    script.script = {path: fail(err_code)}
    with pytest.raises(ProviderMisconfigured, match=err_code):
        invoke(script.wx)


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("raw", [
    Answer(500, b"<html>Internal Server Error</html>"),
    Answer(502, to_xml({"return_code": "SUCCESS", "result_code": "SUCCESS"})),
    Answer(200, b"<html>captive portal</html>"),
    Answer(200, b"\xff\xfe<xml></xml>"),
    Answer(200, to_xml({"return_code": "FAIL", "return_msg": "签名错误"})),
    Answer(200, to_xml({"return_code": "FAIL", "return_msg": "mch_id参数格式错误", "err_code": "SIGNERROR"})),
], ids=["500", "502-xml", "not-xml", "not-utf8", "return-fail", "return-fail-with-err_code"])
def test_unusable_and_unsigned_refusals_are_unknown_never_declined(script, call, raw, caplog):
    script.raw = raw
    out = CALLS[call][1](script.wx)
    assert out.status is Status.UNKNOWN, out.reason
    assert not security_lines(caplog)  # a refusal or a broken answer is not a forgery


# --- answers that do not verify ----------------------------------------------------------------------------


class Tampering(WechatV2Simulator):
    """Changes the answers on the wire, after the platform signed them, as an intermediary could."""

    change = "none"

    def handle(self, req: Request) -> Answer:
        answer = super().handle(req)
        fields = from_xml(answer.body.decode("utf-8"))
        if self.change == "tampered":
            fields["bank_type"] = "ICBC_CREDIT"
        elif self.change == "wrong key":
            fields["sign"] = sign(fields, "K" * 32, "HMAC-SHA256")
        elif self.change == "no sign":
            del fields["sign"]
        elif self.change == "replayed":  # another trade's answer, genuinely signed
            fields["out_trade_no"] = "S0001_L01_OTHER"
            fields["sign"] = sign(fields, self.api_key, "HMAC-SHA256")
        answer.body = to_xml(fields)
        return answer


@pytest.fixture
def tampering(tmp_path):
    s = Tampering(tmp_path / "keys").start()
    yield s
    s.stop()


@pytest.mark.parametrize("change", ["tampered", "wrong key", "no sign", "replayed"])
def test_an_answer_that_does_not_verify_is_unknown_and_logged_once(lab, tampering, change, caplog):
    caplog.set_level(logging.INFO)
    wx = lab.provider(tampering.provider_options())
    tampering.change = change
    outcomes = [wx.pay(pay_request()) for _ in range(3)] + [wx.query("S0001_L01_A1") for _ in range(2)]
    assert {o.status for o in outcomes} == {Status.UNKNOWN}
    assert all(o.platform_txn_id is None and o.funding_source is None for o in outcomes)
    lines = security_lines(caplog)
    assert len(lines) == 2, lines  # once for the pay, once for the query: not on every retry
    assert "the pay answer for S0001_L01_A1" in lines[0] and "the query answer for S0001_L01_A1" in lines[1]
    tampering.change = "none"
    assert wx.query("S0001_L01_A1").status is Status.PAID  # the signed query decides
    assert tampering.ledger.charges("S0001_L01_A1") == 1


def test_the_forged_scenario_80_is_not_believed_until_a_signed_query(wx, sim, caplog):
    out = wx.pay(pay_request(auth_code=code("80")))
    assert out.status is Status.UNKNOWN and "signature does not verify" in out.reason
    assert len(security_lines(caplog)) == 1
    assert wx.query("S0001_L01_A1").status is Status.PAID


# --- the simulator's own checks, and ours ------------------------------------------------------------------


def test_the_simulator_refuses_a_bad_request_signature_unsigned_as_wechat_does(sim):
    fields = {"appid": APPID, "mch_id": MCH_ID, "nonce_str": "n" * 32, "out_trade_no": "S0001_L01_A1",
              "body": "Order A1", "total_fee": "1234", "spbill_create_ip": "127.0.0.1", "auth_code": CODE,
              "sign_type": "HMAC-SHA256"}
    for wrong in (sign(fields, "W" * 32, "HMAC-SHA256"), sign(fields, sim.api_key, "MD5"), ""):
        r = httpx.post(sim.url + "/pay/micropay", content=to_xml({**fields, "sign": wrong}))
        answer = from_xml(r.content.decode("utf-8"))
        assert answer == {"return_code": "FAIL", "return_msg": "签名错误"}
    assert not sim.ledger.trades and "pay" not in sim.ledger.calls
    good = httpx.post(sim.url + "/pay/micropay", content=to_xml({**fields, "sign": sign(fields, sim.api_key,
                                                                                         "HMAC-SHA256")}))
    assert from_xml(good.content.decode("utf-8"))["result_code"] == "SUCCESS"  # the same request, signed: paid


def test_a_wrong_api_key_gets_unknown_never_declined_and_charges_nothing(lab, sim, tmp_path, caplog):
    other = tmp_path / "other-key"
    other.write_text("A" * 32)
    other.chmod(0o600)
    wx = lab.provider(sim.provider_options(), api_key_file=str(other))
    out = wx.pay(pay_request())
    assert (out.status, out.code) == (Status.UNKNOWN, "FAIL") and "签名错误" in out.reason
    assert wx.reverse("S0001_L01_A1").status is Status.UNKNOWN
    assert not sim.ledger.trades and not security_lines(caplog)


def test_a_signed_refusal_of_our_appid_is_misconfigured_and_nothing_is_charged(lab, sim):
    wx = lab.provider(sim.provider_options(), appid="wx0000000000000000")
    with pytest.raises(ProviderMisconfigured, match="APPID_MCHID_NOT_MATCH"):
        wx.pay(pay_request())
    assert not sim.ledger.trades


def test_an_api_key_file_ending_in_a_newline_works(lab, sim):
    Path(sim.provider_options()["api_key_file"]).write_text(sim.api_key + "\n")
    assert lab.provider(sim.provider_options()).pay(pay_request()).status is Status.PAID


def test_a_slow_answer_is_unknown_within_the_stated_limit(lab, sim):
    wx = lab.provider(sim.provider_options(), connect_timeout_s=0.2, read_timeout_s=0.3)
    limit = lab.options(sim.provider_options(), connect_timeout_s=0.2, read_timeout_s=0.3).options.call_limit_s
    t0 = time.monotonic()
    out = wx.pay(pay_request(auth_code=code("97")))  # answered after 2 s
    took = time.monotonic() - t0
    assert out.status is Status.UNKNOWN and "no answer" in out.reason
    assert took < limit + 0.2, (took, limit)
    assert wx.query("S0001_L01_A1").status is Status.PAID and sim.ledger.charges("S0001_L01_A1") == 1


def test_an_unreachable_platform_raises_unavailable_and_nothing_was_sent(lab, sim):
    wx = lab.provider(sim.provider_options(), connect_timeout_s=0.5)
    sim.stop()
    for call in (lambda: wx.pay(pay_request()), lambda: wx.reverse("S0001_L01_A1")):
        with pytest.raises(ProviderUnavailable):
            call()
    sim.start()
    assert not sim.ledger.trades


def test_calls_from_two_threads_at_once_are_independent(lab, sim):
    wx = lab.provider(sim.provider_options())
    results: dict[int, Status] = {}

    def pay(i: int) -> None:
        results[i] = wx.pay(pay_request(f"S0001_L01_T{i}", 100 + i, code("00", i))).status

    threads = [threading.Thread(target=pay, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == {i: Status.PAID for i in range(8)}
    assert {sim.ledger.trades[f"S0001_L01_T{i}"].amount_fen for i in range(8)} == {100 + i for i in range(8)}


def test_the_payment_code_appears_in_no_log_line_reason_exception_or_repr(lab, tmp_path, caplog):
    """Every way a pay can end: paid, forged, declined, paying, system error, dropped, slow, unsigned,
    misconfigured, unreachable; at DEBUG, the HTTP libraries' lines included."""
    caplog.set_level(logging.DEBUG)
    codes: list[str] = []
    said: list[str] = []

    def attempt(wx, i: int, tail: str) -> None:
        codes.append(code(tail, i))
        req = pay_request(f"S0001_L01_C{i}", auth_code=codes[-1])
        try:
            out = wx.pay(req)
            said.extend((repr(out), repr(req)))
        except ProviderError as e:
            said.extend((str(e), repr(e)))

    plain = WechatV2Simulator(tmp_path / "plain", Ledger(slow_s=1.0)).start()
    unsigned = Tampering(tmp_path / "unsigned").start()
    unsigned.change = "no sign"
    for n, sim in enumerate((plain, unsigned)):
        wx = lab.provider(sim.provider_options(), connect_timeout_s=0.3, read_timeout_s=0.3)
        for i, tail in enumerate(("00", "80", "90", "92", "94", "96", "97")):
            attempt(wx, 10 * n + i, tail)
        said.append(repr(wx))
    attempt(lab.provider(plain.provider_options(), appid="wx0000000000000000"), 20, "00")  # misconfigured
    plain.stop()
    unsigned.stop()
    attempt(wx, 21, "00")  # unreachable
    text = "\n".join(said + [r.getMessage() for r in caplog.records] + [caplog.text])
    assert "SECURITY" in text and "ProviderUnavailable" in text  # the paths that say most were taken
    assert [c for c in codes if c in text] == []


# --- TLS with the merchant's API certificate -----------------------------------------------------------------


@pytest.fixture
def pki(tmp_path):
    """A test CA, the simulator's certificate for 127.0.0.1 and a merchant certificate, all from it."""
    d = tmp_path / "pki"
    d.mkdir(mode=0o700)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = new_certificate("Test Payment CA", ca_key, ca=True)
    files = {"ca": d / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, ip in (("server", "127.0.0.1"), ("client", None)):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = new_certificate(f"test {who}", key, issuer=(ca, ca_key), ip=ip)
        files[f"{who}_key"] = d / f"{who}_key.pem"
        files[f"{who}_key"].write_bytes(private_pem(key))
        files[f"{who}_key"].chmod(0o600)
        files[f"{who}_cert"] = d / f"{who}_cert.pem"
        files[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


@pytest.fixture
def tls_sim(tmp_path, pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
    ctx.load_verify_locations(pki["ca"])
    ctx.verify_mode = ssl.CERT_OPTIONAL  # the /secapi/ paths insist, like WeChat's gateway
    s = WechatV2Simulator(tmp_path / "keys", tls=ctx).start()
    yield s
    s.stop()


def test_reverse_and_refund_over_https_present_the_api_certificate(lab, tls_sim, pki):
    assert tls_sim.url.startswith("https://127.0.0.1:")
    wx = lab.provider(tls_sim.provider_options(), ca_file=str(pki["ca"]), client_cert_file=str(pki["client_cert"]),
                      client_key_file=str(pki["client_key"]))
    assert wx.pay(pay_request()).status is Status.PAID
    assert wx.reverse("S0001_L01_A1").status is Status.REVERSED
    assert tls_sim.ledger.trades["S0001_L01_A1"].reverses == 1 and tls_sim.ledger.kept(CODE) == 0


def test_without_a_client_certificate_the_reverse_is_refused(tls_sim, pki):
    fields = {"appid": APPID, "mch_id": MCH_ID, "nonce_str": "n" * 32, "out_trade_no": "S0001_L01_A1",
              "sign_type": "HMAC-SHA256"}
    body = to_xml({**fields, "sign": sign(fields, tls_sim.api_key, "HMAC-SHA256")})
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki["ca"]))) as client:
        refused = client.post(tls_sim.url + "/secapi/pay/reverse", content=body)
        assert refused.status_code == 400 and b"No required SSL certificate" in refused.content
        assert "reverse" not in tls_sim.ledger.calls
        assert client.post(tls_sim.url + "/pay/orderquery", content=body).status_code == 200  # no cert needed


def test_a_gateway_certificate_not_from_ca_file_is_refused_before_sending(lab, tls_sim):
    wx = lab.provider(tls_sim.provider_options())  # the system's CAs: the test CA is not among them
    with pytest.raises(ProviderUnavailable):
        wx.pay(pay_request())
    assert not tls_sim.ledger.trades


# --- options and key files ---------------------------------------------------------------------------------


def test_defaults_are_wechats_gateways_and_timings(lab, sim):
    options = lab.options({k: v for k, v in sim.provider_options().items()
                           if k not in ("base_url", "backup_base_urls")}).options
    assert isinstance(options, WechatV2Options)
    assert (options.base_url, options.backup_base_urls) == ("https://api.mch.weixin.qq.com",
                                                            ("https://api2.mch.weixin.qq.com",))
    policy = options.policy()
    assert (policy.first_query_after_s, policy.query_every_s, policy.reverse_after_s, policy.retry_every_s) == (
        5.0, 10.0, 45.0, 10.0)
    assert options.sign_type == "HMAC-SHA256" and options.call_limit_s <= 15.0


def _ec_key(path: Path) -> None:
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _bare_base64(path: Path) -> None:
    pem = path.read_text().splitlines()
    path.write_text("".join(line for line in pem if not line.startswith("-----")))


def _other_cert(path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(new_certificate("someone else", key).public_bytes(serialization.Encoding.PEM))


BAD_FILES = [  # option, how the file is spoilt, what the error says
    ("api_key_file", lambda p: p.unlink(), "does not exist"),
    ("api_key_file", lambda p: p.chmod(0o644), "open to others"),
    ("api_key_file", lambda p: p.write_text("A" * 31), "must hold 32 characters"),
    ("api_key_file", lambda p: p.write_text("A" * 31 + "-"), "letters and digits"),
    ("api_key_file", lambda p: p.write_text("A" * 32 + "\n" + "B" * 32), "one line"),
    ("client_key_file", lambda p: p.unlink(), "does not exist"),
    ("client_key_file", lambda p: p.chmod(0o604), "open to others"),
    ("client_key_file", lambda p: p.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n"), "not an unencrypted RSA"),
    ("client_key_file", _ec_key, "not an RSA key"),
    ("client_key_file", _bare_base64, "must be PEM"),  # what Alipay's key tool prints; TLS wants PEM
    ("client_cert_file", lambda p: p.unlink(), "No such file"),
    ("client_cert_file", lambda p: p.write_text("not a certificate"), "not a PEM X.509 certificate"),
    ("client_cert_file", _other_cert, "is not the certificate of the key"),
]


@pytest.mark.parametrize("option, spoil, says", BAD_FILES, ids=[f"{o}-{s}" for o, _, s in BAD_FILES])
def test_a_bad_key_file_is_a_config_error_naming_its_option(lab, sim, option, spoil, says):
    spoil(Path(sim.provider_options()[option]))
    with pytest.raises(ConfigError) as e:
        lab.options(sim.provider_options())
    assert e.value.key == f"providers.wx.{option}" and says in e.value.reason


BAD_VALUES = [
    ("base_url", "http://api.mch.weixin.qq.com", "plain http:// is refused"),
    ("backup_base_urls", ["http://10.0.0.1"], "plain http:// is refused"),
    ("reverse_after_s", 10.0, "sooner than 15 s"),
    ("appid", MCH_ID, "must be an AppID"),
    ("mch_id", "wxd930ea5d5a258f4f", "digits only"),
    ("sign_type", "SHA1", "must be one of"),
    ("read_timeout_s", 7.0, "exceeds 15 s"),
]


@pytest.mark.parametrize("option, value, says", BAD_VALUES, ids=[o for o, _, _ in BAD_VALUES])
def test_a_bad_option_is_a_config_error_naming_it(lab, sim, option, value, says):
    table = {**sim.provider_options(), "base_url": "https://api.mch.weixin.qq.com", option: value}
    with pytest.raises(ConfigError) as e:
        lab.options(table)
    assert e.value.key.startswith(f"providers.wx.{option}") and says in e.value.reason


def test_a_short_reverse_delay_is_allowed_against_a_loopback_simulator(lab, sim):
    assert lab.options(sim.provider_options(), reverse_after_s=0.4).options.reverse_after_s == 0.4


@pytest.mark.parametrize("option, spoil, says", [
    next(b for b in BAD_FILES if b[0] == option and b[2] == says) for option, says in (
        ("api_key_file", "open to others"), ("client_key_file", "not an RSA key"),
        ("client_cert_file", "is not the certificate of the key"))], ids=["key-mode-0644", "ec-key", "cert-of-another-key"])
def test_check_config_exits_2_naming_the_option(sim, tmp_path, option, spoil, says):
    spoil(Path(sim.provider_options()[option]))
    doc = lane_dict(tmp_path / "state", providers={"wx": sim.provider_options()}, routing={"wechat": "wx"})
    config = write_config(tmp_path / "appliance.toml", doc)
    r = subprocess.run(appliance_cmd() + ["check-config", "--config", str(config)], capture_output=True, text=True,
                       env=subprocess_env(), timeout=60)
    assert r.returncode == 2 and f"providers.wx.{option}" in r.stderr and says in r.stderr, r.stderr


# --- the example config -------------------------------------------------------------------------------------


def test_the_example_config_is_valid_with_real_key_files(sim, tmp_path):
    text = (ROOT / "examples" / "wechat_v2.toml").read_text()
    example = tomllib.loads(text)
    table = example["providers"]["wechat"]
    assert table["kind"] == "wechat_v2"
    keys = sim.provider_options()
    for option in ("api_key_file", "client_cert_file", "client_key_file"):
        text = text.replace(f'"{table[option]}"', f'"{keys[option]}"')
    text = text.replace(f'"{example["terminal"]["state_dir"]}"', f'"{tmp_path / "state"}"')
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    cfg = load(path)
    options = cfg.providers["wechat"].options
    assert isinstance(options, WechatV2Options) and options.base_url == "https://api.mch.weixin.qq.com"
    assert cfg.routing["wechat"] == "wechat"
    assert str(options.client_cert_file) == keys["client_cert_file"] and options.api_key_file.read() == sim.api_key


class Garbling(WechatV2Simulator):
    """Declares a Content-Encoding its (plain XML) answers do not have."""

    def handle(self, req: Request) -> Answer:
        answer = super().handle(req)
        answer.headers["Content-Encoding"] = "gzip"
        return answer


def test_an_answer_that_cannot_be_decompressed_is_unknown_not_an_httpx_exception(lab, tmp_path):
    """httpx raises DecodingError (not a TransportError) for it; the pay was sent and charged."""
    s = Garbling(tmp_path / "keys").start()
    try:
        wx = lab.provider(s.provider_options(), connect_timeout_s=0.5, read_timeout_s=0.5)
        out = wx.pay(pay_request())
        assert out.status is Status.UNKNOWN and "DecodingError" in out.reason
        assert CODE not in out.reason
        assert s.ledger.charges("S0001_L01_A1") == 1
    finally:
        s.stop()


# --- the daily bill (head office's call) ------------------------------------------------------------


def test_the_bill_of_a_day_lists_its_payments_refunds_and_reversals(wx, sim):
    day, expected = a_billed_day(wx, sim.ledger)
    check_fetched(wx.bill(day), expected, sim.ledger)
    assert sim.ledger.calls["bill"] == 1


@pytest.mark.parametrize("fault", [None, "plain"], ids=["gzip", "plain"])
def test_a_bill_is_read_gzipped_or_plain(wx, sim, fault):
    day, expected = a_billed_day(wx, sim.ledger)
    sim.bill_fault = fault
    check_fetched(wx.bill(day), expected, sim.ledger)


def test_the_bill_request_is_signed_xml_for_one_day_gzipped(lab, tmp_path):
    sim = Recording(tmp_path / "keys").start()
    try:
        wx = lab.provider(sim.provider_options(), connect_timeout_s=0.5, read_timeout_s=0.5)
        day = past_day()
        assert wx.bill(day).state is BillState.NO_TRANSACTIONS
        fields = sim.fields()
        assert sim.seen[-1].path == "/pay/downloadbill"
        assert {k: fields[k] for k in ("bill_date", "bill_type", "tar_type", "mch_id", "appid")} == {
            "bill_date": f"{day:%Y%m%d}", "bill_type": "ALL", "tar_type": "GZIP", "mch_id": MCH_ID, "appid": APPID}
        assert signed_correctly(fields, sim.api_key, fields["sign_type"])
    finally:
        sim.stop()


def test_not_yet_before_nine_the_next_morning_and_no_transactions_on_an_empty_day(wx, sim):
    day, _ = a_billed_day(wx, sim.ledger, hour=8.99)
    assert wx.bill(day).state is BillState.NOT_YET
    sim.ledger.clock.t = next_morning(day, hour=9)
    assert wx.bill(day).state is BillState.FETCHED
    empty = wx.bill(day - dt.timedelta(days=1))
    assert empty.state is BillState.NO_TRANSACTIONS and "No Bill Exist" in empty.detail


@pytest.mark.parametrize("fault, words", [
    ("summary", "the bill's summary disagrees with its lines: paid_fen"),
    ("garbled", "line 1: not UTF-8"),
])
def test_a_wrong_file_is_a_bill_error_naming_the_platform_and_the_day(wx, sim, fault, words):
    day, _ = a_billed_day(wx, sim.ledger)
    sim.bill_fault = fault
    bill_error(wx, day, words)


def test_days_that_cannot_have_a_bill(wx, sim):
    """Today is not asked for by head office (reconcile refuses it); the simulator answers it as
    WeChat does a bill not made yet. A day older than WeChat keeps is refused."""
    today = beijing_day(sim.ledger.clock())
    assert wx.bill(today).state is BillState.NOT_YET
    with pytest.raises(BillError, match="invalid bill_date 20001"):
        wx.bill(today - dt.timedelta(days=100))


def test_a_wrong_api_key_is_an_error_quoting_wechat(lab, sim, tmp_path):
    other = tmp_path / "other-key"
    other.write_text("A" * 32)
    other.chmod(0o600)
    wx = lab.provider(sim.provider_options(), api_key_file=str(other))
    with pytest.raises(BillError, match="签名错误") as e:
        wx.bill(past_day())
    assert not isinstance(e.value, BillUnavailable)


def test_an_unreachable_platform_is_unavailable(wx, sim):
    sim.stop()
    with pytest.raises(BillUnavailable, match="platform wx: bill of"):
        wx.bill(past_day())


def _failure(**fields) -> Answer:
    return Answer(200, to_xml({"return_code": "FAIL", **fields}, cdata=True), {"Content-Type": "text/plain"})


@pytest.mark.parametrize("answer, expected", [
    (_failure(return_msg="No Bill Exist", error_code="20002"), BillState.NO_TRANSACTIONS),
    (_failure(return_msg="NO Bill Exist"), BillState.NO_TRANSACTIONS),  # as the pages print it
    (_failure(return_msg="Bill Creating"), BillState.NOT_YET),
    (_failure(return_msg="当前商户号账单API权限已经关闭"), "当前商户号账单API权限已经关闭"),
    (_failure(return_msg="CompressGZip Error"), "CompressGZip Error"),
    (_failure(), "(no message)"),
    (Answer(200, b"<xml><return_code>FAIL</return_code>"), "not WeChat's XML"),
    (Answer(200, b'<?xml version="1.0"?>\n' + _failure(return_msg="No Bill Exist").body), BillState.NO_TRANSACTIONS),
    (Answer(200, b"<html><body>502 Bad Gateway</body></html>"), "root element <html>"),
    (Answer(503, b"busy"), BillUnavailable),
    (Answer(404, b"Not Found"), "HTTP 404"),
    (Answer(200, b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\xff" * 20), "not a valid gzip stream"),
    (Answer(200, b"\x1f\x8b\x08\x00garbage"), "truncated"),
    (Answer(200, b""), "empty"),
])
def test_downloadbill_answers(scripted, answer, expected):
    scripted.raw = answer
    try:
        if isinstance(expected, BillState):
            assert scripted.wx.bill(past_day()).state is expected
        else:
            error = expected if expected is BillUnavailable else BillError
            with pytest.raises(error) as e:
                scripted.wx.bill(past_day())
            assert isinstance(expected, type) or expected in str(e.value)
            assert error is BillUnavailable or not isinstance(e.value, BillUnavailable)
    finally:
        scripted.raw = None


def test_the_adapter_says_it_has_a_bill(wx):
    assert wx.has_bill

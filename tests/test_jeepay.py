"""The Jeepay adapter and its simulator: the protocol for real over loopback HTTP.

Signature vectors are aggregator.md §3's worked example (computed with hashlib and coreutils
md5sum, not by this code). Everything else runs the adapter against `JeepaySimulator`, or
against a subclass of it that answers what a broken or hostile gateway would (`Hostile`).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from appliance.config import ConfigError, from_dict, load
from appliance.errors import ProviderMisconfigured, ProviderUnavailable
from appliance.payments import PayRequest, Status, make_provider, providers
from appliance.payments.jeepay import (CLOSE_INIT_AFTER_S, FOLLOW_UP_SHARE, JeepayOptions, JeepayProvider, answer_problem,
                                       auto_bar_way, channel_extra, md5_sign, order_outcome, refund_outcome,
                                       sign_string, signed_request)
from appliance.redact import mask
from appliance.schema import build
from appliance.simulators import Answer, Request
from appliance.simulators.jeepay import APP_ID, MCH_NO, JeepaySimulator
from appliance.simulators.ledger import Ledger
from conftest import ROOT, appliance_cmd, lane_dict, subprocess_env, write_config

SECRET = "8hDv2Qw5Zr1Kx7Ty4Lm9Pn3Bc6Vs0Fa"
_numbers = itertools.count(1)


def wechat(tail: str) -> str:
    return "1345678901234567" + tail  # 18 digits, 13...: AUTO_BAR routes it to WX_BAR


def alipay(tail: str) -> str:
    return "2867890123456789" + tail  # 18 digits, 28...: ALI_BAR


def unionpay(tail: str) -> str:
    return "62345678901234567" + tail  # 19 digits, 62...: YSF_BAR


def out_trade_no() -> str:
    return f"S0001_L01_20261129{next(_numbers):07d}"


def pay_request(code: str, amount_fen: int = 1234, no: str | None = None) -> PayRequest:
    return PayRequest(no or out_trade_no(), amount_fen, code, "Order 42", "S0001", "L01")


class Hostile(JeepaySimulator):
    """The simulator, except where a test makes it answer like a broken or hostile gateway:
    `override[path](request)` answers instead of it (None: it answers), `tamper[path]` rewrites
    the envelope of its own answer, and `delay[path]` seconds hold its answer back."""

    def __init__(self, *args, **kwargs):
        self.seen: list[Request] = []
        self.override: dict = {}
        self.tamper: dict = {}
        self.delay: dict = {}
        super().__init__(*args, **kwargs)

    def handle(self, req: Request) -> Answer:
        self.seen.append(req)
        answer = self.override[req.path](req) if req.path in self.override else None
        if answer is None:
            answer = super().handle(req)
        if req.path in self.tamper:
            answer.body = json.dumps(self.tamper[req.path](json.loads(answer.body)), ensure_ascii=False).encode()
        answer.delay_s = self.delay.get(req.path, answer.delay_s)
        return answer


def failure(msg: str, code: int = 9999):
    """An override answering a Jeepay failure envelope."""
    return lambda req: Answer(200, json.dumps({"code": code, "msg": msg}, ensure_ascii=False).encode())


@pytest.fixture
def sim(tmp_path):
    s = Hostile(tmp_path / "keys", Ledger(slow_s=1.5))
    s.start()
    yield s
    s.stop()


def options(sim: JeepaySimulator, tmp_path: Path, **extra) -> JeepayOptions:
    table = {k: v for k, v in sim.provider_options().items() if k != "kind"}
    table |= {"connect_timeout_s": 0.5, "read_timeout_s": 0.5} | extra
    return build(JeepayOptions, table, "providers.jp", tmp_path)


@pytest.fixture
def jeepay(sim, tmp_path):
    p = JeepayProvider("jp", options(sim, tmp_path), tmp_path)
    yield p
    p.close()


def security_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("SECURITY")]


# --- the protocol: vectors and pure rules ------------------------------------------------------------

EXAMPLE_REQUEST = {"mchNo": "M1700000001", "appId": "66a1f0c2e4b0a1b2c3d4e5f6", "mchOrderNo": "LANE3-0001",
                   "wayCode": "AUTO_BAR", "amount": 1234, "currency": "cny", "subject": "Lane 3 checkout",
                   "body": "Ticket 0001", "clientIp": "192.168.10.23",
                   "channelExtra": '{"authCode":"134567890123456701"}', "extParam": "", "reqTime": "1717200000000",
                   "version": "1.0", "signType": "MD5"}
EXAMPLE_ANSWER = {"mchOrderNo": "LANE3-0001", "orderState": 2, "payData": "", "payDataType": "none",
                  "payOrderId": "P1797000000000000001"}


@pytest.mark.parametrize("fields,sign", [
    (EXAMPLE_REQUEST, "BA6DFFAC8301C49BE5ED22EDF8DED45D"),
    (EXAMPLE_ANSWER, "EF29FB0522920DD20AD63A3F711717DF"),
    ({}, "0C8E559726EB6C7D931AF22C445770BF"),  # close's empty data
], ids=["unifiedOrder request", "unifiedOrder answer", "empty data"])
def test_signature_vectors_of_the_fact_sheet(fields, sign):
    assert md5_sign(fields, SECRET) == sign


def test_sign_string_of_the_worked_example():
    assert sign_string(EXAMPLE_REQUEST) == (
        'amount=1234&appId=66a1f0c2e4b0a1b2c3d4e5f6&body=Ticket 0001&channelExtra={"authCode":"134567890123456701"}'
        "&clientIp=192.168.10.23&currency=cny&mchNo=M1700000001&mchOrderNo=LANE3-0001&reqTime=1717200000000"
        "&signType=MD5&subject=Lane 3 checkout&version=1.0&wayCode=AUTO_BAR&")


@pytest.mark.parametrize("fields,text", [
    ({"b": "2", "a": "1", "sign": "X"}, "a=1&b=2&"),  # sign is never signed
    ({"a": None, "b": "", "c": 0, "d": "0", "e": " "}, "c=0&d=0&e= &"),  # null and "" out; 0 and spaces in
    ({"B": "x", "a": "y"}, "a=y&B=x&"),  # case-insensitive, as Java's CASE_INSENSITIVE_ORDER
    ({"ok": True, "n": 12, "o": {"k": "v"}}, 'n=12&o={"k":"v"}&ok=true&'),
])
def test_sign_string_rules(fields, text):
    assert sign_string(fields) == text


def test_channel_extra_is_compact_json_text_with_the_code():
    assert channel_extra("134567890123456701") == '{"authCode":"134567890123456701"}'


@pytest.mark.parametrize("code,way", [
    ("134567890123456789", "WX_BAR"), ("104567890123456789", "WX_BAR"), ("154567890123456789", "WX_BAR"),
    ("164567890123456789", None), ("13456789012345678", None),  # WeChat: 18 digits, 10-15
    ("2845678901234567", "ALI_BAR"), ("304567890123456789012345", "ALI_BAR"), ("254567890123456789", "ALI_BAR"),
    ("284567890123456", None), ("3045678901234567890123456", None), ("314567890123456789", None),
    ("6234567890123456789", "YSF_BAR"), ("623456789012345678", None),
    ("", None), (" 134567890123456789", None), ("ab4567890123456789", None),
])
def test_auto_bar_routing_by_length_and_prefix(code, way):
    assert auto_bar_way(code) == way


@pytest.mark.parametrize("envelope,problem", [
    ({"code": 0, "data": EXAMPLE_ANSWER, "msg": "SUCCESS", "sign": "EF29FB0522920DD20AD63A3F711717DF"}, None),
    ({"code": 0, "data": EXAMPLE_ANSWER, "msg": "SUCCESS", "sign": "ef29fb0522920dd20ad63a3f711717df"}, None),
    ({"code": 9999, "msg": "验签失败"}, None),  # failures are never signed
    ({"code": 0, "data": EXAMPLE_ANSWER | {"orderState": 3}, "sign": "EF29FB0522920DD20AD63A3F711717DF"}, "wrong sign"),
    ({"code": 0, "data": EXAMPLE_ANSWER | {"extra": "x"}, "sign": "EF29FB0522920DD20AD63A3F711717DF"}, "wrong sign"),
    ({"code": 0, "data": EXAMPLE_ANSWER, "msg": "SUCCESS"}, "no sign"),
    ({"code": 0, "msg": "SUCCESS"}, "a success answer without data"),
    ({"code": 0, "data": [1], "sign": "EF29FB0522920DD20AD63A3F711717DF"}, "data is not an object"),
    ({"code": 9999, "data": EXAMPLE_ANSWER, "sign": "00"}, "wrong sign"),  # a failure that is signed must verify
])
def test_answer_verification(envelope, problem):
    assert answer_problem(envelope, SECRET) == problem


@pytest.mark.parametrize("state,status,code", [
    (0, Status.UNKNOWN, "INIT"), (1, Status.UNKNOWN, "ING"), (2, Status.PAID, "SUCCESS"),
    (3, Status.DECLINED, "FAIL"), (4, Status.DECLINED, "CANCEL"), (5, Status.REFUNDED, "REFUND"),
    (6, Status.DECLINED, "CLOSED"), (7, Status.UNKNOWN, "7"), (None, Status.UNKNOWN, "None"),
])
def test_order_states(state, status, code):
    out = order_outcome({"mchOrderNo": "A1", "state": state, "payOrderId": "P1"}, "A1")
    assert (out.status, out.code, out.platform_txn_id) == (status, code, "P1")


def test_order_outcome_carries_the_channel_code_the_way_and_checks_the_order():
    declined = order_outcome({"mchOrderNo": "A1", "orderState": 3, "errCode": "NOTENOUGH", "errMsg": "余额不足"}, "A1")
    assert (declined.status, declined.code, declined.reason) == (Status.DECLINED, "NOTENOUGH", "NOTENOUGH: 余额不足")
    paid = order_outcome({"mchOrderNo": "A1", "state": 2, "wayCode": "ALI_BAR", "ifCode": "alipay"}, "A1", "WX_BAR")
    assert paid.funding_source == "ALI_BAR"  # the answer's way wins over the one we worked out
    assert order_outcome({"mchOrderNo": "A1", "orderState": 2}, "A1", "WX_BAR").funding_source == "WX_BAR"
    assert order_outcome({"mchOrderNo": "B2", "state": 2}, "A1").status is Status.UNKNOWN


@pytest.mark.parametrize("state,status,code", [
    (0, Status.UNKNOWN, "INIT"), (1, Status.UNKNOWN, "ING"), (2, Status.REFUNDED, "SUCCESS"),
    (3, Status.DECLINED, "FAIL"), (4, Status.DECLINED, "CLOSED"), (9, Status.UNKNOWN, "9"),
])
def test_refund_states(state, status, code):
    out = refund_outcome({"mchRefundNo": "A1R", "state": state, "refundOrderId": "R1"}, "A1R")
    assert (out.status, out.code, out.platform_txn_id) == (status, code, "R1")
    assert refund_outcome({"mchRefundNo": "B2R", "state": 2}, "A1R").status is Status.UNKNOWN


# --- the simulator speaks Jeepay -----------------------------------------------------------------------


def raw(sim: JeepaySimulator, path: str, fields: dict, *, sign: str | None = None, method: str = "POST") -> dict:
    """A request as any client could send it: signed with the simulator's secret unless `sign` is given."""
    body = dict(fields, sign=md5_sign(fields, sim.secret) if sign is None else sign)
    r = httpx.request(method, sim.url + path, json=body, timeout=5)
    return {"status": r.status_code, **r.json()}


def _pay_fields(**extra) -> dict:
    return {"mchNo": MCH_NO, "appId": APP_ID, "reqTime": "1717200000000", "version": "1.0", "signType": "MD5",
            "mchOrderNo": out_trade_no(), "wayCode": "AUTO_BAR", "amount": 100, "currency": "CNY", "subject": "s",
            "body": "b", "channelExtra": channel_extra(wechat("00"))} | extra


def test_simulator_takes_a_well_signed_request_and_signs_its_answer(sim):
    answer = raw(sim, "/api/pay/unifiedOrder", _pay_fields())
    assert answer["code"] == 0 and answer["data"]["orderState"] == 2
    assert answer["sign"] == md5_sign(answer["data"], sim.secret)
    fields = _pay_fields()  # Jeepay compares the request's sign ignoring case
    assert raw(sim, "/api/pay/unifiedOrder", fields, sign=md5_sign(fields, sim.secret).lower())["code"] == 0


@pytest.mark.parametrize("case", ["wrong sign", "signed with another secret", "signed an undeclared field",
                                  "no sign", "unknown merchant"])
def test_simulator_refuses_a_bad_request_signature_before_creating_anything(sim, case):
    fields = _pay_fields()
    kwargs = {}
    if case == "wrong sign":
        kwargs["sign"] = "0" * 32
    elif case == "signed with another secret":
        kwargs["sign"] = md5_sign(fields, SECRET)
    elif case == "signed an undeclared field":  # Jeepay drops it before checking: the sign no longer matches
        fields["storeId"] = "S0001"
    elif case == "no sign":
        kwargs["sign"] = ""
    else:
        fields["mchNo"] = "M0000000000"
    answer = raw(sim, "/api/pay/unifiedOrder", fields, **kwargs)
    expected = {"no sign": "签名值不能为空", "unknown merchant": "商户或商户应用不存在"}.get(case, "验签失败")
    assert answer == {"status": 200, "code": 9999, "msg": expected}
    assert sim.ledger.trades == {} and sim.orders == {}


def test_simulator_answers_unknown_paths_methods_and_bodies_as_jeepay_does(sim):
    assert raw(sim, "/api/pay/nothing", {})["status"] == 404
    assert raw(sim, "/api/pay/unifiedOrder", _pay_fields(), method="GET")["status"] == 405
    r = httpx.post(sim.url + "/api/pay/query", content=b"[1,2]", headers={"Content-Type": "application/json"})
    assert r.json() == {"code": 11, "msg": "参数有误[转换异常]"}


def test_simulator_keeps_order_numbers_unique_and_routes_by_code(sim):
    fields = _pay_fields()
    assert raw(sim, "/api/pay/unifiedOrder", fields)["code"] == 0
    again = raw(sim, "/api/pay/unifiedOrder", fields | {"channelExtra": channel_extra(wechat("01"))})
    assert again["msg"] == f"商户订单[{fields['mchOrderNo']}]已存在" and sim.ledger.charges(fields["mchOrderNo"]) == 1
    assert raw(sim, "/api/pay/unifiedOrder", _pay_fields(channelExtra=channel_extra("9912345")))["msg"] == "不支持的条码"
    assert raw(sim, "/api/pay/unifiedOrder", _pay_fields(wayCode="UP_BAR"))["msg"] == "不支持的支付方式"


def test_appliance_simulate_jeepay_prints_a_working_providers_table(tmp_path):
    with subprocess.Popen(appliance_cmd() + ["simulate", "jeepay", "--port", "0", "--keys", str(tmp_path / "k")],
                          stdout=subprocess.PIPE, text=True, env=subprocess_env()) as p:
        _pay_through_the_printed_table(p, tmp_path)


def _pay_through_the_printed_table(p: subprocess.Popen, tmp_path: Path) -> None:
    try:
        lines = [p.stdout.readline() for _ in range(7)]
        assert lines[1].strip() == "[providers.jeepay]", lines
        table = {k.strip(): json.loads(v) for k, v in (line.split("=", 1) for line in lines[2:])}
        assert table["kind"] == "jeepay" and set(table) == {"kind", "base_url", "mch_no", "app_id", "app_secret_file"}
        assert (Path(table["app_secret_file"]).stat().st_mode & 0o777) == 0o600
        table.pop("kind")
        provider = JeepayProvider("jeepay", build(JeepayOptions, table, "providers.jeepay", tmp_path))
        try:
            assert provider.pay(pay_request(wechat("00"))).status is Status.PAID
        finally:
            provider.close()
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 0


# --- what the adapter sends ------------------------------------------------------------------------------


def test_unified_order_request_shape(sim, jeepay):
    req = pay_request(wechat("00"), amount_fen=1205)
    assert jeepay.pay(req).status is Status.PAID
    (sent,) = sim.seen
    assert (sent.method, sent.path) == ("POST", "/api/pay/unifiedOrder")
    assert sent.headers["content-type"].startswith("application/json")
    body = json.loads(sent.body)
    assert body["sign"] == md5_sign(body, sim.secret)
    assert set(body) == {"mchNo", "appId", "reqTime", "version", "signType", "sign", "mchOrderNo", "wayCode", "amount",
                         "currency", "subject", "body", "expiredTime", "channelExtra", "extParam"}
    assert (body["mchNo"], body["appId"], body["version"], body["signType"]) == (MCH_NO, APP_ID, "1.0", "MD5")
    assert re.fullmatch(r"\d{13}", body["reqTime"]) and abs(int(body["reqTime"]) / 1000 - time.time()) < 60
    assert body["amount"] == 1205 and body["currency"] == "CNY"  # integer fen
    assert body["mchOrderNo"] == req.out_trade_no and body["wayCode"] == "AUTO_BAR"
    assert isinstance(body["channelExtra"], str) and json.loads(body["channelExtra"]) == {"authCode": req.auth_code}
    assert json.loads(body["extParam"]) == {"storeId": "S0001", "terminalId": "L01"}
    assert body["subject"] == "Order 42" and body["body"] and isinstance(body["expiredTime"], int)


def test_other_requests_shape(sim, jeepay):
    req = pay_request(wechat("00"))
    jeepay.pay(req)
    jeepay.query(req.out_trade_no)
    jeepay.refund(req.out_trade_no, 300, 1234, req.out_trade_no + "R")
    jeepay.query_refund(req.out_trade_no, req.out_trade_no + "R")
    sent = {r.path: json.loads(r.body) for r in sim.seen}
    assert sent["/api/pay/query"]["mchOrderNo"] == req.out_trade_no
    refund = sent["/api/refund/refundOrder"]
    assert (refund["mchOrderNo"], refund["mchRefundNo"], refund["refundAmount"], refund["currency"]) == (
        req.out_trade_no, req.out_trade_no + "R", 300, "CNY") and refund["refundReason"]
    assert sent["/api/refund/query"]["mchRefundNo"] == req.out_trade_no + "R"
    assert all(b["sign"] == md5_sign(b, sim.secret) for b in sent.values())


def test_a_fixed_way_code_is_sent_and_named_as_the_funding(sim, tmp_path):
    p = JeepayProvider("jp", options(sim, tmp_path, way_code="ALI_BAR"))
    try:
        out = p.pay(pay_request(alipay("00")))
    finally:
        p.close()
    assert json.loads(sim.seen[0].body)["wayCode"] == "ALI_BAR"
    assert (out.status, out.funding_source) == (Status.PAID, "ALI_BAR")


# --- pay, query: the outcome table ---------------------------------------------------------------------------

@pytest.mark.parametrize("code,status,platform_code,funding", [
    (wechat("00"), Status.PAID, "SUCCESS", "WX_BAR"),
    (alipay("00"), Status.PAID, "SUCCESS", "ALI_BAR"),
    (unionpay("00"), Status.PAID, "SUCCESS", "YSF_BAR"),
    (wechat("82"), Status.DECLINED, "AUTH_CODE_INVALID", None),
    (wechat("90"), Status.DECLINED, "NOTENOUGH", None),
    (alipay("90"), Status.DECLINED, "ACQ.BUYER_BALANCE_NOT_ENOUGH", None),
    (wechat("91"), Status.DECLINED, "AUTHCODEEXPIRE", None),
    (alipay("91"), Status.DECLINED, "ACQ.PAYMENT_AUTH_CODE_INVALID", None),
    (wechat("92"), Status.UNKNOWN, "ING", None),  # the customer confirms a password
    (wechat("94"), Status.UNKNOWN, "9999", None),  # "系统异常" after the channel took the money
    (wechat("96"), Status.UNKNOWN, "", None),  # no answer at all
    ("9912345678901234", Status.DECLINED, "9999", None),  # AUTO_BAR cannot route it: "不支持的条码"
])
def test_pay_outcomes(jeepay, code, status, platform_code, funding):
    out = jeepay.pay(pay_request(code))
    assert (out.status, out.code, out.funding_source) == (status, platform_code, funding), out
    assert (out.platform_txn_id or "").startswith("P") == (out.code not in ("9999", ""))


@pytest.mark.parametrize("tail,first,then", [
    ("92", Status.UNKNOWN, Status.PAID),  # paid at the 2nd query
    ("94", Status.PAID, Status.PAID),
    ("96", Status.PAID, Status.PAID),
    ("80", Status.PAID, Status.PAID),  # the pay answer was forged; a signed query decides
    ("93", Status.UNKNOWN, Status.UNKNOWN),
    ("90", Status.DECLINED, Status.DECLINED),
])
def test_query_after_pay(jeepay, sim, tail, first, then):
    req = pay_request(wechat(tail))
    jeepay.pay(req)
    assert [jeepay.query(req.out_trade_no).status for _ in range(2)] == [first, then]
    assert sim.ledger.charges(req.out_trade_no) == (1 if then is Status.PAID else 0)


def test_query_of_an_order_jeepay_never_got_is_declined(jeepay):
    out = jeepay.query(out_trade_no())
    assert (out.status, out.code) == (Status.DECLINED, "9999") and "订单不存在" in out.reason


def test_pay_again_with_the_same_number_never_charges_twice(jeepay, sim):
    req = pay_request(wechat("00"))
    assert jeepay.pay(req).status is Status.PAID
    again = jeepay.pay(req)
    assert (again.status, again.code) == (Status.UNKNOWN, "9999") and "已存在" in again.reason
    assert jeepay.query(req.out_trade_no).status is Status.PAID and sim.ledger.charges(req.out_trade_no) == 1


def test_a_used_code_is_declined_in_another_order(jeepay):
    code = wechat("07")
    assert jeepay.pay(pay_request(code)).status is Status.PAID
    out = jeepay.pay(pay_request(code))
    assert (out.status, out.code) == (Status.DECLINED, "AUTHCODEEXPIRE")


def test_paid_trade_refunded_in_full_queries_as_refunded(jeepay):
    req = pay_request(wechat("00"))
    jeepay.pay(req)
    assert jeepay.refund(req.out_trade_no, 1234, 1234, req.out_trade_no + "R").status is Status.REFUNDED
    out = jeepay.query(req.out_trade_no)
    assert (out.status, out.code) == (Status.REFUNDED, "REFUND")


# Failures as Jeepay words them (aggregator.md §4): what each call makes of them.
PAY_FAILURES = [
    ("验签失败", 9999, ProviderMisconfigured),
    ("商户或商户应用不存在", 9999, ProviderMisconfigured),
    ("商品标题不能为空", 9999, ProviderMisconfigured),
    ("商户应用不支持该支付方式", 9999, ProviderMisconfigured),
    ("不支持的支付方式", 9999, ProviderMisconfigured),
    ("用户支付条码[authCode]不可为空", 9999, ProviderMisconfigured),
    ("条码为空", 9999, Status.DECLINED),
    ("不支持的条码", 9999, Status.DECLINED),
    ("商户订单[S0001_L01_1]已存在", 9999, Status.UNKNOWN),
    ("系统异常", 9999, Status.UNKNOWN),
    ("系统：SYSTEMERROR", 9999, Status.UNKNOWN),
    ("系统异常[java.lang.NumberFormatException]", 10, Status.UNKNOWN),
    ("参数有误[转换异常]", 11, Status.UNKNOWN),
    ("数据库异常", 12, Status.UNKNOWN),
]


@pytest.mark.parametrize("msg,code,expected", PAY_FAILURES, ids=[m for m, _, _ in PAY_FAILURES])
def test_pay_failure_mapping(sim, jeepay, msg, code, expected):
    sim.override["/api/pay/unifiedOrder"] = failure(msg, code)
    if isinstance(expected, type):
        with pytest.raises(expected) as e:
            jeepay.pay(pay_request(wechat("00")))
        assert msg in str(e.value)
        return
    out = jeepay.pay(pay_request(wechat("00")))
    assert (out.status, out.code) == (expected, str(code)) and msg in out.reason


@pytest.mark.parametrize("msg,expected", [
    ("订单不存在", Status.DECLINED), ("系统异常", Status.UNKNOWN), ("验签失败", ProviderMisconfigured),
])
def test_query_failure_mapping(sim, jeepay, msg, expected):
    sim.override["/api/pay/query"] = failure(msg)
    if isinstance(expected, type):
        with pytest.raises(expected):
            jeepay.query(out_trade_no())
    else:
        assert jeepay.query(out_trade_no()).status is expected


@pytest.mark.parametrize("status,body,expected", [
    (500, b'{"code":9999,"msg":"x"}', Status.UNKNOWN),
    (502, b"<html>Bad Gateway</html>", Status.UNKNOWN),
    (200, b"", Status.UNKNOWN),  # CloseOrderController returns null on an exception: an empty body
    (200, b"<html>maintenance</html>", Status.UNKNOWN),
    (200, b'{"code":"0","data":{}}', Status.UNKNOWN),
    (200, b"\xff\xfe{}", Status.UNKNOWN),
    (404, b'{"status":404,"error":"Not Found"}', ProviderMisconfigured),  # no handler ran: nothing created
    (405, b'{"status":405,"error":"Method Not Allowed"}', ProviderMisconfigured),
])
def test_http_level_answers(sim, jeepay, status, body, expected):
    sim.override["/api/pay/unifiedOrder"] = lambda req: Answer(status, body)
    if isinstance(expected, type):
        with pytest.raises(expected):
            jeepay.pay(pay_request(wechat("00")))
    else:
        assert jeepay.pay(pay_request(wechat("00"))).status is expected


def test_our_own_misconfiguration_is_refused_before_any_order(sim, tmp_path):
    wrong_secret = tmp_path / "other-secret"
    wrong_secret.write_text("not-the-secret\n")
    wrong_secret.chmod(0o600)
    for extra, said in (({"mch_no": "M0000000000"}, "商户或商户应用不存在"), ({"app_secret_file": str(wrong_secret)}, "验签失败"),
                        ({"base_url": sim.url + "/jeepay"}, "HTTP 404")):
        p = JeepayProvider("jp", options(sim, tmp_path, **extra))
        try:
            with pytest.raises(ProviderMisconfigured, match=re.escape(said)):
                p.pay(pay_request(wechat("00")))
        finally:
            p.close()
    assert sim.ledger.trades == {}


def test_platform_unreachable_raises_provider_unavailable(sim, jeepay):
    sim.stop()
    with pytest.raises(ProviderUnavailable):
        jeepay.pay(pay_request(wechat("00")))
    sim.start()  # back on the same port
    assert jeepay.pay(pay_request(wechat("00"))).status is Status.PAID


def test_a_slow_answer_is_unknown_within_the_call_limit_then_the_query_decides(sim, jeepay):
    req = pay_request(wechat("97"))
    started = time.monotonic()
    out = jeepay.pay(req)
    took = time.monotonic() - started
    assert out.status is Status.UNKNOWN and "no answer" in out.reason
    assert 0.4 <= took <= jeepay.options.call_limit_s + 0.3, took
    assert jeepay.query(req.out_trade_no).code == "INIT"  # Jeepay's row waits for the channel's answer
    time.sleep(sim.ledger.slow_s)
    assert jeepay.query(req.out_trade_no).status is Status.PAID and sim.ledger.charges(req.out_trade_no) == 1


def test_calls_from_many_threads_at_once(sim, tmp_path):
    # time limits a loaded machine keeps (the fixture's 0.5 s read timeout failed under load)
    jeepay = JeepayProvider("jp", options(sim, tmp_path, connect_timeout_s=2.0, read_timeout_s=5.0), tmp_path)
    reqs = [pay_request(wechat(f"{i:02d}")) for i in range(8)]
    results = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r.out_trade_no, jeepay.pay(r))) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    jeepay.close()
    assert {o.status for o in results.values()} == {Status.PAID} and len(results) == 8
    assert all(sim.ledger.charges(r.out_trade_no) == 1 for r in reqs)


# --- answers that are not trusted -----------------------------------------------------------------------


def _resign(envelope: dict) -> dict:
    return envelope | {"sign": md5_sign(envelope["data"], "a-secret-that-is-not-ours")}


TAMPERS = {
    "tampered body": lambda e: e | {"data": e["data"] | {"state": 2, "errCode": None, "errMsg": None}},
    "wrong key": _resign,
    "missing sign": lambda e: {k: v for k, v in e.items() if k != "sign"},
    "success without data": lambda e: {"code": 0, "msg": "SUCCESS"},
    "sign of empty data": lambda e: e | {"data": {}},
}


@pytest.mark.parametrize("how", TAMPERS)
def test_an_answer_that_does_not_verify_is_unknown_with_one_security_line(sim, jeepay, caplog, how):
    req = pay_request(wechat("90"))  # declined: a forger would like it to read paid
    assert jeepay.pay(req).status is Status.DECLINED
    sim.tamper["/api/pay/query"] = TAMPERS[how]
    with caplog.at_level(logging.WARNING):
        first, second = jeepay.query(req.out_trade_no), jeepay.query(req.out_trade_no)
    assert first.status is second.status is Status.UNKNOWN and first.code == ""
    assert len(security_lines(caplog)) == 1, security_lines(caplog)
    assert req.out_trade_no in security_lines(caplog)[0]
    del sim.tamper["/api/pay/query"]
    assert jeepay.query(req.out_trade_no).status is Status.DECLINED


@pytest.mark.parametrize("body", [
    '{"code":0,"data":{"mchOrderNo":"x"},"sign":"\u00c9F29"}',  # hmac.compare_digest: non-ASCII str
    '{"code":0,"data":{"mchOrderNo":"x","extra":{"n":1.5}},"sign":"EF29"}',  # json.dumps: a Decimal
    '{"code":0,"data":' + "[" * 5000 + "]" * 5000 + "}",  # json.loads recurses too deep
], ids=["non-ascii sign", "nested decimal", "deep body"])
def test_an_answer_that_cannot_even_be_checked_is_unknown(sim, jeepay, body):
    """The request may have been taken: whatever comes back, pay answers UNKNOWN, no exception."""
    sim.override["/api/pay/unifiedOrder"] = lambda req: Answer(200, body.encode())
    assert jeepay.pay(pay_request(wechat("00"))).status is Status.UNKNOWN


def test_forged_pay_answer_scenario_80(sim, jeepay, caplog):
    req = pay_request(wechat("80"))
    with caplog.at_level(logging.WARNING):
        assert jeepay.pay(req).status is Status.UNKNOWN
    assert len(security_lines(caplog)) == 1 and "pay answer" in security_lines(caplog)[0]
    assert jeepay.query(req.out_trade_no).status is Status.PAID and sim.ledger.charges(req.out_trade_no) == 1


# --- reverse: query, then close ---------------------------------------------------------------------------


def _paid_then(jeepay, tail: str) -> PayRequest:
    req = pay_request(wechat(tail))
    jeepay.pay(req)
    return req


@pytest.mark.parametrize("tail,status,code,closes", [
    ("00", Status.DECLINED, "SUCCESS", 0),  # paid: refund it instead
    ("90", Status.REVERSED, "NOTENOUGH", 0),  # declined: nothing was charged
    ("93", Status.REVERSED, "CLOSED", 1),  # paying: closed, and the query confirms 6
])
def test_reverse(jeepay, sim, tail, status, code, closes):
    req = _paid_then(jeepay, tail)
    out = jeepay.reverse(req.out_trade_no)
    assert (out.status, out.code) == (status, code), out
    assert sim.ledger.calls.get("close", 0) == closes
    if tail == "93":
        assert jeepay.query(req.out_trade_no).code == "CLOSED" and sim.ledger.trades[req.out_trade_no].state == "CLOSED"
        again = jeepay.reverse(req.out_trade_no)  # closed already: answered from the query, no second close
        assert again.status is Status.REVERSED and sim.ledger.calls["close"] == 1


def test_reverse_of_an_order_jeepay_never_got(jeepay, sim):
    assert jeepay.reverse(out_trade_no()).status is Status.REVERSED
    assert "close" not in sim.ledger.calls


def test_reverse_retried_while_the_channel_refuses_the_close_81(jeepay, sim):
    req = _paid_then(jeepay, "81")
    outs = [jeepay.reverse(req.out_trade_no) for _ in range(3)]
    assert [o.status for o in outs] == [Status.UNKNOWN, Status.UNKNOWN, Status.REVERSED]
    assert outs[0].code == "9999" and sim.ledger.charges(req.out_trade_no) == 0


def test_reverse_waits_before_closing_an_order_still_in_state_0(jeepay, sim):
    req = _paid_then(jeepay, "97")  # Jeepay's row stays 0 until its slow channel call answers
    out = jeepay.reverse(req.out_trade_no)
    assert (out.status, out.code) == (Status.UNKNOWN, "INIT") and "close" not in sim.ledger.calls
    sim.orders[req.out_trade_no].created_ms -= int(CLOSE_INIT_AFTER_S * 1000) + 1000  # as if a minute had passed
    assert jeepay.reverse(req.out_trade_no).status is Status.REVERSED and sim.ledger.calls["close"] == 1
    # Closing 0 is local to Jeepay: the channel kept the money. That is why the adapter waits a minute.
    assert sim.ledger.kept(req.auth_code) == 1


@pytest.mark.parametrize("close,status", [
    (failure("当前订单不可关闭"), Status.UNKNOWN),  # the order moved meanwhile: the next reverse queries
    (failure("系统繁忙，请稍后再试"), Status.UNKNOWN),
    (failure("验签失败"), ProviderMisconfigured),
    (lambda req: Answer(200, b""), Status.UNKNOWN),  # the controller's null on an exception
    ("signed but not closed", Status.UNKNOWN),  # Jeepay answers 0 without checking its update
])
def test_reverse_is_reversed_only_once_a_query_shows_the_order_closed(sim, jeepay, close, status):
    req = _paid_then(jeepay, "93")
    if close == "signed but not closed":
        close = lambda r: sim._ok({})  # noqa: E731
    sim.override["/api/pay/close"] = close
    if isinstance(status, type):
        with pytest.raises(status):
            jeepay.reverse(req.out_trade_no)
    else:
        assert jeepay.reverse(req.out_trade_no).status is status
    assert sim.ledger.trades[req.out_trade_no].state == "PAYING"


@pytest.fixture
def patient(sim, tmp_path):
    """An adapter whose read timeout (1 s) outlasts a third of its call limit (2.5 s / 3)."""
    p = JeepayProvider("jp", options(sim, tmp_path, read_timeout_s=1.0))
    yield p
    p.close()


def test_reverse_makes_no_further_call_once_a_third_of_a_call_limit_has_passed(sim, patient):
    req = _paid_then(patient, "93")
    sim.delay["/api/pay/query"] = patient.options.call_limit_s * FOLLOW_UP_SHARE + 0.1  # slow, yet answered
    out = patient.reverse(req.out_trade_no)
    assert out.status is Status.UNKNOWN and "too long" in out.reason and "close" not in sim.ledger.calls
    del sim.delay["/api/pay/query"]
    sim.delay["/api/pay/close"] = 5.0  # the close never answers in time: it may have happened
    started = time.monotonic()
    out = patient.reverse(req.out_trade_no)
    took = time.monotonic() - started
    assert out.status is Status.UNKNOWN and "no answer" in out.reason
    assert took <= patient.options.call_limit_s * (1 + FOLLOW_UP_SHARE) + 0.3, took
    del sim.delay["/api/pay/close"]
    assert patient.reverse(req.out_trade_no).status is Status.REVERSED  # the next attempt finds it closed


def test_refund_refused_after_a_slow_answer_is_left_to_the_refund_query(sim, patient):
    req = _paid_then(patient, "00")
    patient.refund(req.out_trade_no, 1234, 1234, req.out_trade_no + "R")
    sim.delay["/api/refund/refundOrder"] = patient.options.call_limit_s * FOLLOW_UP_SHARE + 0.1
    again = patient.refund(req.out_trade_no, 1234, 1234, req.out_trade_no + "R")  # refused: "订单状态不正确"
    assert (again.status, again.code) == (Status.UNKNOWN, "9999") and "refund_query" not in sim.ledger.calls
    assert patient.query_refund(req.out_trade_no, req.out_trade_no + "R").status is Status.REFUNDED


# --- refunds -------------------------------------------------------------------------------------------------


def test_refund_in_full_and_its_query(jeepay, sim):
    req = _paid_then(jeepay, "00")
    out = jeepay.refund(req.out_trade_no, 1234, 1234, req.out_trade_no + "R")
    assert (out.status, out.code) == (Status.REFUNDED, "SUCCESS") and out.platform_txn_id.startswith("R")
    assert jeepay.query_refund(req.out_trade_no, req.out_trade_no + "R").status is Status.REFUNDED
    assert sim.ledger.kept(req.auth_code) == 0


def test_refund_repeated_with_the_same_number_is_looked_up_not_made_again(jeepay, sim):
    req = _paid_then(jeepay, "00")
    jeepay.refund(req.out_trade_no, 1234, 1234, req.out_trade_no + "R")
    again = jeepay.refund(req.out_trade_no, 1234, 1234, req.out_trade_no + "R")  # "订单状态不正确": looked up
    assert again.status is Status.REFUNDED and len(sim.ledger.refunds) == 1
    assert sim.ledger.calls["refund_query"] == 1


def test_refund_first_processing_98(jeepay, sim):
    req = _paid_then(jeepay, "98")
    no = req.out_trade_no + "R"
    assert jeepay.refund(req.out_trade_no, 1234, 1234, no).code == "ING"
    retried = jeepay.refund(req.out_trade_no, 1234, 1234, no)  # "在途退款申请": looked up, still in progress
    assert (retried.status, retried.code) == (Status.UNKNOWN, "ING") and len(sim.ledger.refunds) == 1
    assert jeepay.query_refund(req.out_trade_no, no).status is Status.REFUNDED  # its 2nd query succeeds
    assert jeepay.query(req.out_trade_no).status is Status.REFUNDED


@pytest.mark.parametrize("tail,amount", [("90", 1234), ("00", 1235)], ids=["not paid", "more than paid"])
def test_refund_refused_is_declined_and_makes_nothing(jeepay, sim, tail, amount):
    req = _paid_then(jeepay, tail)
    out = jeepay.refund(req.out_trade_no, amount, 1234, req.out_trade_no + "R")
    assert (out.status, out.code) == (Status.DECLINED, "9999") and sim.ledger.refunds == {}


def test_partial_refund_leaves_the_order_paid(jeepay):
    req = _paid_then(jeepay, "00")
    assert jeepay.refund(req.out_trade_no, 200, 1234, req.out_trade_no + "R").status is Status.REFUNDED
    assert jeepay.query(req.out_trade_no).status is Status.PAID


def test_query_refund_of_a_refund_jeepay_never_got(jeepay):
    out = jeepay.query_refund("x", "xR")
    assert (out.status, out.code) == (Status.DECLINED, "9999")


def test_refund_answer_without_a_trusted_sign_is_unknown(jeepay, sim, caplog):
    req = _paid_then(jeepay, "00")
    sim.tamper["/api/refund/refundOrder"] = _resign
    with caplog.at_level(logging.WARNING):
        assert jeepay.refund(req.out_trade_no, 1234, 1234, req.out_trade_no + "R").status is Status.UNKNOWN
    assert len(security_lines(caplog)) == 1


# --- the payment code never leaks --------------------------------------------------------------------------


def test_the_payment_code_appears_in_no_log_reason_repr_or_exception(sim, jeepay, caplog):
    codes = [wechat(t) for t in ("00", "80", "90", "96", "97")]
    said = []
    with caplog.at_level(logging.DEBUG):
        for code in codes:
            req = pay_request(code)
            said += [repr(req), str(jeepay.pay(req)), str(jeepay.query(req.out_trade_no))]
        sim.override["/api/pay/unifiedOrder"] = failure("验签失败")
        with pytest.raises(ProviderMisconfigured) as e:
            jeepay.pay(pay_request(wechat("11")))
        said.append(str(e.value))
        sim.stop()
        with pytest.raises(ProviderUnavailable) as e:
            jeepay.pay(pay_request(wechat("12")))
        said.append(str(e.value))
    text = caplog.text + "\n".join(said) + repr(jeepay) + repr(jeepay.options)
    for code in [*codes, wechat("11"), wechat("12")]:
        assert code not in text
    assert sim.secret not in text


def test_a_channel_text_quoting_the_payment_code_is_masked(sim, jeepay, caplog):
    """Jeepay passes the channel's error text on (errMsg, or msg "系统：..."); Alipay's invalid-signature
    text quotes the whole request, payment code included."""
    req = pay_request(alipay("00"))
    quoted = f'Invalid Arguments【验签出错，验签字符串为：biz_content={{"auth_code":"{req.auth_code}"}}】'

    def failed_order(r):
        data = {"mchOrderNo": req.out_trade_no, "orderState": 3, "payOrderId": "P1797000000000000009",
                "errMsg": quoted}
        return Answer(200, json.dumps({"code": 0, "data": data, "msg": "SUCCESS",
                                       "sign": md5_sign(data, sim.secret)}, ensure_ascii=False).encode())

    said = []
    with caplog.at_level(logging.DEBUG):
        sim.override["/api/pay/unifiedOrder"] = failed_order
        out = jeepay.pay(req)
        assert out.status is Status.DECLINED
        said.append(repr(out))
        sim.override["/api/pay/unifiedOrder"] = failure("系统：" + quoted)
        out = jeepay.pay(req)
        assert out.status is Status.UNKNOWN
        said.append(repr(out))
    text = caplog.text + "\n".join(said)
    assert req.auth_code not in text and mask(req.auth_code) in text


# --- configuration ----------------------------------------------------------------------------------------


def _lane(tmp_path: Path, sim: JeepaySimulator, **extra) -> dict:
    table = sim.provider_options() | extra
    return lane_dict(tmp_path / "state", providers={"jp": table}, routing={"wechat": "jp"})


def test_defaults_are_the_platforms_timings(sim, tmp_path):
    o = from_dict(_lane(tmp_path, sim)).providers["jp"].options
    assert (o.first_query_after_s, o.query_every_s, o.reverse_after_s, o.retry_every_s) == (3.0, 3.0, 60.0, 15.0)
    assert (o.connect_timeout_s, o.read_timeout_s, o.way_code) == (3.0, 6.0, "AUTO_BAR")
    assert o.call_limit_s <= 15.0
    p = make_provider("jp", from_dict(_lane(tmp_path, sim)).providers["jp"], tmp_path)
    try:
        assert p.policy.reverse_after_s >= CLOSE_INIT_AFTER_S and p.kind == "jeepay"
        assert p.pay(pay_request(wechat("00"))).status is Status.PAID
    finally:
        p.close()


def _secret(tmp_path: Path, content: str | bytes | None, mode: int = 0o600) -> str:
    path = tmp_path / "app-secret"
    if content is None:
        return str(path)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return str(path)


PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize("content,mode,reason", [
    (None, 0o600, "does not exist"),
    ("s3cretS3cret", 0o644, "open to others (mode 0644)"),
    ("", 0o600, "must hold one line of text"),
    ("line one\nline two\n", 0o600, "must hold one line of text"),
    (PEM, 0o600, "holds a PEM key"),
    ("my secret", 0o600, "printable ASCII"),
    (b"\xff\xfe", 0o600, "not UTF-8"),
], ids=["missing", "mode 0644", "empty", "two lines", "a key file", "spaces", "not text"])
def test_fail__app_secret_file_is_named(tmp_path, sim, content, mode, reason):
    with pytest.raises(ConfigError) as e:
        from_dict(_lane(tmp_path, sim, app_secret_file=_secret(tmp_path, content, mode)))
    assert e.value.key == "providers.jp.app_secret_file" and reason in e.value.reason
    assert "s3cretS3cret" not in str(e.value) and "MIIEvQ" not in str(e.value)


def test_check_config_exits_2_naming_the_secret_file(tmp_path, sim):
    doc = _lane(tmp_path, sim, app_secret_file=_secret(tmp_path, "s3cretS3cret\n", 0o644))
    r = subprocess.run(appliance_cmd() + ["check-config", "--config", str(write_config(tmp_path / "a.toml", doc))],
                       capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert r.returncode == 2 and "providers.jp.app_secret_file" in r.stderr and "s3cretS3cret" not in r.stderr


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_a_secret_file_ending_in_a_newline_works(tmp_path, sim, ending):
    Path(sim.secret_file).write_text(sim.secret + ending)
    p = make_provider("jp", from_dict(_lane(tmp_path, sim, read_timeout_s=1.0)).providers["jp"], tmp_path)
    try:
        assert p.pay(pay_request(wechat("00"))).status is Status.PAID
    finally:
        p.close()


@pytest.mark.parametrize("change,key,reason", [
    ({"base_url": "http://pay.example.com"}, "base_url", "plain http:// is refused"),
    ({"base_url": "http://10.0.0.5:9216"}, "base_url", "plain http:// is refused"),
    ({"base_url": "ftp://pay.example.com"}, "base_url", "must be an https:// address"),
    ({"base_url": ...}, "base_url", "is required"),
    ({"mch_no": ""}, "mch_no", "must be 1-64 letters"),
    ({"app_id": "66a1 f0c2"}, "app_id", "must be 1-64 letters"),
    ({"way_code": "UP_BAR"}, "way_code", "must be one of 'AUTO_BAR', 'WX_BAR', 'ALI_BAR', 'YSF_BAR'"),
    ({"read_timeout_s": 7.0}, "read_timeout_s", "exceeds 15 s"),  # with connect 3 s: 3 + 2 x 7 = 17
    ({"appSecret": "x"}, "appSecret", "unknown key"),
])
def test_fail__options_are_checked(tmp_path, sim, change, key, reason):
    doc = _lane(tmp_path, sim)
    for k, v in change.items():
        if v is ...:
            del doc["providers"]["jp"][k]
        else:
            doc["providers"]["jp"][k] = v
    with pytest.raises(ConfigError) as e:
        from_dict(doc)
    assert e.value.key == f"providers.jp.{key}" and reason in e.value.reason, str(e.value)


def test_https_and_loopback_http_are_accepted(tmp_path, sim):
    for url in ("https://pay.example.com", "https://pay.example.com:9216", "http://127.0.0.1:9216", "http://localhost"):
        assert from_dict(_lane(tmp_path, sim, base_url=url)).providers["jp"].options.base_url == url


def test_example_config_is_valid_with_real_key_files(tmp_path, sim):
    text = (ROOT / "examples" / "jeepay.toml").read_text()
    paths = re.findall(r'^app_secret_file = "([^"]+)"', text, flags=re.M)
    assert paths, "the example names no app_secret_file"
    for path in paths:
        text = text.replace(f'"{path}"', f'"{sim.secret_file}"')
    text = re.sub(r'^state_dir = "[^"]+"', f'state_dir = "{tmp_path / "state"}"', text, flags=re.M)
    cfg = load(write_text(tmp_path / "jeepay.toml", text))
    (name,) = [n for n, p in cfg.providers.items() if p.kind == "jeepay"]
    assert set(cfg.routing.values()) == {name}
    assert providers.get("jeepay", "x").options is JeepayOptions


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_signed_request_is_the_json_of_the_fields_and_their_sign():
    body = json.loads(signed_request({"a": 1, "b": "x"}, SECRET))
    assert body == {"a": 1, "b": "x", "sign": md5_sign({"a": 1, "b": "x"}, SECRET)}


def test_a_failed_order_text_quoting_a_payment_code_is_masked_also_where_the_code_is_unknown():
    """A query does not know the code, so a channel text quoting it is masked by its shape."""
    text = '系统：[isv.invalid-signature] auth_code=134567890123456700&total_amount=12.34'
    data = {"mchOrderNo": "S1_L1_Q1", "state": 3, "errCode": "", "errMsg": text, "payOrderId": "P1797000000000000001"}
    out = order_outcome(data, "S1_L1_Q1")
    assert out.status is Status.DECLINED
    assert "134567890123456700" not in out.reason and "1345**********6700" in out.reason
    refund = refund_outcome({"mchRefundNo": "R1", "state": 3, "errCode": "X", "errMsg": text}, "R1")
    assert "134567890123456700" not in refund.reason

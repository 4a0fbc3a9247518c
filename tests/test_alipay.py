"""The Alipay adapter and its simulator: the wire format against published vectors and an
independent signer, the requests as the simulator receives them, answer verification, the code
tables, key-file errors, transport limits. Everything over real loopback HTTP; nothing of ours
is mocked (the tampering gateways below are platforms that misbehave, subclasses of the simulator).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import tomllib
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from appliance.config import ConfigError, from_dict, load
from appliance.errors import ProviderMisconfigured, ProviderUnavailable
from appliance.payments import PayRequest, Status, make_provider
from appliance.payments.alipay import (BILL_METHOD, GATEWAY, AlipayOptions, beijing_time, funding_source, members,
                                       outcome_of, response_text, signing_string)
from appliance.payments.bills import BillError, BillState, BillTotals, BillUnavailable, LineKind, day_start
from appliance.payments.keys import generate_rsa, rsa_sign, rsa_verify
from appliance.simulators import Answer, available
from appliance.simulators.alipay import APP_ID, AlipaySimulator
from appliance.simulators.ledger import Ledger
from conftest import ROOT, appliance_cmd, lane_dict, subprocess_env, write_config

NAME = "ali"


def code(tail: str, n: int = 0) -> str:
    """An Alipay payment code (25-30 prefix, 18 digits) whose last two digits pick the ledger's scenario."""
    return f"28{n:014d}{tail}"


def pay_request(out_trade_no: str, tail: str = "00", amount_fen: int = 1234, n: int = 0) -> PayRequest:
    return PayRequest(out_trade_no, amount_fen, code(tail, n), "Order A1", "S0001", "L01")


@pytest.fixture
def sim(tmp_path):
    s = AlipaySimulator(tmp_path / "keys", Ledger(slow_s=3.0)).start()
    yield s
    s.stop()


def options(sim, **overrides) -> dict:
    return sim.provider_options() | {"connect_timeout_s": 0.5, "read_timeout_s": 1.0} | overrides


def config(tmp_path, table: dict):
    doc = lane_dict(tmp_path / "state")
    doc["providers"][NAME] = table
    return from_dict(doc)


@pytest.fixture
def connect(tmp_path):
    """connect(sim or table, **overrides) -> a provider built through the real config schema."""
    made = []

    def make(source, **overrides):
        table = options(source, **overrides) if isinstance(source, AlipaySimulator) else source
        p = make_provider(NAME, config(tmp_path, table).providers[NAME], tmp_path)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def security_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("SECURITY")]


def test_registered_and_simulated():
    assert "alipay" in available()
    from appliance.payments import provider_options
    assert provider_options()["alipay"] is AlipayOptions


# --- the wire format ---------------------------------------------------------------------------------------


def test_signing_string_sorts_drops_empty_and_sign_keeps_sign_type_and_raw_values():
    params = {"timestamp": "2014-07-24 03:07:50", "method": "alipay.trade.pay", "app_id": "2014072300007148",
              "sign_type": "RSA2", "sign": "xyz", "notify_url": "", "charset": "utf-8", "version": "1.0",
              "biz_content": '{"subject":"订单 A&B","total_amount":"0.05"}'}
    assert signing_string(params) == (
        'app_id=2014072300007148&biz_content={"subject":"订单 A&B","total_amount":"0.05"}&charset=utf-8'
        '&method=alipay.trade.pay&sign_type=RSA2&timestamp=2014-07-24 03:07:50&version=1.0')


def test_request_signature_agrees_with_openssl(tmp_path, sim, connect):
    """An independent RSA2 signer (openssl dgst -sha256) signs the same string to the same bytes."""
    if subprocess.run(["openssl", "version"], capture_output=True).returncode != 0:
        pytest.skip("no openssl command here")
    p = connect(sim)
    form = p.signed_form("alipay.trade.query", {"out_trade_no": "T1", "subject": "订单"})
    message = tmp_path / "message"
    message.write_bytes(signing_string(form).encode("utf-8"))
    pem = tmp_path / "keys" / "app_private_key.pem"
    out = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(pem), str(message)], capture_output=True,
                         check=True).stdout
    import base64
    assert form["sign"] == base64.b64encode(out).decode()


# A real answer of Alipay's gateway and the Alipay public key it verifies with, as published in
# alipay/alipay-sdk-nodejs-all (MIT), test/alipay.test.ts "checkResponseSign should work" and
# test/fixtures/alipay-public-key.pem.
PUBLISHED_ALIPAY_PUBLIC_KEY = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAk7LzhmMa2c4qQd4fqAqenfbuFoA7stPKvoS1LrZEsVnOOGUUjwoa1oU9"
    "xsSPjcOWhIerU/VAN4J95GIAXx59ipcleIyfLn2FhHXPgLJpvo+b2jJFyn/1/DbeJDh+0yDVAOf50Z7HhI0mdUhFMkXlT7BU0ZMt"
    "Jf/TmISFEfhDU/w6qFd6D42L97byAkq0K6LroglSVF24GqJEa7hSeUIkZWj7RasykXrc2uVJ1+ejkXE0LyPxa2AHykMGbJLf5SiZ"
    "vaNzUZgnKIR36mLOHpQ/2JCXxhXZYUWHzy0kMH54JcUEeksFWBYLGvLjV1phbcUIc3Q76tIuqApY6E222OoZZQIDAQAB\n"
    "-----END PUBLIC KEY-----\n")
PUBLISHED_ANSWER = (
    '{"alipay_open_file_upload_response":{"code":"10000","msg":"Success","file_id":"CAxAToWB1JsAAAAAAAAAAAAADgSLAQBr"}'
    ',"sign":"F+LDzpTNiavn7xVZPGuPCSSVRSmWzJGgtuji6tVELGEaqMaNj0jRKXUEr5nloZJBBmwEnddOyCjjepMmrTKTvoOqQ0Efxpr/R1iEeH'
    'THVbb/Q8TTh6Up5gHJDkILdaWS2q1cWeQ6VT+HQY9P3WRXS7uhILHuDODIhpAyCu5KhWGt0rMCIG+Im6NODJP2oohtSCtmTFXg58HH587Z2y2b'
    'dbjzOxLvzD9IrU1imghXQ2S/Q+wMIvRk9on6cWnBLkrNvJKapA2ReNGWOwyuASvB9zDVzhMPbR+3mfRGkVDxsq5HYLjBKGskJMXHw0HuugZij6S'
    'cRuaLPODhmHwr/pJ9yw=="}')


def test_published_answer_verifies_over_the_exact_response_text():
    key = serialization.load_pem_public_key(PUBLISHED_ALIPAY_PUBLIC_KEY.encode())
    answer = response_text(PUBLISHED_ANSWER, "alipay.open.file.upload")
    assert answer.text == '{"code":"10000","msg":"Success","file_id":"CAxAToWB1JsAAAAAAAAAAAAADgSLAQBr"}'
    assert rsa_verify(key, answer.text.encode(), answer.sign)
    tampered = response_text(PUBLISHED_ANSWER.replace("CAxA", "CAxB"), "alipay.open.file.upload")
    assert not rsa_verify(key, tampered.text.encode(), tampered.sign)


def test_response_text_is_the_exact_substring_however_it_is_spaced_or_escaped():
    # The spacing and the nested "sign" member of the SDK's own "include sign key in data" case.
    inner = '{"code":"10000","sign":"xxx","msg":"Success","url":"http:\\/\\/x.cn\\/a?b=1&c=2","t":"\\u4e2d"}'
    body = f'{{"alipay_trade_query_response"\n        :\n        {inner},\n\n   "sign"  :  "c2ln"}}'
    answer = response_text(body, "alipay.trade.query")
    assert (answer.text, answer.sign, answer.key) == (inner, "c2ln", "alipay_trade_query_response")
    assert json.dumps(answer.fields, separators=(",", ":")) != inner  # re-serializing would change the signed bytes


@pytest.mark.parametrize("body,why", [
    ("<html>502 Bad Gateway</html>", "not JSON"),
    ('{"alipay_trade_pay_response":{"code":"10000"}', "not JSON"),
    ('{"alipay_trade_pay_response":{"code":"10000"},"sign":"a"} trailing', "text after"),
    ('{"alipay_trade_pay_response":{"code":"40004"},"alipay_trade_pay_response":{"code":"10000"},"sign":"a"}',
     "appears twice"),
    ('{"alipay_trade_query_response":{"code":"10000"},"sign":"a"}', "neither"),
    ('{"alipay_trade_pay_response":"10000","sign":"a"}', "not an object"),
    ('["alipay_trade_pay_response"]', "not JSON"),
])
def test_fail__answers_that_are_not_alipays(body, why):
    with pytest.raises(ValueError, match=why):
        response_text(body, "alipay.trade.pay")


def test_members_keeps_every_value_text():
    assert members(' { "a" : [1, 2] , "b":{"c":"}"} } ') == {"a": ([1, 2], "[1, 2]"), "b": ({"c": "}"}, '{"c":"}"}')}
    assert members("{}") == {}


def test_beijing_time_whatever_the_devices_time_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        noon_utc = datetime(2024, 12, 31, 20, 30, 5, tzinfo=timezone.utc)
        assert beijing_time(noon_utc) == "2025-01-01 04:30:05"
        assert beijing_time(noon_utc.astimezone()) == "2025-01-01 04:30:05"
        now = datetime.strptime(beijing_time(), "%Y-%m-%d %H:%M:%S")
        assert abs(now - datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=8)) < timedelta(seconds=5)
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("bills,expected", [
    ([{"fund_channel": "ALIPAYACCOUNT", "amount": "10.00"}], "ALIPAYACCOUNT"),
    ([{"fund_channel": "PCREDIT", "amount": "9.00"}, {"fund_channel": "COUPON", "amount": "1.00"}], "PCREDIT+COUPON"),
    ([], None), (None, None), ("ALIPAYACCOUNT", None), ([{"amount": "1.00"}, "x"], None),
])
def test_funding_source_joins_the_fund_channels(bills, expected):
    assert funding_source({"fund_bill_list": bills}) == expected


# --- the requests, as the gateway receives them ------------------------------------------------------------


def test_requests_carry_the_protocol_fields_units_and_ids(sim, connect, monkeypatch):
    monkeypatch.setenv("TZ", "Europe/London")
    time.tzset()
    p = connect(sim)
    try:
        assert p.pay(pay_request("S0001L01X0001", amount_fen=5)).status is Status.PAID
    finally:
        monkeypatch.undo()
        time.tzset()
    p.query("S0001L01X0001")
    p.refund("S0001L01X0001", 5, 5, "S0001L01X0001R")
    p.query_refund("S0001L01X0001", "S0001L01X0001R")
    p.reverse("S0001L01X0001")
    sent = list(sim.requests)
    assert [m for m, _ in sent] == ["alipay.trade.pay", "alipay.trade.query", "alipay.trade.refund",
                                    "alipay.trade.fastpay.refund.query", "alipay.trade.cancel"]
    for _, form in sent:
        assert set(form) == {"app_id", "method", "format", "charset", "sign_type", "timestamp", "version",
                             "biz_content", "sign"}
        assert (form["app_id"], form["format"], form["charset"], form["sign_type"], form["version"]) == (
            APP_ID, "JSON", "utf-8", "RSA2", "1.0")
        sent_at = datetime.strptime(form["timestamp"], "%Y-%m-%d %H:%M:%S").replace(
            tzinfo=timezone(timedelta(hours=8)))
        assert abs(sent_at - datetime.now(timezone.utc)) < timedelta(seconds=30)
    bizes = [json.loads(form["biz_content"]) for _, form in sent]
    assert bizes[0] == {"out_trade_no": "S0001L01X0001", "scene": "bar_code", "auth_code": code("00"),
                        "subject": "Order A1", "total_amount": "0.05", "store_id": "S0001", "terminal_id": "L01"}
    assert bizes[1] == {"out_trade_no": "S0001L01X0001", "query_options": ["fund_bill_list"]}
    assert bizes[2] == {"out_trade_no": "S0001L01X0001", "refund_amount": "0.05", "out_request_no": "S0001L01X0001R"}
    assert bizes[3] == {"out_trade_no": "S0001L01X0001", "out_request_no": "S0001L01X0001R"}
    assert bizes[4] == {"out_trade_no": "S0001L01X0001"}


@pytest.mark.parametrize("fen,yuan", [(1, "0.01"), (10, "0.10"), (1234, "12.34"), (100_00, "100.00"),
                                      (100_000_000_00, "100000000.00")])
def test_amounts_are_yuan_with_two_decimals_from_integer_fen(sim, connect, fen, yuan):
    p = connect(sim)
    assert p.pay(pay_request(f"A{fen}", amount_fen=fen)).status in (Status.PAID, Status.UNKNOWN)  # big: password
    assert json.loads(sim.requests[-1][1]["biz_content"])["total_amount"] == yuan
    assert sim.ledger.trades[f"A{fen}"].amount_fen == fen


def test_the_form_is_posted_as_utf8_form_data(sim, connect):
    """The body is what the simulator parsed: a Chinese subject arrives intact and its signature holds."""
    p = connect(sim)
    req = PayRequest("U1", 100, code("00"), "订单 A&B=1", "S0001", "L01")
    assert p.pay(req).status is Status.PAID
    assert json.loads(sim.requests[-1][1]["biz_content"])["subject"] == "订单 A&B=1"


# --- outcomes through the simulator, scenario by scenario ----------------------------------------------------


@pytest.mark.parametrize("tail,status,code_,then", [
    ("00", Status.PAID, "10000", Status.PAID),
    ("90", Status.DECLINED, "ACQ.BUYER_BALANCE_NOT_ENOUGH", Status.DECLINED),
    ("91", Status.DECLINED, "ACQ.PAYMENT_AUTH_CODE_INVALID", Status.DECLINED),
    ("82", Status.DECLINED, "ACQ.PAYMENT_AUTH_CODE_INVALID", Status.DECLINED),
    ("92", Status.UNKNOWN, "10003", Status.UNKNOWN),  # paid at the 2nd query
    ("93", Status.UNKNOWN, "10003", Status.UNKNOWN),
    ("94", Status.UNKNOWN, "ACQ.SYSTEM_ERROR", Status.PAID),
    ("96", Status.UNKNOWN, "", Status.PAID),
])
def test_pay_then_query_by_scenario(sim, connect, tail, status, code_, then):
    p = connect(sim)
    out = p.pay(pay_request("P2", tail))
    assert (out.status, out.code) == (status, code_), out
    assert p.query("P2").status is then
    assert sim.ledger.charges("P2") == (1 if then is Status.PAID else 0)


def test_paid_answers_carry_trade_no_and_funding_source(sim, connect):
    p = connect(sim)
    wallet, card = p.pay(pay_request("F2", n=1)), p.pay(pay_request("F3", n=2))
    assert (wallet.funding_source, card.funding_source) == ("ALIPAYACCOUNT", "BANKCARD")
    assert wallet.platform_txn_id == sim.ledger.trades["F2"].transaction_id
    queried = p.query("F3")
    assert (queried.code, queried.funding_source, queried.platform_txn_id) == (
        "TRADE_SUCCESS", "BANKCARD", sim.ledger.trades["F3"].transaction_id)


def test_declines_name_distinct_sub_codes_where_alipay_has_them(sim, connect):
    p = connect(sim)
    assert p.pay(pay_request("D1", "90")).code == "ACQ.BUYER_BANKCARD_BALANCE_NOT_ENOUGH"  # odd number: a card
    assert p.pay(pay_request("D2", "90", n=1)).code == "ACQ.BUYER_BALANCE_NOT_ENOUGH"
    used = p.pay(pay_request("D4", "90", n=1))  # the code of D2 again: single-use
    assert (used.status, used.code) == (Status.DECLINED, "ACQ.PAYMENT_AUTH_CODE_INVALID")
    assert "已使用" in used.reason


def test_password_paid_at_the_second_query(sim, connect):
    p = connect(sim)
    p.pay(pay_request("W1", "92"))
    assert [p.query("W1").status, p.query("W1").status] == [Status.UNKNOWN, Status.PAID]


def test_a_repeated_pay_charges_nothing_more_and_is_decided_by_query(sim, connect):
    p = connect(sim)
    assert p.pay(pay_request("R2")).status is Status.PAID
    again = p.pay(pay_request("R2"))
    assert (again.status, again.code) == (Status.UNKNOWN, "ACQ.TRADE_HAS_SUCCESS")
    assert p.query("R2").status is Status.PAID and sim.ledger.charges("R2") == 1


def test_cancel_closes_or_refunds_and_queries_agree(sim, connect):
    p = connect(sim)
    p.pay(pay_request("C2"))
    p.pay(pay_request("C4", "93", n=1))
    paid, waiting = p.reverse("C2"), p.reverse("C4")
    assert (paid.status, "action refund" in paid.reason) == (Status.REVERSED, True)
    assert (waiting.status, "action close" in waiting.reason) == (Status.REVERSED, True)
    assert (p.query("C2").status, p.query("C4").status) == (Status.REFUNDED, Status.DECLINED)
    assert p.reverse("never-sent").status is Status.REVERSED
    assert p.pay(pay_request("never-sent", n=3)).code == "ACQ.TRADE_HAS_CLOSE"  # a late pay is refused


def test_cancel_asked_to_retry_twice_then_done(sim, connect):
    p = connect(sim)
    p.pay(pay_request("K2", "81"))
    outs = [p.reverse("K2") for _ in range(3)]
    assert [o.status for o in outs] == [Status.UNKNOWN, Status.UNKNOWN, Status.REVERSED]
    assert "retry_flag=Y" in outs[0].reason


def test_cancel_outside_the_window_is_declined_so_the_resolver_refunds(tmp_path, connect):
    with AlipaySimulator(tmp_path / "keys", Ledger(reverse_window_s=0.0)) as sim:
        p = connect(sim)
        p.pay(pay_request("O2"))
        out = p.reverse("O2")
        assert (out.status, out.code) == (Status.DECLINED, "ACQ.TRADE_CANCEL_TIME_OUT")
        assert p.refund("O2", 1234, 1234, "O2R").status is Status.REFUNDED
        assert p.query("O2").status is Status.REFUNDED


def test_refund_processing_then_success_and_repeats(sim, connect):
    p = connect(sim)
    p.pay(pay_request("Q2", "98"))
    first = p.refund("Q2", 1234, 1234, "Q2R")
    assert (first.status, "fund_change=N" in first.reason) == (Status.UNKNOWN, True)
    assert [p.query_refund("Q2", "Q2R").status, p.query_refund("Q2", "Q2R").status] == [
        Status.UNKNOWN, Status.REFUNDED]
    again = p.refund("Q2", 1234, 1234, "Q2R")  # the same number: no second refund, funds unchanged
    assert again.status is Status.UNKNOWN and len(sim.ledger.refunds) == 1


@pytest.mark.parametrize("setup,out_trade_no,status,code_", [
    ("paid", "Z2", Status.REFUNDED, "10000"),
    ("none", "Z2", Status.DECLINED, "ACQ.TRADE_NOT_EXIST"),
    ("declined", "Z2", Status.DECLINED, "ACQ.TRADE_STATUS_ERROR"),
])
def test_refund_answers(sim, connect, setup, out_trade_no, status, code_):
    p = connect(sim)
    if setup != "none":
        p.pay(pay_request("Z2", "00" if setup == "paid" else "90"))
    out = p.refund(out_trade_no, 1234, 1234, "Z2R")
    assert (out.status, out.code) == (status, code_)


def test_refund_query_of_a_refund_never_asked_for_is_declined(sim, connect):
    p = connect(sim)
    p.pay(pay_request("N2"))
    assert p.query_refund("N2", "N2R").status is Status.DECLINED
    assert p.query_refund("no-such-trade", "N2R").status is Status.DECLINED


# --- the code tables -----------------------------------------------------------------------------------------


def _answer(code_: str, sub: str = "", **fields) -> dict:
    a = {"code": code_, "msg": "m", **fields}
    return a | {"sub_code": sub, "sub_msg": "s"} if sub else a


OUTCOMES = [
    # call, answer, status, Outcome.code
    ("pay", _answer("10000", out_trade_no="T"), Status.PAID, "10000"),
    ("pay", _answer("10003"), Status.UNKNOWN, "10003"),
    ("pay", _answer("20000", "isp.unknow-error"), Status.UNKNOWN, "isp.unknow-error"),
    ("pay", _answer("20000"), Status.UNKNOWN, "20000"),
    ("pay", _answer("40004", "ACQ.SYSTEM_ERROR"), Status.UNKNOWN, "ACQ.SYSTEM_ERROR"),
    ("pay", _answer("40004", "ACQ.TRADE_HAS_SUCCESS"), Status.UNKNOWN, "ACQ.TRADE_HAS_SUCCESS"),
    ("pay", _answer("40004", "ACQ.CONTEXT_INCONSISTENT"), Status.UNKNOWN, "ACQ.CONTEXT_INCONSISTENT"),
    ("pay", _answer("40004", "ACQ.SOMETHING_NEW"), Status.UNKNOWN, "ACQ.SOMETHING_NEW"),
    ("pay", _answer("40004", "ACQ.PAYMENT_AUTH_CODE_INVALID"), Status.DECLINED, "ACQ.PAYMENT_AUTH_CODE_INVALID"),
    ("pay", _answer("40004", "ACQ.BUYER_BALANCE_NOT_ENOUGH"), Status.DECLINED, "ACQ.BUYER_BALANCE_NOT_ENOUGH"),
    ("pay", _answer("40004", "ACQ.BUYER_BANKCARD_BALANCE_NOT_ENOUGH"), Status.DECLINED,
     "ACQ.BUYER_BANKCARD_BALANCE_NOT_ENOUGH"),
    ("pay", _answer("40004", "ACQ.TRADE_HAS_CLOSE"), Status.DECLINED, "ACQ.TRADE_HAS_CLOSE"),
    ("pay", _answer("40004", "ACQ.PAYMENT_REQUEST_HAS_RISK"), Status.DECLINED, "ACQ.PAYMENT_REQUEST_HAS_RISK"),
    ("pay", {}, Status.UNKNOWN, ""),
    ("query", _answer("10000", trade_status="TRADE_SUCCESS"), Status.PAID, "TRADE_SUCCESS"),
    ("query", _answer("10000", trade_status="TRADE_FINISHED"), Status.PAID, "TRADE_FINISHED"),
    ("query", _answer("10000", trade_status="WAIT_BUYER_PAY"), Status.UNKNOWN, "WAIT_BUYER_PAY"),
    ("query", _answer("10000", trade_status="TRADE_CLOSED"), Status.DECLINED, "TRADE_CLOSED"),
    ("query", _answer("10000", trade_status="TRADE_CLOSED", send_pay_date="2024-01-01 12:00:00"),
     Status.REFUNDED, "TRADE_CLOSED"),
    ("query", _answer("10000", trade_status="SOMETHING_NEW"), Status.UNKNOWN, "SOMETHING_NEW"),
    ("query", _answer("10000"), Status.UNKNOWN, "10000"),
    ("query", _answer("40004", "ACQ.TRADE_NOT_EXIST"), Status.DECLINED, "ACQ.TRADE_NOT_EXIST"),
    ("query", _answer("40004", "ACQ.SYSTEM_ERROR"), Status.UNKNOWN, "ACQ.SYSTEM_ERROR"),
    ("query", _answer("40004", "ACQ.PAYMENT_AUTH_CODE_INVALID"), Status.UNKNOWN, "ACQ.PAYMENT_AUTH_CODE_INVALID"),
    ("reverse", _answer("10000", retry_flag="N", action="close"), Status.REVERSED, "10000"),
    ("reverse", _answer("10000", retry_flag="N", action="refund"), Status.REVERSED, "10000"),
    ("reverse", _answer("10000", retry_flag="Y"), Status.UNKNOWN, "10000"),
    ("reverse", _answer("40004", "ACQ.SYSTEM_ERROR", retry_flag="Y"), Status.UNKNOWN, "ACQ.SYSTEM_ERROR"),
    ("reverse", _answer("40004", "ACQ.SYSTEM_ERROR"), Status.UNKNOWN, "ACQ.SYSTEM_ERROR"),
    ("reverse", _answer("40004", "ACQ.TRADE_CANCEL_TIME_OUT", retry_flag="N"), Status.DECLINED,
     "ACQ.TRADE_CANCEL_TIME_OUT"),
    ("reverse", _answer("40004", "ACQ.TRADE_HAS_FINISHED"), Status.DECLINED, "ACQ.TRADE_HAS_FINISHED"),
    ("reverse", _answer("40004", "ACQ.TRADE_CANCEL_TIME_OUT", retry_flag="Y"), Status.UNKNOWN,
     "ACQ.TRADE_CANCEL_TIME_OUT"),  # retry_flag=Y wins
    ("reverse", _answer("20000"), Status.UNKNOWN, "20000"),
    ("refund", _answer("10000", fund_change="Y"), Status.REFUNDED, "10000"),
    ("refund", _answer("10000", fund_change="N"), Status.UNKNOWN, "10000"),
    ("refund", _answer("10000"), Status.UNKNOWN, "10000"),
    ("refund", _answer("40004", "ACQ.SYSTEM_ERROR"), Status.UNKNOWN, "ACQ.SYSTEM_ERROR"),
    ("refund", _answer("40004", "ACQ.TRADE_STATUS_ERROR"), Status.DECLINED, "ACQ.TRADE_STATUS_ERROR"),
    ("refund", _answer("40004", "ACQ.SELLER_BALANCE_NOT_ENOUGH"), Status.DECLINED, "ACQ.SELLER_BALANCE_NOT_ENOUGH"),
    ("refund", _answer("40004", "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"), Status.DECLINED,
     "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"),
    ("query_refund", _answer("10000", refund_status="REFUND_SUCCESS", out_request_no="R"), Status.REFUNDED,
     "REFUND_SUCCESS"),
    ("query_refund", _answer("10000", out_request_no="R", refund_amount="1.00"), Status.UNKNOWN, "10000"),
    ("query_refund", _answer("10000", refund_status="REFUND_PROCESSING"), Status.UNKNOWN, "REFUND_PROCESSING"),
    ("query_refund", _answer("10000", out_trade_no="T"), Status.DECLINED, "10000"),
    ("query_refund", _answer("40004", "ACQ.TRADE_NOT_EXIST"), Status.DECLINED, "ACQ.TRADE_NOT_EXIST"),
    ("query_refund", _answer("40004", "ACQ.SYSTEM_ERROR"), Status.UNKNOWN, "ACQ.SYSTEM_ERROR"),
]


@pytest.mark.parametrize("call,answer,status,code_", OUTCOMES,
                         ids=[f"{c}-{a.get('sub_code') or a.get('code')}-{s}" for c, a, s, _ in OUTCOMES])
def test_code_table(call, answer, status, code_):
    out = outcome_of(call, answer)
    assert (out.status, out.code) == (status, code_)


@pytest.mark.parametrize("call", ["pay", "query", "reverse", "refund", "query_refund"])
@pytest.mark.parametrize("answer", [
    _answer("40001", "isv.missing-signature"), _answer("40002", "isv.invalid-signature"),
    _answer("40002", "isv.invalid-timestamp"), _answer("40006", "isv.insufficient-isv-permissions"),
    _answer("20001", "aop.invalid-auth-token"), _answer("40004", "ACQ.ACCESS_FORBIDDEN"),
    _answer("40004", "ACQ.PARTNER_ERROR"), _answer("40004", "ACQ.INVALID_PARAMETER"),
], ids=lambda a: a["sub_code"])
def test_the_gateway_refusing_our_request_is_a_misconfiguration(call, answer):
    with pytest.raises(ProviderMisconfigured, match=re.escape(answer["sub_code"])):
        outcome_of(call, answer)


# --- answers that are not trusted ---------------------------------------------------------------------------


class MisbehavingGateway(AlipaySimulator):
    """Alipay as a man in the middle, a broken proxy or a replaying attacker would make it look."""

    mode = "honest"

    def _answer(self, key, fields, *, signed=True, forged=False):
        text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        sign = rsa_sign(self._alipay_private, text.encode())
        if self.mode == "tampered":  # signed, then changed on the way
            text = text.replace('"msg":"', '"msg":"!')
        elif self.mode == "wrong_key":
            sign = rsa_sign(rsa.generate_private_key(public_exponent=65537, key_size=2048), text.encode())
        elif self.mode == "exact_text":  # Alipay's own spacing and escapes, signed as they stand
            text = json.dumps(fields, ensure_ascii=True, separators=(", ", " : ")).replace("/", "\\/")
            sign = rsa_sign(self._alipay_private, text.encode())
        member = {"unsigned": "", "empty_sign": ',"sign":""', "sign_not_a_string": ',"sign":12345'}.get(
            self.mode, f',"sign":"{sign}"')
        return Answer(200, f'{{"{key}" : {text}{member}}}'.encode(), {"Content-Type": "text/html;charset=utf-8"})

    def _biz(self, form):
        biz = super()._biz(form)
        if self.mode == "replay" and form.get("method") == "alipay.trade.query":
            biz["out_trade_no"] = "someone-elses"  # the signed answer about another trade
        return biz

    def _pay(self, biz):
        fields, trade, new = super()._pay(biz)
        if self.mode == "echo":  # a signed decline that quotes the payment code
            fields = {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.PAYMENT_AUTH_CODE_INVALID",
                      "sub_msg": f"付款码{biz['auth_code']}无效", "out_trade_no": biz["out_trade_no"]}
        return fields, trade, new


@pytest.mark.parametrize("mode", ["tampered", "wrong_key", "unsigned", "empty_sign", "sign_not_a_string", "replay"])
def test_fail__an_answer_that_does_not_verify_is_unknown_and_logged_once(tmp_path, connect, caplog, mode):
    caplog.set_level(logging.INFO)
    with MisbehavingGateway(tmp_path / "keys") as gw:
        p = connect(gw)
        assert p.pay(pay_request("someone-elses", n=9)).status is Status.PAID  # (honest, for the replay)
        gw.mode = mode
        pays = [p.pay(pay_request("V2", "90")) for _ in range(3)]
        queries = [p.query("V2") for _ in range(3)]
        untrusted = queries if mode == "replay" else pays + queries  # the replay is of a query answer
        assert {(o.status, o.code, o.platform_txn_id) for o in untrusted} == {(Status.UNKNOWN, "", None)}
        lines = security_lines(caplog)
        expected = ["query"] if mode == "replay" else ["pay", "query"]
        assert len(lines) == len(expected), lines
        assert all(f"the {c} answer for V2" in line for c, line in zip(expected, lines)), lines
        gw.mode = "honest"
        assert p.query("V2").status is Status.DECLINED  # a signed query decides


def test_answers_verify_over_alipays_exact_text(tmp_path, connect, caplog):
    with MisbehavingGateway(tmp_path / "keys") as gw:
        gw.mode = "exact_text"
        p = connect(gw)
        out = p.pay(pay_request("E2"))
        assert (out.status, out.funding_source) == (Status.PAID, "ALIPAYACCOUNT")
        assert p.query("E2").status is Status.PAID and not security_lines(caplog)


def test_a_payment_code_quoted_by_an_answer_is_masked(tmp_path, connect):
    with MisbehavingGateway(tmp_path / "keys") as gw:
        gw.mode = "echo"
        req = pay_request("Q2", "00")
        out = connect(gw).pay(req)
        assert out.status is Status.DECLINED
        assert req.auth_code not in repr(out) and "2800**********0000" in out.reason


def test_fail__answers_signed_by_a_key_other_than_the_configured_alipay_key(sim, connect, caplog):
    """Configuring the app's own public key instead of Alipay's (the common mistake) trusts nothing."""
    p = connect(sim, alipay_public_key_file=str(sim.keys_dir / "app_public_key.pem"))
    assert p.pay(pay_request("G2")).status is Status.UNKNOWN
    assert p.pay(pay_request("G2")).status is Status.UNKNOWN
    assert len(security_lines(caplog)) == 1 and "alipay_public_key_file" in security_lines(caplog)[0]


def test_fail__a_signed_answer_for_another_amount_is_not_trusted(tmp_path, connect, caplog):
    class OtherAmount(AlipaySimulator):
        def _paid_fields(self, trade):
            return super()._paid_fields(trade) | {"total_amount": "0.01"}

    with OtherAmount(tmp_path / "keys") as gw:
        assert connect(gw).pay(pay_request("M2")).status is Status.UNKNOWN
        assert "not 12.34" in security_lines(caplog)[0]


# --- the gateway refusing our requests ----------------------------------------------------------------------


def test_fail__the_simulator_refuses_a_bad_request_signature(tmp_path, sim, connect, caplog):
    other = tmp_path / "other"
    other.mkdir()
    generate_rsa(other / "key.pem", other / "pub.pem")
    p = connect(sim, app_private_key_file=str(other / "key.pem"))
    caplog.set_level(logging.DEBUG)
    req = pay_request("B2")
    with pytest.raises(ProviderMisconfigured, match="isv.invalid-signature") as e:
        p.pay(req)
    assert req.auth_code not in str(e.value)  # Alipay's answer quotes the string it checked, auth_code included
    assert sim.ledger.trades == {} and sim.ledger.calls == {}  # refused before any business
    with pytest.raises(ProviderMisconfigured, match="isv.invalid-signature"):
        p.query("B2")
    assert not any(req.auth_code in r.getMessage() for r in caplog.records)


def test_fail__an_unknown_app_id_gets_an_unsigned_answer_which_is_not_trusted(sim, connect, caplog):
    p = connect(sim, app_id="9021000000000099")
    out = p.pay(pay_request("I2"))
    assert out.status is Status.UNKNOWN
    assert "unsigned error_response claiming 40002 isv.invalid-app-id" in security_lines(caplog)[0]


def test_fail__the_simulator_refuses_a_stale_timestamp(sim, connect):
    p = connect(sim)
    form = p.signed_form("alipay.trade.query", {"out_trade_no": "T1"},
                         now=datetime.now(timezone.utc) - timedelta(hours=8))  # a device set to UTC, read as +8
    body = httpx.post(sim.url + "/gateway.do", data=form).text
    assert json.loads(body)["alipay_trade_query_response"]["sub_code"] == "isv.invalid-timestamp"
    assert "sign" in json.loads(body)


@pytest.mark.parametrize("damage", ["no_sign", "other_biz", "sign_type_RSA"])
def test_fail__the_simulator_refuses_requests_that_do_not_verify(sim, connect, damage):
    form = connect(sim).signed_form("alipay.trade.query", {"out_trade_no": "T1"})
    if damage == "no_sign":
        del form["sign"]
    elif damage == "other_biz":
        form["biz_content"] = '{"out_trade_no":"T2"}'
    else:
        form["sign_type"] = "RSA"
    answer = json.loads(httpx.post(sim.url + "/gateway.do", data=form).text)["alipay_trade_query_response"]
    assert answer["code"] in ("40001", "40002") and sim.ledger.calls == {}


# --- transport -------------------------------------------------------------------------------------------


def test_a_slow_answer_is_unknown_within_the_stated_limit_and_charged_once(sim, connect, tmp_path):
    table = options(sim, connect_timeout_s=0.5, read_timeout_s=0.5)
    limit = config(tmp_path, table).providers[NAME].options.call_limit_s
    p = connect(table)
    started = time.monotonic()
    out = p.pay(pay_request("L2", "97"))  # the simulator answers after 3 s
    took = time.monotonic() - started
    assert out.status is Status.UNKNOWN and "no answer" in out.reason
    assert limit == 1.5 and took < limit + 0.3, took
    assert p.query("L2").status is Status.PAID and sim.ledger.charges("L2") == 1


def test_unreachable_means_nothing_was_sent(sim, connect):
    p = connect(sim)
    sim.stop()
    with pytest.raises(ProviderUnavailable):
        p.pay(pay_request("U2"))
    with pytest.raises(ProviderUnavailable):
        p.query("U2")
    sim.start()
    assert p.query("U2").status is Status.DECLINED and sim.ledger.calls == {"query": 1}


@pytest.mark.parametrize("status", [500, 502, 404])
def test_http_errors_are_unknown(tmp_path, connect, status):
    class Broken(AlipaySimulator):
        def handle(self, req):
            return Answer(status, b'{"error":"busy"}')

    with Broken(tmp_path / "keys") as gw:
        out = connect(gw).pay(pay_request("H2"))
        assert out.status is Status.UNKNOWN and f"HTTP {status}" in out.reason


@pytest.mark.parametrize("depth", [500, 5000])
def test_an_answer_nested_too_deeply_is_unknown(tmp_path, connect, depth):
    """json (5000) or masking the code in the fields (500) would recurse past Python's limit: the
    RecursionError must not leave the adapter, whose request may have been taken."""
    class Deep(AlipaySimulator):
        def handle(self, req):
            nested = "[" * depth + "]" * depth
            return Answer(200, f'{{"alipay_trade_pay_response":{{"code":"10000","x":{nested}}},"sign":"a"}}'.encode())

    with Deep(tmp_path / "keys") as gw:
        out = connect(gw).pay(pay_request("D2"))
        assert out.status is Status.UNKNOWN and "nested too deeply" in out.reason


def test_calls_from_two_threads_at_once(sim, connect):
    p = connect(sim)
    outs: dict[str, Status] = {}

    def pay(i):
        outs[f"T{i}"] = p.pay(pay_request(f"T{i}", n=i)).status

    threads = [threading.Thread(target=pay, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert outs == {f"T{i}": Status.PAID for i in range(8)}
    assert sum(sim.ledger.charges(f"T{i}") for i in range(8)) == 8


def test_the_auth_code_is_in_no_log_repr_or_exception(sim, connect, caplog):
    caplog.set_level(logging.DEBUG)
    p = connect(sim)
    seen, codes = [], []
    for i, tail in enumerate(("00", "90", "91", "82", "80", "92", "94", "96", "97")):
        req = pay_request(f"X{i}", tail, n=i)
        codes.append(req.auth_code)
        seen += [repr(req), repr(p.pay(req)), repr(p.query(req.out_trade_no))]
    text = "\n".join(seen + [r.getMessage() for r in caplog.records])
    assert len(codes) == 9 and not [c for c in codes if c in text]


# --- options and key files --------------------------------------------------------------------------------


def test_defaults_are_alipays_gateway_and_official_timings(sim, tmp_path):
    table = {k: v for k, v in sim.provider_options().items() if k != "base_url"}
    opts = config(tmp_path, table).providers[NAME].options
    assert opts.base_url == GATEWAY == "https://openapi.alipay.com/gateway.do" and opts.backup_base_urls == ()
    assert (opts.first_query_after_s, opts.query_every_s, opts.reverse_after_s, opts.retry_every_s) == (5, 5, 30, 5)


def _ec_key(path: Path) -> None:
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)


def _small_key(path: Path) -> None:
    path.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)


def _key_file_cases(sim, d: Path) -> list[tuple[str, dict, str, str]]:
    """(case, options changed, the key blamed, what the message says)."""
    open_key = d / "open.txt"
    open_key.write_bytes(sim.app_private_key_file.read_bytes())
    open_key.chmod(0o644)
    garbage = d / "garbage.txt"
    garbage.write_text("paste the key here\n")
    garbage.chmod(0o600)
    _ec_key(d / "ec.pem")
    _small_key(d / "small.pem")
    ec_public = d / "ec_public.pem"
    ec_public.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    pk, ak = "app_private_key_file", "alipay_public_key_file"
    return [
        ("private missing", {pk: str(d / "nope.txt")}, pk, "does not exist"),
        ("private mode 0644", {pk: str(open_key)}, pk, "open to others (mode 0644)"),
        ("private not a key", {pk: str(garbage)}, pk, "is not an unencrypted RSA private key"),
        ("private EC key", {pk: str(d / "ec.pem")}, pk, "not an RSA key"),
        ("private 1024 bits", {pk: str(d / "small.pem")}, pk, "at least 2048 bits"),
        ("public missing", {ak: str(d / "nope.txt")}, ak, "No such file"),
        ("public not a key", {ak: str(garbage)}, ak, "is not an RSA public key"),
        ("public is the private key", {ak: str(sim.app_private_key_file)}, ak, "is not an RSA public key"),
        ("public EC key", {ak: str(ec_public)}, ak, "not an RSA key"),
        ("app_id is the PID", {"app_id": "2088102146225135"}, "app_id", "merchant's PID"),
        ("app_id too short", {"app_id": "902100015860"}, "app_id", "16 digits"),
        ("plain http elsewhere", {"base_url": "http://openapi.alipay.com/gateway.do"}, "base_url",
         "plain http:// is refused"),
    ]


def test_fail__key_file_and_option_problems_name_their_key(sim, tmp_path):
    for case, change, key, says in _key_file_cases(sim, tmp_path):
        with pytest.raises(ConfigError) as e:
            config(tmp_path, sim.provider_options() | change)
        assert e.value.key == f"providers.{NAME}.{key}", case
        assert says in e.value.reason, (case, e.value.reason)
        assert "-----" not in str(e.value) and "MII" not in str(e.value), case  # no key text in errors


@pytest.mark.integration
def test_fail__check_config_exits_2_naming_the_key_file(sim, tmp_path):
    cases = _key_file_cases(sim, tmp_path)
    for case, change, key, says in (cases[1], cases[6]):
        doc = lane_dict(tmp_path / "state")
        doc["providers"][NAME] = sim.provider_options() | change
        path = write_config(tmp_path / "lane.toml", doc)
        r = subprocess.run(appliance_cmd() + ["check-config", "--config", str(path)], capture_output=True, text=True,
                           env=subprocess_env(), timeout=60)
        assert r.returncode == 2, (case, r.stderr)
        assert f"providers.{NAME}.{key}: " in r.stderr and says in r.stderr and "Traceback" not in r.stderr, case


@pytest.mark.parametrize("form", ["bare base64 + newline", "bare base64, no newline", "bare base64 in 64 columns",
                                  "PEM", "PEM with CRLF"])
def test_ok__the_key_tools_formats_with_or_without_a_final_newline(sim, connect, tmp_path, form):
    bare = sim.app_private_key_file.read_text().strip()
    pem = sim.app_private_key_pem.read_text()
    text = {"bare base64 + newline": bare + "\n", "bare base64, no newline": bare,
            "bare base64 in 64 columns": "\n".join(bare[i:i + 64] for i in range(0, len(bare), 64)) + "\n",
            "PEM": pem, "PEM with CRLF": pem.replace("\n", "\r\n")}[form]
    key = tmp_path / "app_key"
    key.write_text(text)
    key.chmod(0o600)
    public = tmp_path / "alipay_public"
    public.write_text(sim.alipay_public_key_file.read_text().strip())  # as pasted from the console, no newline
    p = connect(sim, app_private_key_file=str(key), alipay_public_key_file=str(public))
    assert p.pay(pay_request("K2")).status is Status.PAID


def test_example_config_is_a_valid_alipay_lane(sim, tmp_path):
    text = (ROOT / "examples" / "alipay.toml").read_text()
    paths = {"/etc/appliance/keys/alipay/app_private_key.txt": sim.app_private_key_file,
             "/etc/appliance/keys/alipay/alipay_public_key.txt": sim.alipay_public_key_file}
    for placeholder, real in paths.items():
        assert f'"{placeholder}"' in text
        text = text.replace(placeholder, str(real))
    path = tmp_path / "alipay.toml"
    path.write_text(text)
    cfg = load(path)
    provider = cfg.providers["alipay"]
    assert provider.kind == "alipay" and cfg.routing == {"alipay": "alipay"}
    assert provider.options.base_url == GATEWAY and provider.options.app_id == "2021000000000000"
    shown = tomllib.loads(text)["providers"]["alipay"].keys()
    assert {"kind", *AlipayOptions.__dataclass_fields__} - shown == {"ca_file"}  # every option but one, commented


@pytest.mark.integration
def test_appliance_simulate_alipay_prints_a_table_that_works(tmp_path, connect):
    proc = subprocess.Popen(appliance_cmd() + ["simulate", "alipay", "--port", "0", "--keys", str(tmp_path / "k")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        lines = [proc.stdout.readline() for _ in range(7)]
        table = tomllib.loads("".join(lines[1:]))["providers"]["alipay"]
        assert table["kind"] == "alipay" and table["base_url"].startswith("http://127.0.0.1:")
        assert os.stat(table["app_private_key_file"]).st_mode & 0o077 == 0
        assert connect(table).pay(pay_request("J2")).status is Status.PAID
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert proc.returncode == 0


# --- the daily bill: the real adapter against the simulator, on a ledger whose clock is in the past -------------

BILL_DAY = date(2026, 3, 10)


class FakeClock:
    """The ledger's clock: settable, placed in the past (the gateway's own timestamp check stays real)."""

    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def day_sim(tmp_path):
    """A simulator whose ledger's clock stands at 10:00 Beijing of BILL_DAY."""
    s = AlipaySimulator(tmp_path / "keys", Ledger(clock=FakeClock(day_start(BILL_DAY) + 10 * 3600))).start()
    yield s
    s.stop()


def next_morning(sim, hour: float = 10) -> None:
    sim.ledger.clock.t = day_start(BILL_DAY) + 86_400 + hour * 3600


def test_bill_lists_the_days_payments_refunds_and_cancels_and_its_fees_add_up(day_sim, connect):
    p = connect(day_sim)
    assert p.has_bill
    paid = {n: p.pay(pay_request(n, amount_fen=fen, n=i)) for i, (n, fen) in enumerate(
        [("B1", 1234), ("B2", 50_00), ("B4", 8_00)])}
    assert {o.status for o in paid.values()} == {Status.PAID}
    assert p.pay(pay_request("B3", "90", n=3)).status is Status.DECLINED  # no money moved: not in the bill
    day_sim.ledger.clock.t += 60
    assert p.reverse("B4").status is Status.REVERSED  # a cancel of a paid trade gave the money back
    assert p.refund("B2", 10_00, 50_00, "B2-R1").status is Status.REFUNDED
    next_morning(day_sim, 8)
    assert p.refund("B1", 1_00, 1234, "B1-R1").status is Status.REFUNDED  # completes the next day: not this bill
    next_morning(day_sim)
    bill = p.bill(BILL_DAY)
    assert (bill.state, bill.platform, bill.day) == (BillState.FETCHED, NAME, BILL_DAY)
    ids = {n: o.platform_txn_id for n, o in paid.items()}
    assert [(x.out_trade_no, x.platform_txn_id, x.kind, x.amount_fen, x.state, x.out_refund_no) for x in bill.lines] == [
        ("B1", ids["B1"], LineKind.PAYMENT, 1234, "交易", ""), ("B2", ids["B2"], LineKind.PAYMENT, 50_00, "交易", ""),
        ("B4", ids["B4"], LineKind.PAYMENT, 8_00, "交易", ""), ("B4", ids["B4"], LineKind.REFUND, 8_00, "退款", ""),
        ("B2", ids["B2"], LineKind.REFUND, 10_00, "退款", "B2-R1")]
    fee = day_sim.ledger.fee_fen
    assert [x.fee_fen for x in bill.lines] == [fee(1234), fee(50_00), fee(8_00), -fee(8_00), -fee(10_00)]
    assert bill.totals == BillTotals(payments=3, returns=2, net_fen=1234 + 50_00 - 10_00,
                                     fee_fen=sum(x.fee_fen for x in bill.lines))
    assert all(x.at.startswith("2026-03-10 ") for x in bill.lines)
    method, form = day_sim.requests[-1]
    assert (method, json.loads(form["biz_content"])) == (BILL_METHOD, {"bill_type": "trade", "bill_date": "2026-03-10"})


def test_bill_not_ready_or_an_empty_day_is_not_yet(day_sim, connect):
    p = connect(day_sim)
    assert p.pay(pay_request("N1")).status is Status.PAID
    next_morning(day_sim, 8)  # generated by 09:00
    early = p.bill(BILL_DAY)
    assert early.state is BillState.NOT_YET and "isp.bill_not_exist" in early.detail and early.lines == ()
    next_morning(day_sim)
    assert p.bill(BILL_DAY - timedelta(days=1)).state is BillState.NOT_YET  # Alipay does not say "empty"
    assert p.bill(BILL_DAY).state is BillState.FETCHED


def test_fail__a_bill_of_today_is_refused_by_alipay(day_sim, connect):
    with pytest.raises(BillError, match=r"bill of 2026-03-10: Alipay refused: 40004 isv.invalid_arguments"):
        connect(day_sim).bill(BILL_DAY)


@pytest.mark.parametrize("fault, error, words", [
    ("summary", BillError, "the bill's summary disagrees with its lines: payments 2 stated, 1 in the lines"),
    ("utf8", BillError, "not GBK"),
    ("not_zip", BillUnavailable, "bytes that are not a zip: the link expired"),
    ("expired", BillUnavailable, "bytes that are not a zip: the link expired"),
    ("http_elsewhere", BillError, "bill_download_url not fetched: http://192.0.2.1"),
    ("unreachable", BillUnavailable, "no answer from Alipay"),
])
def test_fail__bill_faults(day_sim, connect, fault, error, words):
    p = connect(day_sim)
    assert p.pay(pay_request("F1")).status is Status.PAID
    next_morning(day_sim)
    if fault == "expired":
        day_sim.bill_link_valid_s = 0.0
    elif fault == "http_elsewhere":
        day_sim.bill_link_base = "http://192.0.2.1:9"
    elif fault == "unreachable":
        day_sim.stop()
    else:
        day_sim.bill_fault = fault
    with pytest.raises(error) as e:
        p.bill(BILL_DAY)
    assert words in str(e.value) and str(e.value).startswith(f"platform {NAME}: bill of 2026-03-10: ")
    assert "token=" not in str(e.value)


def test_a_download_link_works_once(day_sim, connect):
    p = connect(day_sim)
    assert p.pay(pay_request("O1")).status is Status.PAID
    next_morning(day_sim)
    form = p.signed_form(BILL_METHOD, {"bill_type": "trade", "bill_date": BILL_DAY.isoformat()})
    answer = httpx.post(day_sim.url + "/gateway.do", data=form).json()
    url = answer["alipay_data_dataservice_bill_downloadurl_query_response"]["bill_download_url"]
    assert "bizType=trade" in url and "fileType=csv.zip" in url and "bizDates=20260310" in url
    first, second = httpx.get(url), httpx.get(url)
    assert first.content.startswith(b"PK\x03\x04")
    assert "下载超时，请重新下载" in second.content.decode("utf-8")


def test_fail__an_unsigned_bill_answer_is_not_trusted(tmp_path, connect, caplog):
    with MisbehavingGateway(tmp_path / "keys", Ledger(clock=FakeClock(day_start(BILL_DAY) + 86_400 * 2))) as gw:
        gw.mode = "unsigned"
        with pytest.raises(BillError, match="answer not trusted"):
            connect(gw).bill(BILL_DAY)
    assert any("the bill answer for 2026-03-10 does not verify" in line for line in security_lines(caplog))

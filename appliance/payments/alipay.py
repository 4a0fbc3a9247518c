"""`kind = "alipay"`: Alipay open platform, face-to-face payment (当面付) with the customer's
payment code (`scene = bar_code`), signed with RSA2. A thin client on `Gateway`; no Alipay SDK.

The five calls, each a POST of a UTF-8 form to the one gateway address (`base_url`, the full
`.../gateway.do`), the API named by the `method` parameter:

    pay           alipay.trade.pay                   biz_content: out_trade_no, scene, auth_code,
                                                     subject, total_amount (yuan, two decimals),
                                                     store_id, terminal_id
    query         alipay.trade.query                 out_trade_no, query_options [fund_bill_list]
    reverse       alipay.trade.cancel                out_trade_no
    refund        alipay.trade.refund                out_trade_no, refund_amount, out_request_no
    query_refund  alipay.trade.fastpay.refund.query  out_trade_no, out_request_no

Request: the public parameters app_id, method, format=JSON, charset=utf-8, sign_type=RSA2,
timestamp (Beijing time, whatever the device's time zone), version=1.0 and biz_content (JSON);
`sign` is SHA256withRSA by the app private key over `signing_string` of all of them
(`sign_type` included).

Answer: `{"<method, dots as _>_response": {...}, "sign": "..."}`, or `error_response` for some
gateway errors. The signature covers the exact text of the response object as it stands in the
body (`response_text`), never a re-serialization of it. Nothing in an answer is read before it
verifies against the Alipay public key; an answer that does not (or carries no signature) is
UNKNOWN and one SECURITY log line (`UntrustedAnswers`). A verified answer that names another
out_trade_no or refund number than the one asked about is treated the same way (a replay).

Codes (`outcome_of`): 10000 success; 10003 the customer is confirming (unknown); 20000 service
unavailable (unknown); 40004 a business answer whose `sub_code` says what happened
(ACQ.SYSTEM_ERROR unknown, definite declines per call below); 40001/40002/40006/20001 the
gateway refused our request itself (bad signature, app id, permission, clock), so nothing was
taken: `ProviderMisconfigured`. `Outcome.code` is the sub_code of an error, else the trade or
refund status the answer reports (TRADE_SUCCESS, REFUND_SUCCESS), else the gateway code.

Sub-codes not listed below answer UNKNOWN: a query, a cancel, or a refund repeated with the same
out_request_no then decides, which costs time but never money.

The auth_code is sent only in the pay form; it is scrubbed from every text an answer could echo
(Alipay's invalid-signature answer quotes the whole string it checked).

The daily bill (`bill(day)`, head office only): alipay.data.dataservice.bill.downloadurl.query,
biz_content {bill_type: trade, bill_date: yyyy-MM-dd}, signed and verified like the five calls;
then one unsigned GET of the `bill_download_url` it answers (https, or http to loopback only;
valid 30 s), a zip that appliance/payments/alipay_bill.py parses. Answers: 10000 -> the bill;
40004 isp.bill_not_exist -> NOT_YET (Alipay does not tell a bill not generated yet from a day
without trades: which one it was is head office's scheduler's call, not this adapter's); 20000,
HTTP 5xx, no answer, or a download that is not a zip (the link expired) -> BillUnavailable;
anything else (isv.invalid_arguments for a day not over, our keys or permission) -> BillError.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from appliance.errors import ConfigError, NoAnswer, ProviderMisconfigured, ProviderUnavailable
from appliance.money import format_amount
from appliance.payments import Outcome, PayRequest, Provider, Status, providers
from appliance.payments.bills import MAX_BILL_BYTES, Bill, BillError, BillState, BillUnavailable
from appliance.payments.alipay_bill import DOWNLOAD_S, bill_link, is_zip, parse_bill
from appliance.payments.http import Gateway, HttpOptions, UntrustedAnswers, gateway_url
from appliance.payments.keys import (load_private_key, load_public_key, private_key_file, public_key_file,
                                     rsa_sign, rsa_verify)
from appliance.redact import mask
from appliance.schema import QUERY_EVERY, RETRY_EVERY, REVERSE_AFTER, SecretFile, opt

log = logging.getLogger(__name__)

GATEWAY = "https://openapi.alipay.com/gateway.do"
SANDBOX_GATEWAY = "https://openapi-sandbox.dl.alipaydev.com/gateway.do"

#: Alipay reads `timestamp` as Beijing time. China keeps no daylight saving time, so a fixed
#: UTC+8 is exact and needs no tz database on the device.
BEIJING = timezone(timedelta(hours=8), "Asia/Shanghai")
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"

FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded;charset=utf-8"}


def app_id_check(value: str) -> str:
    """Schema check: an Alipay APPID, 16 digits (production 20..., sandbox 90...)."""
    if value.startswith("2088"):
        raise ValueError(f"{value!r} looks like the merchant's PID (partner id, 2088...), not the app's APPID: "
                         "copy the APPID of the app from open.alipay.com")
    if not re.fullmatch(r"[0-9]{16}", value):
        raise ValueError(f"must be the app's APPID, 16 digits, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class AlipayOptions(HttpOptions):
    """`[providers.NAME]` of kind "alipay". The timings are the official face-to-face SDK's: query
    every 5 s, cancel after 5 queries (30 s); the SDK's 2 s between cancels is for a loop the
    cashier waits on, the resolver retries every 5 s."""

    base_url: str = opt(GATEWAY, check=gateway_url,
                        doc=f"the full gateway address; the sandbox's is {SANDBOX_GATEWAY}")
    # first_query_after_s: HttpOptions' 5 s is the SDK's
    query_every_s: float = opt(5.0, check=QUERY_EVERY)
    reverse_after_s: float = opt(30.0, check=REVERSE_AFTER,
                                 doc="give up querying and cancel, counted from the pay call")
    retry_every_s: float = opt(5.0, check=RETRY_EVERY, doc="between cancel/refund retries")
    app_id: str = opt(check=app_id_check, doc="the app's APPID (open.alipay.com, the app's overview)")
    app_private_key_file: SecretFile = opt(check=private_key_file,
                                           doc="the app private key (Alipay's key tool), mode 0600")
    alipay_public_key_file: Path = opt(check=public_key_file,
                                       doc="the Alipay public key (open.alipay.com, the app's key settings)")
    bill_link_over_http: bool = opt(False, doc="head office's bill: fetch an http:// link on Alipay's own domain "
                                               "as given (Alipay documents http://dwbillcenter.alipay.com links; "
                                               "the zip is unsigned, so over http it is unprotected); false: "
                                               "fetch it over https")


# --- the wire format: pure functions, tested with published vectors ------------------------------------


def signing_string(params: dict[str, str]) -> str:
    """The text Alipay's RSA2 signature covers: every parameter except `sign` whose value is not
    empty, sorted by name, as `name=value` joined by `&`; values as they are (not URL-encoded).
    `sign_type` is included."""
    return "&".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "sign" and v != "")


def response_key(method: str) -> str:
    """The member of the answer that holds a method's response: alipay.trade.pay -> alipay_trade_pay_response."""
    return method.replace(".", "_") + "_response"


_decoder = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


def members(text: str) -> dict[str, tuple[Any, str]]:
    """The members of a JSON object text: name -> (value, the value's exact text in `text`).
    Raises ValueError when the text is not one JSON object, or names a member twice (which
    member a signature covers would then be ambiguous)."""
    found: dict[str, tuple[Any, str]] = {}
    i = _skip(text, 0)
    if text[i:i + 1] != "{":
        raise ValueError("not a JSON object")
    i = _skip(text, i + 1)
    if text[i:i + 1] == "}":
        return _ended(text, i + 1, found)
    while True:
        if text[i:i + 1] != '"':
            raise ValueError(f"a member name was expected at offset {i}")
        name, i = _decoder.raw_decode(text, i)
        i = _skip(text, i)
        if text[i:i + 1] != ":":
            raise ValueError(f"':' was expected at offset {i}")
        start = _skip(text, i + 1)
        value, end = _decoder.raw_decode(text, start)
        if name in found:
            raise ValueError("a member appears twice")
        found[name] = (value, text[start:end])
        i = _skip(text, end)
        if text[i:i + 1] == "}":
            return _ended(text, i + 1, found)
        if text[i:i + 1] != ",":
            raise ValueError(f"',' or '}}' was expected at offset {i}")
        i = _skip(text, i + 1)


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _ended(text: str, i: int, found: dict) -> dict:
    if _skip(text, i) != len(text):
        raise ValueError("text after the JSON object")
    return found


@dataclass(frozen=True)
class SignedAnswer:
    """An answer taken apart, not yet verified: the response object, its exact text, the signature."""

    key: str  # "<method>_response" or "error_response"
    fields: dict
    text: str  # exactly as in the body: what the signature covers
    sign: str | None


def response_text(body: str, method: str) -> SignedAnswer:
    """Take an answer apart. Raises ValueError when it is not an Alipay answer (not JSON, neither
    the method's response nor error_response, a response that is not an object)."""
    try:
        found = members(body)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"not JSON: {e}") from None
    for key in (response_key(method), "error_response"):
        if key in found:
            fields, text = found[key]
            if not isinstance(fields, dict):
                raise ValueError(f"{key} is not an object")
            sign = found.get("sign", (None, ""))[0]
            return SignedAnswer(key, fields, text, sign if isinstance(sign, str) and sign else None)
    raise ValueError(f"neither {response_key(method)} nor error_response in the answer")


# --- what a verified answer means, call by call ---------------------------------------------------------

#: Gateway codes that mean the gateway refused the request itself: nothing was taken.
CONFIG_CODES = {"40001": "a required argument is missing", "40002": "an argument is invalid",
                "40006": "the app has no permission for this API", "20001": "authorization is insufficient"}
#: Business sub-codes that mean our account or request is wrong, not the customer's payment.
CONFIG_SUB_CODES = {"ACQ.ACCESS_FORBIDDEN", "ACQ.PARTNER_ERROR", "ACQ.INVALID_PARAMETER"}

#: alipay.trade.pay sub-codes that decline for good: nothing was taken, a new attempt needs a new code.
PAY_DECLINES = {
    "ACQ.PAYMENT_AUTH_CODE_INVALID",  # invalid, expired or used code: the customer refreshes it
    "ACQ.BUYER_BALANCE_NOT_ENOUGH", "ACQ.BUYER_BANKCARD_BALANCE_NOT_ENOUGH", "ACQ.ERROR_BALANCE_PAYMENT_DISABLE",
    "ACQ.PAYMENT_FAIL", "ACQ.PAYMENT_REQUEST_HAS_RISK", "ACQ.TOTAL_FEE_EXCEED", "ACQ.BUYER_SELLER_EQUAL",
    "ACQ.TRADE_HAS_CLOSE", "ACQ.INVALID_STORE_ID", "ACQ.EXIST_FORBIDDEN_WORD", "ACQ.BUYER_ENABLE_STATUS_FORBID",
    "ACQ.BUYER_PAYMENT_AMOUNT_DAY_LIMIT_ERROR", "ACQ.BUYER_PAYMENT_AMOUNT_MONTH_LIMIT_ERROR",
    "ACQ.BEYOND_PAY_RESTRICTION", "ACQ.BEYOND_PER_RECEIPT_RESTRICTION", "ACQ.MOBILE_PAYMENT_SWITCH_OFF",
    "ACQ.PULL_MOBILE_CASHIER_FAIL", "ACQ.ERROR_BUYER_CERTIFY_LEVEL_LIMIT", "ACQ.NO_PAYMENT_INSTRUMENTS_AVAILABLE",
    "ACQ.SELLER_BEEN_BLOCKED",
}
#: alipay.trade.cancel sub-codes that refuse for good: outside the cancel window (refund instead),
#: a finished trade, or no such trade.
CANCEL_REFUSALS = {"ACQ.TRADE_CANCEL_TIME_OUT", "ACQ.CANCEL_NOT_ALLOWED", "ACQ.TRADE_HAS_FINISHED",
                   "ACQ.TRADE_NOT_EXIST"}
#: alipay.trade.refund sub-codes that refuse for good.
REFUND_REFUSALS = {"ACQ.TRADE_NOT_EXIST", "ACQ.TRADE_STATUS_ERROR", "ACQ.TRADE_HAS_FINISHED",
                   "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "ACQ.SELLER_BALANCE_NOT_ENOUGH", "ACQ.REASON_TRADE_BEEN_FREEZEN",
                   "ACQ.DISCORDANT_REPEAT_REQUEST", "ACQ.REASON_TRADE_REFUND_FEE_ERR", "ACQ.TRADE_NOT_ALLOW_REFUND"}

PAID_STATES = {"TRADE_SUCCESS", "TRADE_FINISHED"}


def code_of(a: dict) -> str:
    """`Outcome.code`: the sub_code when there is one, else the gateway code."""
    return _text(a.get("sub_code")) or _text(a.get("code"))


def says(a: dict) -> str:
    """The answer's own words for people: `40004 ACQ.X: sub_msg` (at most 160 characters)."""
    words = " ".join(w for w in (_text(a.get("code")), _text(a.get("sub_code"))) if w)
    msg = _text(a.get("sub_msg")) or _text(a.get("msg"))
    line = f"{words}: {msg}" if msg else words
    return line if len(line) <= 160 else line[:159] + "…"


def _text(v: Any) -> str:
    """A field as printable text ("" when it is not a string), for codes and reasons."""
    return "".join(c if c.isprintable() else "?" for c in v).strip() if isinstance(v, str) else ""


def funding_source(a: dict) -> str | None:
    """fund_bill_list's fund_channel values joined with "+" ("ALIPAYACCOUNT+COUPON"), or None."""
    bills = a.get("fund_bill_list")
    channels = [_text(b.get("fund_channel")) for b in bills if isinstance(b, dict)] if isinstance(bills, list) else []
    return "+".join(c for c in channels if c) or None


def outcome_of(call: str, a: dict) -> Outcome:
    """What a verified response object means for `call` (pay, query, reverse, refund, query_refund).
    Raises ProviderMisconfigured when the gateway refused the request itself (nothing was taken)."""
    code, sub = _text(a.get("code")), _text(a.get("sub_code"))
    if code in CONFIG_CODES or sub in CONFIG_SUB_CODES:
        raise ProviderMisconfigured(f"Alipay refused the request: {says(a)} ({CONFIG_CODES.get(code, 'our account')}"
                                    f"; check app_id, the app's keys and the clock)")
    if call == "reverse" and a.get("retry_flag") == "Y":  # obeyed whatever the code says
        return Outcome(Status.UNKNOWN, f"cancel to be repeated (retry_flag=Y): {says(a)}", code=code_of(a))
    if code == "10000":
        return _SUCCESS[call](a)
    if code == "40004" and sub in _REFUSALS[call]:
        return Outcome(Status.DECLINED, says(a), _trade_no(a), code=sub)
    return Outcome(Status.UNKNOWN, says(a) or "an answer without a code", code=code_of(a))


def _trade_no(a: dict) -> str | None:
    return _text(a.get("trade_no")) or None


def _paid(a: dict) -> Outcome:
    return Outcome(Status.PAID, f"{_text(a.get('trade_status')) or says(a)}: paid", _trade_no(a),
                   code=_text(a.get("trade_status")) or code_of(a), funding_source=funding_source(a))


def _query_success(a: dict) -> Outcome:
    state = _text(a.get("trade_status"))
    if state in PAID_STATES:
        return _paid(a)
    if state == "TRADE_CLOSED" and a.get("send_pay_date"):  # it was paid, then refunded in full
        return Outcome(Status.REFUNDED, "TRADE_CLOSED: paid, then refunded in full", _trade_no(a), code=state)
    if state == "TRADE_CLOSED":
        return Outcome(Status.DECLINED, "TRADE_CLOSED: closed unpaid (cancelled, failed or timed out)",
                       _trade_no(a), code=state)
    return Outcome(Status.UNKNOWN, f"{state or 'no trade_status'}: not paid yet", _trade_no(a), code=state or "10000")


def _cancel_success(a: dict) -> Outcome:
    action = _text(a.get("action")) or "none"
    meaning = {"close": "unpaid trade closed", "refund": "paid trade refunded to the customer"}.get(action, "done")
    return Outcome(Status.REVERSED, f"cancelled (action {action}): {meaning}", _trade_no(a), code=code_of(a))


def _refund_success(a: dict) -> Outcome:
    if a.get("fund_change") == "Y":
        return Outcome(Status.REFUNDED, "refunded (fund_change=Y)", _trade_no(a), code=code_of(a))
    return Outcome(Status.UNKNOWN, "refund accepted without a change of funds (fund_change=N): the refund query "
                                   "confirms it", _trade_no(a), code=code_of(a))


def _refund_query_success(a: dict) -> Outcome:
    status = _text(a.get("refund_status"))
    if status == "REFUND_SUCCESS":
        return Outcome(Status.REFUNDED, "REFUND_SUCCESS: refunded", _trade_no(a), code=status)
    if status or a.get("out_request_no"):  # Alipay has the refund, and does not say it succeeded
        return Outcome(Status.UNKNOWN, f"refund {status or 'recorded'}, not reported successful yet",
                       _trade_no(a), code=status or code_of(a))
    return Outcome(Status.DECLINED, "no such refund at Alipay (refund again with the same number)", _trade_no(a),
                   code=code_of(a))


_SUCCESS = {"pay": _paid, "query": _query_success, "reverse": _cancel_success, "refund": _refund_success,
            "query_refund": _refund_query_success}
_REFUSALS = {"pay": PAY_DECLINES, "query": {"ACQ.TRADE_NOT_EXIST"}, "reverse": CANCEL_REFUSALS,
             "refund": REFUND_REFUSALS, "query_refund": {"ACQ.TRADE_NOT_EXIST"}}

BILL_METHOD = "alipay.data.dataservice.bill.downloadurl.query"
_METHODS = {"pay": "alipay.trade.pay", "query": "alipay.trade.query", "reverse": "alipay.trade.cancel",
            "refund": "alipay.trade.refund", "query_refund": "alipay.trade.fastpay.refund.query"}


# --- the adapter ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ask:
    """One call's request: which call, its biz_content, and what the answer must be about."""

    call: str
    biz: dict
    out_trade_no: str
    out_request_no: str | None = None
    secret: str | None = None  # the auth_code: scrubbed from every text the answer could echo


@providers.register("alipay", AlipayOptions)
class AlipayProvider(Provider):
    """Alipay face-to-face payment (see the module docstring). Thread-safe: the gateway's client
    and the keys are shared, nothing per call is kept on the instance."""

    kind = "alipay"
    has_bill = True

    def __init__(self, name: str, options: AlipayOptions, state_dir: Path | None = None):
        super().__init__(name, options.policy())
        key = f"providers.{name}"
        self.options = options
        self.app_id = options.app_id
        self._app_key = _load(load_private_key, options.app_private_key_file, f"{key}.app_private_key_file")
        self._alipay_key = _load(load_public_key, options.alipay_public_key_file, f"{key}.alipay_public_key_file")
        self.untrusted = UntrustedAnswers(name)
        self._gateway = Gateway(options, key=key)

    def pay(self, req: PayRequest) -> Outcome:
        biz = {"out_trade_no": req.out_trade_no, "scene": "bar_code", "auth_code": req.auth_code,
               "subject": req.subject, "total_amount": format_amount(req.amount_fen),
               "store_id": req.store_id, "terminal_id": req.terminal_id}
        return self._ask(_Ask("pay", biz, req.out_trade_no, secret=req.auth_code))

    def query(self, out_trade_no: str) -> Outcome:
        biz = {"out_trade_no": out_trade_no, "query_options": ["fund_bill_list"]}
        return self._ask(_Ask("query", biz, out_trade_no))

    def reverse(self, out_trade_no: str) -> Outcome:
        return self._ask(_Ask("reverse", {"out_trade_no": out_trade_no}, out_trade_no))

    def refund(self, out_trade_no: str, amount_fen: int, total_fen: int, out_refund_no: str) -> Outcome:
        """Alipay's refund takes no order total (`total_fen` is not sent); `out_request_no` is the
        refund's number, so a repeat with the same number never refunds twice."""
        biz = {"out_trade_no": out_trade_no, "refund_amount": format_amount(amount_fen),
               "out_request_no": out_refund_no}
        return self._ask(_Ask("refund", biz, out_trade_no, out_refund_no))

    def query_refund(self, out_trade_no: str, out_refund_no: str) -> Outcome:
        biz = {"out_trade_no": out_trade_no, "out_request_no": out_refund_no}
        return self._ask(_Ask("query_refund", biz, out_trade_no, out_refund_no))

    def bill(self, day: dt.date) -> Bill:
        """The trade bill of Beijing `day` (contract: appliance/payments/bills.py; this platform's
        answers: the module docstring). At most two requests: the signed call, the download."""
        form = self.signed_form(BILL_METHOD, {"bill_type": "trade", "bill_date": day.isoformat()})
        try:
            reply = self._gateway.request("POST", body=urlencode(form).encode("ascii"), headers=FORM_HEADERS)
            body = reply.text()
        except (NoAnswer, ProviderUnavailable) as e:
            raise BillUnavailable(self.name, day, f"no answer from Alipay: {e}") from None
        except ProviderMisconfigured as e:
            raise BillError(self.name, day, str(e)) from None
        if reply.status != 200:
            raise (BillUnavailable if reply.status >= 500 else BillError)(self.name, day,
                                                                          f"HTTP {reply.status} from Alipay")
        try:
            answer = response_text(body, BILL_METHOD)
        except (ValueError, RecursionError) as e:
            raise BillError(self.name, day, f"answer not understood: {e}") from None
        doubt = self._unverified(answer, answer.fields)
        if doubt:
            log.error("SECURITY: platform %s: the bill answer for %s does not verify (%s); not trusted",
                      self.name, day.isoformat(), doubt)
            raise BillError(self.name, day, f"answer not trusted: signature does not verify ({doubt})")
        a = answer.fields
        code, sub = _text(a.get("code")), _text(a.get("sub_code"))
        if code == "10000":
            url = a.get("bill_download_url")
            if not isinstance(url, str) or not url:
                raise BillError(self.name, day, "a success without bill_download_url")
            return self._download_bill(day, url)
        if code == "40004" and sub == "isp.bill_not_exist":
            return Bill(self.name, day, BillState.NOT_YET,
                        detail=f"{says(a)}: not generated yet, or no trade that day (Alipay does not say which)")
        if code == "20000":
            raise BillUnavailable(self.name, day, f"Alipay: {says(a)}")
        hint = {"isv.invalid_arguments": " (a day not over yet in Beijing, or older than Alipay keeps)"}.get(sub, "")
        if code in CONFIG_CODES:
            hint = f" ({CONFIG_CODES[code]}; check app_id, the app's keys and its permission for the bill API)"
        raise BillError(self.name, day, f"Alipay refused: {says(a)}{hint}")

    def _download_bill(self, day: dt.date, url: str) -> Bill:
        """GET the link at once (no signature: the zip is not signed) and parse what it gives. An
        http:// link on Alipay's own domain is fetched over https unless `bill_link_over_http`."""
        url, why = bill_link(url, self.options.bill_link_over_http)
        if why:
            raise BillError(self.name, day, f"bill_download_url not fetched: {why}")
        try:
            reply = self._gateway.request("GET", url, max_bytes=MAX_BILL_BYTES, answer_s=DOWNLOAD_S)
        except (NoAnswer, ProviderUnavailable) as e:
            raise BillUnavailable(self.name, day, f"the download failed: {e}") from None
        except ProviderMisconfigured as e:
            raise BillError(self.name, day, f"the download failed: {e}") from None
        if reply.status != 200 or not is_zip(reply.body):
            got = f"HTTP {reply.status}" if reply.status != 200 else f"{len(reply.body)} bytes that are not a zip"
            raise BillUnavailable(self.name, day, f"the download link answered {got}: the link expired (it works "
                                                  f"once, for 30 s): ask again")
        return parse_bill(self.name, day, reply.body)

    def close(self) -> None:
        self._gateway.close()

    # --- one call -------------------------------------------------------------------------------------

    def signed_form(self, method: str, biz: dict, now: datetime | None = None) -> dict[str, str]:
        """The request's form: the public parameters, biz_content and `sign`."""
        form = {"app_id": self.app_id, "method": method, "format": "JSON", "charset": "utf-8",
                "sign_type": "RSA2", "timestamp": beijing_time(now), "version": "1.0",
                "biz_content": json.dumps(biz, ensure_ascii=False, separators=(",", ":"))}
        form["sign"] = rsa_sign(self._app_key, signing_string(form).encode("utf-8"))
        return form

    def _ask(self, ask: _Ask) -> Outcome:
        """Send, verify, interpret. UNKNOWN for no answer, an HTTP error, an answer that is not
        Alipay's or does not verify; ProviderUnavailable (nothing sent) and ProviderMisconfigured
        (the gateway refused the request itself) propagate, with the auth_code scrubbed."""
        method = _METHODS[ask.call]
        form = self.signed_form(method, ask.biz)
        try:
            reply = self._gateway.request("POST", body=urlencode(form).encode("ascii"), headers=FORM_HEADERS)
            body = reply.text()
        except NoAnswer as e:
            return Outcome(Status.UNKNOWN, f"no answer from Alipay: {e}")
        except ProviderMisconfigured as e:
            raise ProviderMisconfigured(_scrub(str(e), ask.secret)) from None
        if reply.status != 200:
            return Outcome(Status.UNKNOWN, f"HTTP {reply.status} from Alipay: the outcome is unknown")
        try:
            answer = response_text(body, method)
            fields = _scrub(answer.fields, ask.secret)  # before any of it is cut short into a reason
        except ValueError as e:
            return Outcome(Status.UNKNOWN, f"answer not understood: {_scrub(str(e), ask.secret)}")
        except RecursionError:  # nested too deeply for json or for _scrub: not an Alipay answer
            return Outcome(Status.UNKNOWN, "answer not understood: nested too deeply")
        doubt = self._doubt(answer, fields, ask)
        if doubt:
            return self.untrusted.outcome(ask.call, ask.out_trade_no, doubt)
        return outcome_of(ask.call, fields)

    def _doubt(self, answer: SignedAnswer, fields: dict, ask: _Ask) -> str:
        """Why the answer cannot be trusted, or "" when it verifies and is about this request.
        `fields`: the answer's, with the auth_code scrubbed (for the words of the verdict)."""
        unverified = self._unverified(answer, fields)
        if unverified:
            return unverified
        for name, ours in (("out_trade_no", ask.out_trade_no), ("out_request_no", ask.out_request_no)):
            theirs = fields.get(name)
            if ours is not None and theirs is not None and theirs != ours:
                return f"signed, but about {name} {_text(str(theirs))[:64]!r}, not {ours!r} (a replayed answer?)"
        success = _text(fields.get("code")) == "10000"
        if success and fields.get("out_trade_no") is None and ask.call != "query_refund":
            return "signed success that names no out_trade_no"
        amount = ask.biz.get("total_amount")
        if success and ask.call == "pay" and fields.get("total_amount") not in (None, amount):
            return f"signed success for {_text(str(fields['total_amount']))[:20]} yuan, not {amount}"
        return ""

    def _unverified(self, answer: SignedAnswer, fields: dict) -> str:
        """Why the answer's signature is not Alipay's, or "" when it verifies."""
        claim = says(fields)
        if answer.sign is None:
            return f"unsigned {answer.key}" + (f" claiming {claim}" if claim else "")
        if not rsa_verify(self._alipay_key, answer.text.encode("utf-8"), answer.sign):
            return f"the signature of {answer.key} does not verify with alipay_public_key_file"
        return ""


def beijing_time(now: datetime | None = None) -> str:
    """`timestamp` as Alipay reads it: Beijing time, "yyyy-MM-dd HH:mm:ss", whatever the device's TZ."""
    return (now or datetime.now(timezone.utc)).astimezone(BEIJING).strftime(TIMESTAMP_FORMAT)


def _load(loader, source, key: str):
    try:
        return loader(source)
    except ValueError as e:  # the file changed since the config was checked
        raise ConfigError(key, str(e)) from None


def _scrub(value, secret: str | None):
    """`value` (a text, or an answer's fields, nested) with every occurrence of `secret` masked."""
    if not secret:
        return value
    if isinstance(value, str):
        return value.replace(secret, mask(secret))
    if isinstance(value, dict):
        return {k: _scrub(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secret) for v in value]
    return value

"""`kind = "wechat_v3"`: WeChat Pay APIv3 code payment (付款码支付), direct merchant, public-key mode.

A thin client on `Gateway`; the five calls of the port map to these requests (JSON, UTF-8):

    pay           POST /v3/pay/transactions/codepay
    query         GET  /v3/pay/transactions/out-trade-no/{out_trade_no}?mchid=...
    reverse       POST /v3/pay/transactions/out-trade-no/{out_trade_no}/reverse
    refund        POST /v3/refund/domestic/refunds
    query_refund  GET  /v3/refund/domestic/refunds/{out_refund_no}

Signing (`authorization`): every request carries `Authorization: WECHATPAY2-SHA256-RSA2048
mchid=..,nonce_str=..,signature=..,timestamp=..,serial_no=..`, the signature being SHA256withRSA
with the merchant's API key (`apiclient_key.pem`) over `METHOD\\nURL\\nTIMESTAMP\\nNONCE\\nBODY\\n`,
URL being the path with its query string exactly as sent.

Verifying (`signature_problem`): an answer is trusted only when `Wechatpay-Serial` names our
`platform_public_key_id`, `Wechatpay-Timestamp` lies within 5 minutes of this device's clock and
`Wechatpay-Signature` verifies with the WeChat Pay public key over `TIMESTAMP\\nNONCE\\nBODY\\n`
(the raw body bytes). WeChat Pay's guide has an answer signed once the request's signature was
accepted; a 401 SIGN_ERROR therefore comes unsigned, and so may a 5xx/429 from its access layer.
Whether every other error answer is signed is not documented anywhere we could find, and the
official SDKs verify 2xx answers only. So:

  * a signed answer that does not verify, or a 2xx answer without a signature, is never trusted:
    UNKNOWN, one SECURITY log line per (call, out_trade_no) (`UntrustedAnswers`);
  * an error answer without a signature is trusted to mean UNKNOWN only, never a decline and
    never a configuration fault, and its code is not reported as the platform's;
  * a verified answer is mapped by the tables below.

Every outcome is one of the tables' rows; a code not in a table is UNKNOWN, so a surprise from
the platform is resolved by a (signed) query instead of being guessed. Amounts are integer fen
(`amount.total`, `amount.refund`). Hazard: a device clock more than 5 minutes off makes every
answer untrusted (and WeChat refuses our requests): the lane then answers UNKNOWN until NTP fixes it.

The daily bill (`bill`, head office's call; payments.md §8.1, contract in bills.py): apply with a
signed `GET /v3/bill/tradebill?bill_date=YYYY-MM-DD&bill_type=ALL&tar_type=GZIP`, then `GET` the
`download_url` it answers, signed over the link's path and query. The apply answer is verified as
every answer; an answer that does not verify is a `BillError` (one SECURITY log line), not a
retry: like a download whose SHA-1 differs, it is a wrong answer a person must look at, and a clock
more than 5 minutes off does not mend itself by retrying. Its error codes are read whether signed
or not (WeChat's SDKs verify 2xx answers only): a forged "no statement" or "creating" can only
make head office report the day's payments unmatched or ask again later, never hide a payment.
The download is the one answer WeChat does not sign: its integrity is the SHA-1 of the unpacked
file announced in the (verified) apply answer. The link must be https, or http to a loopback
simulator. Answers: 400 NO_STATEMENT_EXIST -> NO_TRANSACTIONS, 400 STATEMENT_CREATING -> NOT_YET;
5xx, 429, no answer, an expired link (download 400 INVALID_REQUEST) -> BillUnavailable; any other
refusal (INVALID_REQUEST: out of range, PARAM_ERROR, NO_AUTH, SIGN_ERROR) -> BillError.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from appliance import __version__
from appliance.errors import ConfigError, NoAnswer, ProviderError, ProviderMisconfigured, ProviderUnavailable
from appliance.payments import Outcome, PayRequest, Provider, Status, providers
from appliance.payments.bills import MAX_BILL_BYTES, Bill, BillError, BillState, BillUnavailable
from appliance.payments.http import Gateway, HttpOptions, Reply, UntrustedAnswers, gateway_url, gateway_urls, \
    link_problem
from appliance.payments.wechat_bill import parse_bill, unpacked
from appliance.payments.keys import load_private_key, load_public_key, private_key_file, public_key_file, rsa_sign, \
    rsa_verify
from appliance.schema import FIRST_QUERY_AFTER, QUERY_EVERY, RETRY_EVERY, REVERSE_AFTER, SecretFile, opt

log = logging.getLogger(__name__)

SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"
#: WeChat Pay refuses requests, and we refuse answers, whose timestamp is further than this from the clock.
MAX_CLOCK_SKEW_S = 300
#: WeChat's limit for `description`, in characters.
DESCRIPTION_MAX = 127

PAY_PATH = "/v3/pay/transactions/codepay"
REFUND_PATH = "/v3/refund/domestic/refunds"
BILL_PATH = "/v3/bill/tradebill"
#: The whole bill download may take this long, in seconds (head office's call, not a lane's).
BILL_DOWNLOAD_S = 120.0


def trade_path(out_trade_no: str) -> str:
    return f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no, safe='')}"


# --- options -------------------------------------------------------------------------------------


def _shape(pattern: str, what: str):
    """Schema check factory: the whole value matches `pattern` (`what` describes it in the error)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"must be {what}, got {value[:64]!r}")
        return value
    return check


@dataclass(frozen=True, kw_only=True)
class WechatV3Options(HttpOptions):
    """A direct merchant's APIv3 account in public-key mode. The timings are WeChat's own for code
    payments (pay.weixin.qq.com/doc/v2/merchant/4011937125, the guidance v3 code payment follows):
    query 5 s after an uncertain answer, every 10 s, give up after 45 s and reverse (never sooner
    than 15 s after the pay), call reverse again until it answers."""

    base_url: str = opt("https://api.mch.weixin.qq.com", check=gateway_url,
                        doc="WeChat Pay's main domain (the nearest access point)")
    backup_base_urls: tuple[str, ...] = opt(("https://api2.mch.weixin.qq.com",), check=gateway_urls,
                                            doc="WeChat's backup domain, tried only when nothing reached base_url")
    first_query_after_s: float = opt(5.0, check=FIRST_QUERY_AFTER,
                                     doc="WeChat: query 5 s after a system error")
    query_every_s: float = opt(10.0, check=QUERY_EVERY, doc="WeChat: every 10 s while paying")
    reverse_after_s: float = opt(45.0, check=REVERSE_AFTER,
                                 doc="WeChat: reverse after 45 s, never sooner than 15 s")
    retry_every_s: float = opt(10.0, check=RETRY_EVERY, doc="between reverse/refund retries")
    mchid: str = opt(check=_shape(r"[0-9]{6,32}", "the merchant number (digits)"), doc="商户号, digits")
    appid: str = opt(check=_shape(r"wx[0-9A-Za-z]{16}", 'an AppID: "wx" and 16 letters or digits'),
                     doc="the AppID bound to mchid")
    merchant_serial: str = opt(check=_shape(r"[0-9A-Fa-f]{8,40}", "the merchant API certificate's serial number "
                                                                  "(hexadecimal)"),
                               doc="serial number of the merchant API certificate")
    merchant_key_file: SecretFile = opt(check=private_key_file, doc="apiclient_key.pem: signs our requests")
    platform_public_key_id: str = opt(check=_shape(r"PUB_KEY_ID_[0-9A-Za-z]{1,64}", 'the WeChat Pay public key '
                                                                                  'id ("PUB_KEY_ID_...")'),
                                      doc="the WeChat Pay public key's id (Wechatpay-Serial)")
    platform_public_key_file: Path = opt(check=public_key_file, doc="pub_key.pem: verifies WeChat's answers")


# --- signatures (pure) ---------------------------------------------------------------------------


def request_message(method: str, url: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """What the merchant signs: `METHOD\\nURL\\nTIMESTAMP\\nNONCE\\nBODY\\n` (an empty body for GET)."""
    return f"{method}\n{url}\n{timestamp}\n{nonce}\n".encode() + body + b"\n"


def answer_message(timestamp: str, nonce: str, body: bytes) -> bytes:
    """What WeChat Pay signs in an answer: `TIMESTAMP\\nNONCE\\nBODY\\n`, the raw body bytes."""
    return f"{timestamp}\n{nonce}\n".encode() + body + b"\n"


def authorization(key, *, mchid: str, serial: str, method: str, url: str, body: bytes, timestamp: str,
                  nonce: str) -> str:
    """The `Authorization` header value of one request."""
    signature = rsa_sign(key, request_message(method, url, timestamp, nonce, body))
    return (f'{SIGNATURE_TYPE} mchid="{mchid}",nonce_str="{nonce}",signature="{signature}",'
            f'timestamp="{timestamp}",serial_no="{serial}"')


def signature_problem(headers: dict[str, str], body: bytes, public_key, key_id: str, now: float) -> str | None:
    """Why an answer carrying `Wechatpay-Signature` cannot be trusted, or None when it verifies.
    `headers` have lower-case names; `now` is this device's wall clock in seconds."""
    serial = headers.get("wechatpay-serial", "")
    if serial != key_id:
        return f"signed with key {serial[:80]!r}, not platform_public_key_id {key_id!r}"
    kind = headers.get("wechatpay-signature-type", SIGNATURE_TYPE)
    if kind != SIGNATURE_TYPE:
        return f"signature type {kind[:40]!r}, expected {SIGNATURE_TYPE}"
    timestamp, nonce = headers.get("wechatpay-timestamp", ""), headers.get("wechatpay-nonce", "")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12) or not nonce:
        return "Wechatpay-Timestamp or Wechatpay-Nonce missing or malformed"
    skew = now - int(timestamp)
    if abs(skew) > MAX_CLOCK_SKEW_S:
        return (f"Wechatpay-Timestamp is {abs(skew):.0f} s {'behind' if skew > 0 else 'ahead of'} this device's "
                f"clock (at most {MAX_CLOCK_SKEW_S} s allowed)")
    if not rsa_verify(public_key, answer_message(timestamp, nonce, body), headers.get("wechatpay-signature", "")):
        return "Wechatpay-Signature does not verify with the WeChat Pay public key"
    return None


# --- answers to outcomes (pure tables) -----------------------------------------------------------

#: The answer's error codes that say our own configuration is wrong: with a verified 4xx answer,
#: the platform provably did not take the request. Raised as ProviderMisconfigured.
MISCONFIGURED = frozenset({"SIGN_ERROR", "APPID_MCHID_NOT_MATCH", "MCH_NOT_EXISTS", "APPID_NOT_EXIST",
                           "MCHID_NOT_EXIST", "NO_AUTH", "NOAUTH"})

#: Verified 4xx error codes of codepay that definitely decline the payment (nothing was charged
#: under this out_trade_no). Both spellings WeChat uses (v2 heritage and v3 style) are listed.
PAY_DECLINES = {
    "NOTENOUGH": "the customer's balance is insufficient", "NOT_ENOUGH": "the customer's balance is insufficient",
    "AUTHCODEEXPIRE": "the payment code has expired: the customer must refresh it",
    "AUTH_CODE_EXPIRED": "the payment code has expired: the customer must refresh it",
    "AUTH_CODE_INVALID": "not a valid or no longer valid payment code",
    "AUTH_CODE_ERROR": "the payment code is malformed",
    "NOTSUPORTCARD": "the customer's card is not supported",
    "BUYER_MISMATCH": "another customer's code for an order already begun",
    "ORDER_CLOSED": "this order number is closed", "ORDERCLOSED": "this order number is closed",
    "ORDERREVERSED": "this order number was reversed",
    "INVALID_REQUEST": "the platform refused the request", "PARAM_ERROR": "the platform refused a parameter",
    "RULE_LIMIT": "refused by a business rule", "RULELIMIT": "refused by a business rule",
}
#: Error codes that leave the payment uncertain whatever the HTTP status: query, never pay again.
#: ORDER_PAID / OUT_TRADE_NO_USED answer a repeated out_trade_no, which may well be paid.
PAY_UNKNOWN = frozenset({"USERPAYING", "SYSTEM_ERROR", "SYSTEMERROR", "BANK_ERROR", "BANKERROR", "TRADE_ERROR",
                         "ORDER_PAID", "ORDERPAID", "OUT_TRADE_NO_USED", "FREQUENCY_LIMITED"})

#: trade_state of a query (or of a pay's 2xx answer) -> status. NOTPAY/USERPAYING/ACCEPT are
#: intermediate (WeChat's moderator: community doc 000682dbdf03b86b1e70388f561000).
TRADE_STATES = {
    "SUCCESS": Status.PAID, "REFUND": Status.REFUNDED,
    "NOTPAY": Status.UNKNOWN, "USERPAYING": Status.UNKNOWN, "ACCEPT": Status.UNKNOWN,
    "CLOSED": Status.DECLINED, "REVOKED": Status.DECLINED, "PAYERROR": Status.DECLINED,
}
#: Query error codes that say the platform never received the trade.
NOT_FOUND = frozenset({"ORDER_NOT_EXIST", "ORDERNOTEXIST", "RESOURCE_NOT_EXISTS"})

#: Verified reverse errors after which reversing again can still succeed.
REVERSE_RETRY = frozenset({"SYSTEM_ERROR", "SYSTEMERROR", "BANK_ERROR", "BANKERROR", "USERPAYING",
                           "FREQUENCY_LIMITED"})
#: Refund errors after which the same refund (same out_refund_no) may be asked for again.
REFUND_RETRY = frozenset({"SYSTEM_ERROR", "SYSTEMERROR", "FREQUENCY_LIMITED", "BIZERR_NEED_RETRY"})
#: A refund's `status` -> status. Only SUCCESS means the money went back. ABNORMAL (the customer's
#: account cannot take it) waits for the merchant to act in the merchant platform: still UNKNOWN.
REFUND_STATES = {"SUCCESS": Status.REFUNDED, "PROCESSING": Status.UNKNOWN, "ABNORMAL": Status.UNKNOWN,
                 "CLOSED": Status.DECLINED}


@dataclass(frozen=True)
class Answer:
    """A platform answer that may be read: its signature verified (`signed`), or it is an error
    answer that carried none (`signed` False: it can only mean UNKNOWN). `doc` is its JSON object."""

    http_status: int
    doc: dict
    signed: bool

    @property
    def ok(self) -> bool:
        return 200 <= self.http_status < 300

    @property
    def code(self) -> str:
        """The error answer's `code` ("" for a success answer)."""
        return _shown(self.doc.get("code"), 64)

    def describe(self) -> str:
        """For people: the HTTP status, the code and the platform's message."""
        message = _shown(self.doc.get("message"))
        return f"HTTP {self.http_status} {self.code or '(no code)'}: {message}" if message else \
            f"HTTP {self.http_status} {self.code or '(no code)'}"


def _json_object(body: bytes) -> dict:
    """An answer's JSON object, or {} when the body is none."""
    try:
        doc = json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, ValueError, RecursionError):  # json: too deeply nested is a RecursionError
        return {}
    return doc if isinstance(doc, dict) else {}


def _text(v) -> str:
    return v if isinstance(v, str) else ""


def _shown(v, limit: int = 200) -> str:
    """A platform text for reasons and log lines: at most `limit` characters, control characters
    (a forged answer's line breaks) as spaces."""
    return "".join(c if c.isprintable() else " " for c in _text(v)[:limit])


def _unsigned(answer: Answer) -> Outcome:
    return Outcome(Status.UNKNOWN, f"{answer.describe()} (error answer without a signature, not trusted)")


def _misconfigured(answer: Answer, call: str) -> ProviderMisconfigured:
    return ProviderMisconfigured(f"WeChat Pay refused our {call} request: {answer.describe()}")


def _trade_outcome(doc: dict) -> Outcome:
    """A transaction object (query answer, pay's 2xx answer) -> outcome by its trade_state."""
    state = _shown(doc.get("trade_state"), 64)
    status = TRADE_STATES.get(state, Status.UNKNOWN)
    text = _shown(doc.get("trade_state_desc"))
    reason = f"{state}: {text}" if text else state or "no trade_state"
    if status is Status.PAID:
        return Outcome(Status.PAID, reason, platform_txn_id=_shown(doc.get("transaction_id"), 64) or None, code=state,
                       funding_source=_shown(doc.get("bank_type"), 64) or None)
    return Outcome(status, reason, platform_txn_id=_shown(doc.get("transaction_id"), 64) or None, code=state)


def _other_trade(doc: dict, out_trade_no: str) -> Outcome | None:
    """UNKNOWN when a verified answer is about another trade than the one asked about."""
    theirs = doc.get("out_trade_no")
    if theirs is not None and theirs != out_trade_no:
        return Outcome(Status.UNKNOWN, f"the answer is about out_trade_no {str(theirs)[:40]!r}, not {out_trade_no}")
    return None


def pay_outcome(answer: Answer, out_trade_no: str) -> Outcome:
    """codepay's answer -> PAID / DECLINED / UNKNOWN; raises ProviderMisconfigured for a verified
    4xx naming our own configuration (the platform provably took nothing)."""
    if not answer.signed:
        return _unsigned(answer)
    if answer.ok:  # 200 with the transaction, or 202 {"trade_state": "USERPAYING"}
        out = _other_trade(answer.doc, out_trade_no) or _trade_outcome(answer.doc)
        if out.status not in (Status.PAID, Status.DECLINED, Status.UNKNOWN):  # e.g. REFUND: a query says what
            return Outcome(Status.UNKNOWN, f"{out.reason} (answered to a pay: query decides)", code=out.code)
        return out
    code = answer.code
    if answer.http_status >= 500 or code in PAY_UNKNOWN:
        return Outcome(Status.UNKNOWN, answer.describe(), code=code)
    if code in MISCONFIGURED:
        raise _misconfigured(answer, "pay")
    if code in PAY_DECLINES:
        return Outcome(Status.DECLINED, f"{answer.describe()} ({PAY_DECLINES[code]})", code=code)
    return Outcome(Status.UNKNOWN, f"{answer.describe()} (a code this adapter does not know: query decides)", code=code)


def query_outcome(answer: Answer, out_trade_no: str) -> Outcome:
    """The query's answer -> PAID / REFUNDED / DECLINED (closed, reversed, failed, never arrived) / UNKNOWN."""
    if not answer.signed:
        return _unsigned(answer)
    if answer.ok:
        return _other_trade(answer.doc, out_trade_no) or _trade_outcome(answer.doc)
    return _error_outcome(answer, "query", declined=NOT_FOUND)


def reverse_outcome(answer: Answer, out_trade_no: str) -> Outcome:
    """The reverse's answer -> REVERSED (2xx: domestic answers 200 {appid, mchid, out_trade_no} and
    carries no `recall`) / UNKNOWN (5xx, retryable codes: call again) / DECLINED (any other
    verified refusal, e.g. outside the 7-day window: the caller refunds instead)."""
    if not answer.signed:
        return _unsigned(answer)
    if answer.ok:
        return _other_trade(answer.doc, out_trade_no) or Outcome(Status.REVERSED, "reversed", code="SUCCESS")
    if answer.http_status >= 500 or answer.code in REVERSE_RETRY:
        return Outcome(Status.UNKNOWN, f"{answer.describe()} (reverse again)", code=answer.code)
    if answer.code in MISCONFIGURED:
        raise _misconfigured(answer, "reverse")
    return Outcome(Status.DECLINED, f"{answer.describe()} (cannot reverse: refund instead)", code=answer.code)


def refund_outcome(answer: Answer, out_trade_no: str, call: str = "refund") -> Outcome:
    """A refund object (the refund's or query_refund's answer) -> REFUNDED only for status SUCCESS;
    UNKNOWN while PROCESSING/ABNORMAL or when the call failed; DECLINED when refused or, for
    query_refund, when the refund does not exist (then the same out_refund_no may be used again)."""
    if not answer.signed:
        return _unsigned(answer)
    if answer.ok:
        other = _other_trade(answer.doc, out_trade_no)
        if other is not None:
            return other
        state = _shown(answer.doc.get("status"), 64)
        return Outcome(REFUND_STATES.get(state, Status.UNKNOWN), f"refund {state or 'without a status'}",
                       platform_txn_id=_shown(answer.doc.get("transaction_id"), 64) or None, code=state)
    if call == "query_refund":
        return _error_outcome(answer, call, declined=NOT_FOUND)
    if answer.http_status >= 500 or answer.code in REFUND_RETRY:
        return Outcome(Status.UNKNOWN, f"{answer.describe()} (refund again with the same number)", code=answer.code)
    if answer.code in MISCONFIGURED:
        raise _misconfigured(answer, call)
    return Outcome(Status.DECLINED, f"{answer.describe()} (refund refused)", code=answer.code)


def _error_outcome(answer: Answer, call: str, *, declined: frozenset[str]) -> Outcome:
    """A verified error answer of a query: DECLINED for `declined` codes (404: never received),
    ProviderMisconfigured for our configuration, else UNKNOWN (the query itself failed)."""
    if answer.http_status < 500 and answer.code in declined:
        return Outcome(Status.DECLINED, f"{answer.describe()} (the platform has no such record)", code=answer.code)
    if answer.http_status < 500 and answer.code in MISCONFIGURED:
        raise _misconfigured(answer, call)
    return Outcome(Status.UNKNOWN, f"{answer.describe()} ({call} failed)", code=answer.code)


# --- the adapter ---------------------------------------------------------------------------------


@providers.register("wechat_v3", WechatV3Options)
class WechatV3Provider(Provider):
    """WeChat Pay APIv3 code payment. Thread-safe: its state is the options, the keys (immutable
    cryptography objects) and the Gateway (an httpx Client, shared across threads)."""

    kind = "wechat_v3"
    has_bill = True

    def __init__(self, name: str, options: WechatV3Options, state_dir: Path | None = None):
        super().__init__(name, options.policy())
        self.options = options
        key = f"providers.{name}"
        self._merchant_key = _load(load_private_key, options.merchant_key_file, f"{key}.merchant_key_file")
        self._platform_key = _load(load_public_key, options.platform_public_key_file,
                                   f"{key}.platform_public_key_file")
        self.untrusted = UntrustedAnswers(name)
        self._gateway = Gateway(options, key=key)
        self._signature_refused = threading.Event()  # set while WeChat answers 401 to our requests

    # --- the port ---

    def pay(self, req: PayRequest) -> Outcome:
        body = {
            "appid": self.options.appid, "mchid": self.options.mchid,
            "description": req.subject[:DESCRIPTION_MAX], "out_trade_no": req.out_trade_no,
            "payer": {"auth_code": req.auth_code},
            "amount": {"total": req.amount_fen, "currency": "CNY"},
            "scene_info": {"store_info": {"out_id": req.store_id}, "device_id": req.terminal_id},
        }
        answer = self._exchange("pay", req.out_trade_no, "POST", PAY_PATH, body)
        return answer if isinstance(answer, Outcome) else pay_outcome(answer, req.out_trade_no)

    def query(self, out_trade_no: str) -> Outcome:
        url = f"{trade_path(out_trade_no)}?mchid={quote(self.options.mchid, safe='')}"
        answer = self._exchange("query", out_trade_no, "GET", url)
        return answer if isinstance(answer, Outcome) else query_outcome(answer, out_trade_no)

    def reverse(self, out_trade_no: str) -> Outcome:
        body = {"appid": self.options.appid, "mchid": self.options.mchid}
        answer = self._exchange("reverse", out_trade_no, "POST", f"{trade_path(out_trade_no)}/reverse", body)
        return answer if isinstance(answer, Outcome) else reverse_outcome(answer, out_trade_no)

    def refund(self, out_trade_no: str, amount_fen: int, total_fen: int, out_refund_no: str) -> Outcome:
        body = {"out_trade_no": out_trade_no, "out_refund_no": out_refund_no,
                "amount": {"refund": amount_fen, "total": total_fen, "currency": "CNY"}}
        answer = self._exchange("refund", out_trade_no, "POST", REFUND_PATH, body)
        return answer if isinstance(answer, Outcome) else refund_outcome(answer, out_trade_no)

    def query_refund(self, out_trade_no: str, out_refund_no: str) -> Outcome:
        url = f"{REFUND_PATH}/{quote(out_refund_no, safe='')}"
        answer = self._exchange("query_refund", out_trade_no, "GET", url)
        return answer if isinstance(answer, Outcome) else refund_outcome(answer, out_trade_no, "query_refund")

    def close(self) -> None:
        self._gateway.close()

    # --- the daily bill (head office) ---

    def bill(self, day: dt.date) -> Bill:
        """The bill of Beijing `day` (see the module docstring). Raises BillError, BillUnavailable."""
        url = f"{BILL_PATH}?bill_date={day.isoformat()}&bill_type=ALL&tar_type=GZIP"
        answer = self._bill_answer(day, self._bill_request(day, url))
        if not answer.ok:
            return self._bill_refused(day, answer)
        hash_value, link = _text(answer.doc.get("hash_value")).lower(), _text(answer.doc.get("download_url"))
        if answer.doc.get("hash_type") != "SHA1" or not re.fullmatch(r"[0-9a-f]{40}", hash_value):
            raise BillError(self.name, day, f"the apply answer has no SHA1 hash_value ({answer.describe()})")
        refused = link_problem(link)
        if refused:
            raise BillError(self.name, day, f"download_url not fetched: {refused}")
        parts = urlsplit(link)
        signed_url = parts.path + (f"?{parts.query}" if parts.query else "")
        download = self._bill_request(day, link, signed_url, max_bytes=MAX_BILL_BYTES, answer_s=BILL_DOWNLOAD_S)
        if download.status != 200:
            self._bill_download_refused(day, download)
        data = unpacked(self.name, day, download.body)
        if hashlib.sha1(data).hexdigest() != hash_value:
            raise BillError(self.name, day, f"hash mismatch: the download's SHA-1 is not the {hash_value} announced "
                                            f"(a broken download: apply again)")
        return parse_bill(self.name, day, data)

    def _bill_request(self, day: dt.date, url: str, signed_url: str | None = None, **limits) -> Reply:
        """One signed GET (`url` a path, or the full download link signed as `signed_url`)."""
        try:
            return self._gateway.request("GET", url, headers=self._headers("GET", signed_url or url, b""), **limits)
        except (ProviderUnavailable, NoAnswer) as e:
            raise BillUnavailable(self.name, day, f"no answer from WeChat Pay: {e}") from None
        except ProviderError as e:  # ProviderMisconfigured: an address that cannot be used
            raise BillError(self.name, day, str(e)) from None

    def _bill_answer(self, day: dt.date, reply: Reply) -> Answer:
        """The apply answer, verified when signed; a 2xx must be signed. Raises BillError otherwise,
        BillUnavailable for a 5xx or 429."""
        signed = "wechatpay-signature" in reply.headers
        why = signature_problem(reply.headers, reply.body, self._platform_key, self.options.platform_public_key_id,
                                time.time()) if signed else None
        if why is None and not signed and 200 <= reply.status < 300:
            why = "a 2xx answer without Wechatpay-Signature"
        if why is not None:
            log.error("SECURITY: platform %s: the bill answer for %s does not verify (HTTP %s: %s); not trusted",
                      self.name, day.isoformat(), reply.status, why)
            raise BillError(self.name, day, f"the apply answer does not verify (HTTP {reply.status}: {why})")
        answer = Answer(reply.status, _json_object(reply.body), signed)
        if reply.status >= 500 or reply.status == 429:
            raise BillUnavailable(self.name, day, f"{answer.describe()}: ask again later")
        return answer

    def _bill_refused(self, day: dt.date, answer: Answer) -> Bill:
        """A 4xx apply answer: the day's state, or BillError."""
        trust = "" if answer.signed else " (unsigned)"
        if answer.code == "NO_STATEMENT_EXIST":
            return Bill(self.name, day, BillState.NO_TRANSACTIONS, detail=answer.describe() + trust)
        if answer.code == "STATEMENT_CREATING":
            return Bill(self.name, day, BillState.NOT_YET, detail=answer.describe() + trust)
        raise BillError(self.name, day, f"WeChat Pay refused the bill request: {answer.describe()}{trust}")

    def _bill_download_refused(self, day: dt.date, reply: Reply) -> None:
        """A download that did not give the file: raises BillUnavailable when the link expired or the
        platform failed (apply again later), else BillError."""
        answer = Answer(reply.status, _json_object(reply.body), False)
        if reply.status >= 500 or reply.status == 429 or (reply.status == 400 and answer.code == "INVALID_REQUEST"):
            raise BillUnavailable(self.name, day, f"download: {answer.describe()} (the link expired or the "
                                                  f"platform failed: apply again later)")
        raise BillError(self.name, day, f"download refused: {answer.describe()}")

    # --- one signed exchange ---

    def _exchange(self, call: str, out_trade_no: str, method: str, url: str,
                  body: dict | None = None) -> Answer | Outcome:
        """Send one signed request; return the answer once it may be read, or the UNKNOWN outcome
        when nothing usable came back. Raises ProviderUnavailable (nothing was sent)."""
        raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() if body is not None else b""
        try:
            reply = self._gateway.request(method, url, body=raw or None, headers=self._headers(method, url, raw))
        except NoAnswer as e:
            return Outcome(Status.UNKNOWN, f"no answer from WeChat Pay: {e}")
        return self._readable(reply, call, out_trade_no)

    def _headers(self, method: str, url: str, body: bytes) -> dict[str, str]:
        headers = {
            "Authorization": authorization(self._merchant_key, mchid=self.options.mchid,
                                           serial=self.options.merchant_serial, method=method, url=url, body=body,
                                           timestamp=str(int(time.time())), nonce=secrets.token_hex(16).upper()),
            "Accept": "application/json",
            "User-Agent": f"lane-appliance/{__version__} (wechat_v3)",
            "Wechatpay-Serial": self.options.platform_public_key_id,
        }
        if body:
            headers["Content-Type"] = "application/json"
        return headers

    def _readable(self, reply: Reply, call: str, out_trade_no: str) -> Answer | Outcome:
        """Verify, then parse. See the module docstring for what is trusted."""
        signed = "wechatpay-signature" in reply.headers
        if signed:
            why = signature_problem(reply.headers, reply.body, self._platform_key,
                                    self.options.platform_public_key_id, time.time())
            if why is not None:
                return self.untrusted.outcome(call, out_trade_no, f"HTTP {reply.status}: {why}")
        elif 200 <= reply.status < 300:
            return self.untrusted.outcome(call, out_trade_no, f"HTTP {reply.status} answer without Wechatpay-Signature")
        try:
            doc = json.loads(reply.body.decode("utf-8")) if reply.body.strip() else {}
        except (UnicodeDecodeError, ValueError, RecursionError):  # json: too deeply nested is a RecursionError
            doc = None
        if not isinstance(doc, dict):
            return Outcome(Status.UNKNOWN, f"HTTP {reply.status}: the answer is not a JSON object")
        answer = Answer(reply.status, doc, signed)
        self._note_signature_refusal(answer)
        return answer

    def _note_signature_refusal(self, answer: Answer) -> None:
        """Log once when WeChat starts refusing our request signature (a 401, which it cannot sign,
        so the call itself only ends UNKNOWN), and once when a signed answer shows it stopped."""
        if answer.http_status == 401 and not self._signature_refused.is_set():
            self._signature_refused.set()
            log.error("platform %s: WeChat Pay refuses our request signature (%s): check mchid, merchant_serial, "
                      "merchant_key_file and this device's clock; payments end unknown until it is fixed",
                      self.name, answer.describe())
        elif answer.signed and self._signature_refused.is_set():
            self._signature_refused.clear()
            log.warning("platform %s: WeChat Pay accepts our request signature again", self.name)


def _load(loader, source, key: str):
    """A key, read when the adapter starts; the config check already parsed it, so this fails only if
    the file changed since. Raises ConfigError naming the option."""
    try:
        return loader(source)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None

"""`kind = "wechat_v2"`: WeChat Pay v2 payment-code payments (付款码支付, micropay), XML over HTTPS.

Five calls, each a signed XML POST: /pay/micropay (pay), /pay/orderquery (query),
/secapi/pay/reverse (reverse), /secapi/pay/refund (refund), /pay/refundquery (query_refund). The
two /secapi calls need the merchant's API certificate (two-way TLS); the one Gateway presents it on
every call, which WeChat accepts.

Signature (payments.md §2.3): the non-empty fields except `sign`, sorted by name, joined as
`k=v&...`, then `&key=<API key>`; MD5 or HMAC-SHA256 (keyed with the API key) in upper-case hex.
Answers are signed the same way with the same key, and nothing in an answer is trusted before its
`sign` verifies.

How an answer is read (§2.4), in this order:
  1. No complete answer (timeout, reset), HTTP status not 200, a body that is not flat UTF-8
     `<xml>`: UNKNOWN. Nothing was learnt, a query decides.
  2. `return_code` FAIL: a refusal at the communication level (bad signature, bad XML, unknown
     merchant). WeChat sends it unsigned, so nothing in it can be proven: it could be forged by
     whoever sits between us and the platform, over a trade that was in fact taken. It is
     therefore never read as "not charged" (DECLINED, ProviderMisconfigured) but as UNKNOWN, with
     `code` "FAIL" and the platform's text in `reason` for the technician. A lane whose API key is
     wrong thus sees every payment unknown, and reverses that keep failing; it never charges twice.
  3. `return_code` SUCCESS with a `sign` that does not verify, or none: never trusted
     (`UntrustedAnswers`: UNKNOWN and one SECURITY log line per call and trade).
  4. A verified answer that names another out_trade_no or out_refund_no than the one asked
     about (a signed answer replayed from another trade): not trusted either.
  5. Verified: `result_code` SUCCESS, or FAIL with `err_code`, mapped per call by the tables
     below. A verified refusal of our own configuration (NOAUTH, APPID_MCHID_NOT_MATCH, ...) is the
     one proof that the platform took nothing: it raises ProviderMisconfigured. An err_code we do
     not know is UNKNOWN for pay and query (a query decides), and a refusal for reverse and refund.

`reverse` obeys `recall=Y` whatever `result_code` says (§7): call again. WeChat allows a reverse
within 7 days of the pay; after that REVERSE_EXPIRE (DECLINED) means refund instead. A refund
answer only means "accepted": refund answers UNKNOWN and `query_refund` says when it succeeded.

The daily bill (`bill`, head office's call; payments.md §8.2, contract in bills.py): one signed
POST /pay/downloadbill (bill_date yyyyMMdd, bill_type ALL, tar_type GZIP). It needs no client
certificate; the one Gateway shows it anyway, which WeChat accepts. Success is a body that is not
`<xml>`: the bill itself (gzip or text), unsigned; v2 announces no hash, so the summary checked
against the lines is the only integrity check. Failure is an unsigned `<xml>`: "No Bill Exist"
(20002) -> NO_TRANSACTIONS, "Bill Creating" -> NOT_YET, anything else (invalid bill_date 20001,
SIGN ERROR, no permission, ...) -> BillError quoting it; no answer, HTTP 5xx -> BillUnavailable.
Trusting the unsigned "no bill" is safe the way it is for v3 (see wechat_v3.py): at worst head
office reports the day's payments unmatched, or asks again later.

Thread-safe: calls share the Gateway (httpx's Client is thread-safe) and `UntrustedAnswers`
(locked); nothing per call is kept on the adapter. The payment code goes into one request body
and nowhere else: no log line, no reason, no exception text.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import re
import secrets
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from cryptography import x509

from appliance.errors import NoAnswer, ProviderError, ProviderMisconfigured, ProviderUnavailable
from appliance.payments import Outcome, PayRequest, Provider, Status, providers
from appliance.payments.bills import MAX_BILL_BYTES, Bill, BillError, BillState, BillUnavailable
from appliance.payments.http import Gateway, HttpOptions, UntrustedAnswers, gateway_url, gateway_urls, loopback_host
from appliance.payments.keys import ALNUM, certificate_file, load_private_key, private_key_file, secret_text
from appliance.payments.wechat_bill import parse_bill, unpacked
from appliance.schema import FieldError, SecretFile, opt, secrets_checked

#: WeChat's rule: never reverse sooner than this after the pay call (payments.md §2.5).
MIN_REVERSE_AFTER_S = 15.0
#: `body` (the goods description) is at most this many bytes.
BODY_MAX_BYTES = 127
#: What v2 signs with; MD5 is WeChat's default when `sign_type` is not sent.
SIGN_TYPES = ("HMAC-SHA256", "MD5")

PAY, QUERY, REVERSE, REFUND, QUERY_REFUND = ("/pay/micropay", "/pay/orderquery", "/secapi/pay/reverse",
                                             "/secapi/pay/refund", "/pay/refundquery")
DOWNLOAD_BILL = "/pay/downloadbill"
#: The whole bill download may take this long, in seconds (head office's call, not a lane's).
BILL_DOWNLOAD_S = 120.0
#: The failure texts (return_msg, or error_code) that are a day's state rather than an error.
BILL_STATES = {"no bill exist": BillState.NO_TRANSACTIONS, "20002": BillState.NO_TRANSACTIONS,
               "bill creating": BillState.NOT_YET}


# --- the protocol, pure: signature and XML ------------------------------------------------------


def sign(fields: Mapping[str, str], api_key: str, sign_type: str) -> str:
    """The v2 signature of `fields` (payments.md §2.3): every non-empty field but `sign`, sorted by
    name, `k=v` joined by `&`, then `&key=<api_key>`; MD5, or HMAC-SHA256 keyed with the API key;
    upper-case hex. `sign_type`: "MD5" or "HMAC-SHA256"."""
    text = "&".join(f"{k}={v}" for k, v in sorted(fields.items()) if k != "sign" and v != "")
    message = f"{text}&key={api_key}".encode("utf-8")
    if sign_type == "MD5":
        return hashlib.md5(message).hexdigest().upper()
    if sign_type == "HMAC-SHA256":
        return hmac.new(api_key.encode("utf-8"), message, hashlib.sha256).hexdigest().upper()
    raise ValueError(f"unknown sign_type {sign_type!r}")


def signed_correctly(fields: Mapping[str, str], api_key: str, sign_type: str) -> bool:
    """True only if `fields` carries a `sign` that is their signature with this key and type."""
    given = fields.get("sign", "")
    return bool(given) and hmac.compare_digest(given.encode(), sign(fields, api_key, sign_type).encode())


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def to_xml(fields: Mapping[str, str], *, cdata: bool = False) -> bytes:
    """`<xml><k>v</k>...</xml>` in UTF-8. `cdata`: wrap the values in CDATA sections, as WeChat's
    own answers do (the simulator); otherwise escaped text. Field names must be identifiers."""
    parts = ["<xml>"]
    for k, v in fields.items():
        if not _NAME.fullmatch(k):
            raise ValueError(f"not an XML field name: {k!r}")
        text = "<![CDATA[" + v.replace("]]>", "]]]]><![CDATA[>") + "]]>" if cdata else escape(v)
        parts.append(f"<{k}>{text}</{k}>")
    parts.append("</xml>")
    return "".join(parts).encode("utf-8")


def from_xml(text: str) -> dict[str, str]:
    """The fields of a flat `<xml>` document: element name -> text (CDATA or not, "" when empty).
    Raises ValueError for anything else: not XML, another root, nested or repeated elements, or a
    document type (no entity of any kind is expanded)."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise ValueError("a document type declaration")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"not XML ({e})") from None
    if root.tag != "xml":
        raise ValueError(f"root element <{root.tag}>, not <xml>")
    fields: dict[str, str] = {}
    for child in root:
        if len(child) or child.tag in fields:
            raise ValueError(f"element <{child.tag}> is nested or repeated")
        fields[child.tag] = child.text or ""
    return fields


def local_address() -> str:
    """This device's IPv4 address on its default route, for `spbill_create_ip`. Read from the
    routing table: a UDP socket "connected" to a documentation address (192.0.2.1) sends no packet
    and looks no name up. "127.0.0.1" when there is no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def clip_utf8(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, never inside a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


# --- what each answer means ---------------------------------------------------------------------

#: err_codes that say our own configuration or request shape is wrong (any call). Verified, they
#: prove the platform took nothing.
MISCONFIGURED = frozenset({
    "SIGNERROR", "NOAUTH", "APPID_NOT_EXIST", "MCHID_NOT_EXIST", "APPID_MCHID_NOT_MATCH", "PARAM_ERROR",
    "LACK_PARAMS", "NOT_UTF8", "XML_FORMAT_ERROR", "REQUIRE_POST_METHOD", "POST_DATA_EMPTY", "CERT_ERROR",
})

#: pay: the outcome is not known yet; query. ORDERPAID and OUT_TRADE_NO_USED say this out_trade_no
#: was taken before: the query tells how it ended (it may be paid).
PAY_UNKNOWN = frozenset({"SYSTEMERROR", "BANKERROR", "USERPAYING", "ORDERPAID", "OUT_TRADE_NO_USED"})
#: pay: declined, nothing charged by this pay.
PAY_DECLINED = frozenset({
    "NOTENOUGH", "AUTHCODEEXPIRE", "AUTH_CODE_INVALID", "AUTH_CODE_ERROR", "NOTSUPORTCARD", "BUYER_MISMATCH",
    "ORDERCLOSED", "ORDERREVERSED", "TRADE_ERROR",
})

#: orderquery trade_state -> status. NOTPAY, USERPAYING and ACCEPT are still open; CLOSED and
#: REVOKED (a reversed unpaid order shows either) and PAYERROR are final.
TRADE_STATES = {
    "SUCCESS": Status.PAID, "REFUND": Status.REFUNDED,
    "NOTPAY": Status.UNKNOWN, "USERPAYING": Status.UNKNOWN, "ACCEPT": Status.UNKNOWN,
    "CLOSED": Status.DECLINED, "REVOKED": Status.DECLINED, "PAYERROR": Status.DECLINED,
}
#: orderquery err_code: the platform never got this trade.
QUERY_DECLINED = frozenset({"ORDERNOTEXIST"})

#: reverse err_codes (with recall=N) that are not a refusal: call again.
REVERSE_UNKNOWN = frozenset({"SYSTEMERROR", "BANKERROR", "USERPAYING"})

#: refund err_codes that mean "call again with the same out_refund_no".
REFUND_UNKNOWN = frozenset({"SYSTEMERROR", "BIZERR_NEED_RETRY", "FREQUENCY_LIMITED", "INVALID_REQ_TOO_MUCH"})

#: refundquery refund_status_0 -> status.
REFUND_STATES = {"SUCCESS": Status.REFUNDED, "PROCESSING": Status.UNKNOWN,
                 "CHANGE": Status.DECLINED, "REFUNDCLOSE": Status.DECLINED}
#: refundquery err_codes: no such refund.
REFUND_QUERY_DECLINED = frozenset({"REFUNDNOTEXIST", "ORDERNOTEXIST"})


# --- options --------------------------------------------------------------------------------------


#: The schema check of `api_key_file`: the APIv2 key is 32 letters and digits.
API_KEY = secret_text(length=32, alphabet=ALNUM)


def pem_private_key_file(f: SecretFile) -> SecretFile:
    """Schema check of `client_key_file`: an RSA private key in PEM, as apiclient_key.pem is and as
    TLS loads it (the bare base64 that keys.private_key_file also takes will not do here)."""
    private_key_file(f)
    if b"-----BEGIN" not in f.path.read_bytes():
        raise ValueError(f"{f.path} must be PEM (-----BEGIN PRIVATE KEY-----), as apiclient_key.pem is")
    return f


def _mch_id(v: str) -> str:
    if not re.fullmatch(r"[0-9]{1,32}", v):
        raise ValueError(f"must be the merchant number (商户号): digits only, got {v!r}")
    return v


def _appid(v: str) -> str:
    if not re.fullmatch(r"wx[0-9A-Za-z]{16}", v):
        raise ValueError(f"must be an AppID: wx and 16 letters or digits (e.g. wxd930ea5d5a258f4f), got {v!r}")
    return v


@dataclass(frozen=True, kw_only=True)
class WechatV2Options(HttpOptions):
    """`[providers.NAME]` of `kind = "wechat_v2"`. The policy defaults (HttpOptions') are WeChat's
    own for payment-code payments (payments.md §2.5): query 5 s after a system error, then every
    10 s, reverse after 45 s, reverse again 10 s after no answer; and never reverse sooner than 15 s
    (refused here unless the gateway is a loopback simulator)."""

    base_url: str = opt("https://api.mch.weixin.qq.com", check=gateway_url, doc="WeChat Pay's API gateway")
    backup_base_urls: tuple[str, ...] = opt(("https://api2.mch.weixin.qq.com",), check=gateway_urls,
                                            doc="WeChat's backup gateway, tried only when nothing was sent")
    mch_id: str = opt(check=_mch_id, doc="the merchant number (商户号)")
    appid: str = opt(check=_appid, doc="the AppID bound to the merchant number")
    api_key_file: SecretFile = opt(check=API_KEY, doc="file holding the 32-character API key (APIv2 密钥), mode 0600")
    sign_type: Literal["HMAC-SHA256", "MD5"] = opt("HMAC-SHA256", doc="how requests and answers are signed")
    client_cert_file: Path = opt(check=certificate_file, doc="the API certificate, apiclient_cert.pem")
    client_key_file: SecretFile = opt(check=pem_private_key_file, doc="its private key, apiclient_key.pem, mode 0600")

    def __post_init__(self):
        super().__post_init__()
        if self.reverse_after_s < MIN_REVERSE_AFTER_S and not loopback_host(urlsplit(self.base_url).hostname or ""):
            raise FieldError("reverse_after_s", f"WeChat forbids reversing sooner than {MIN_REVERSE_AFTER_S:g} s "
                                                f"after the pay call, got {self.reverse_after_s:g} (lower values "
                                                "are for a loopback simulator only)")
        if secrets_checked():
            _check_pair(self.client_cert_file, self.client_key_file)


def _check_pair(cert: Path, key: SecretFile) -> None:
    """The certificate must be the one issued for the private key (both downloaded together)."""
    try:
        public = x509.load_pem_x509_certificate(Path(cert).read_bytes()).public_key()
        private = load_private_key(key)
    except (OSError, ValueError):
        return  # the schema's checks of each file say what is wrong with it
    if public.public_numbers() != private.public_key().public_numbers():
        raise FieldError("client_cert_file", f"{cert} is not the certificate of the key in {key.path} "
                                             "(download apiclient_cert.pem and apiclient_key.pem together)")


# --- the adapter ----------------------------------------------------------------------------------


class _Refused(Exception):
    """An answer that settles the call without a verified result (carries the Outcome)."""

    def __init__(self, outcome: Outcome):
        self.outcome = outcome


def _settled(call):
    """A call whose exchange ended in `_Refused` answers that outcome."""
    @functools.wraps(call)
    def settled(self, *args):
        try:
            return call(self, *args)
        except _Refused as r:
            return r.outcome
    return settled


@providers.register("wechat_v2", WechatV2Options)
class WechatV2Provider(Provider):
    """WeChat Pay v2 micropay (see the module docstring for how answers are read)."""

    kind = "wechat_v2"
    has_bill = True

    def __init__(self, name: str, options: WechatV2Options, state_dir: Path):
        """Raises ConfigError (naming `providers.NAME.<option>`) when a key file cannot be used."""
        super().__init__(name, options.policy())
        self._appid = options.appid
        self._mch_id = options.mch_id
        self._sign_type = options.sign_type
        self._api_key = options.api_key_file.read()
        self._gateway = Gateway(options, key=f"providers.{name}",
                                client_cert=(options.client_cert_file, options.client_key_file.path))
        self.untrusted = UntrustedAnswers(name)

    # --- the five calls ---------------------------------------------------------------------

    @_settled
    def pay(self, req: PayRequest) -> Outcome:
        answer = self._call("pay", PAY, req.out_trade_no, {
            "body": clip_utf8(req.subject.replace(",", " "), BODY_MAX_BYTES),  # the daily bill is CSV
            "out_trade_no": req.out_trade_no,
            "total_fee": str(req.amount_fen),
            "spbill_create_ip": local_address(),
            "auth_code": req.auth_code,
            "device_info": req.terminal_id,
            "attach": req.store_id,
        })
        if answer["result_code"] == "SUCCESS":
            return _paid(answer)
        code = answer.get("err_code", "")
        if code in PAY_DECLINED:
            return _outcome(Status.DECLINED, answer)
        if code in PAY_UNKNOWN:
            return _outcome(Status.UNKNOWN, answer, "a query decides")
        return _outcome(Status.UNKNOWN, answer, "not a code this adapter knows; a query decides")

    @_settled
    def query(self, out_trade_no: str) -> Outcome:
        answer = self._call("query", QUERY, out_trade_no, {"out_trade_no": out_trade_no})
        if answer["result_code"] != "SUCCESS":
            return _failed(answer, declined=QUERY_DECLINED)
        state = answer.get("trade_state", "")
        status = TRADE_STATES.get(state, Status.UNKNOWN)
        if status is Status.PAID:
            return _paid(answer)
        return _outcome(status, answer, code=state, text=answer.get("trade_state_desc", ""))

    @_settled
    def reverse(self, out_trade_no: str) -> Outcome:
        answer = self._call("reverse", REVERSE, out_trade_no, {"out_trade_no": out_trade_no})
        if answer.get("recall") == "Y":  # whether result_code is SUCCESS or FAIL (§7)
            return _outcome(Status.UNKNOWN, answer, "recall=Y: reverse again")
        if answer["result_code"] == "SUCCESS":
            return _outcome(Status.REVERSED, answer, "reversed: closed, or refunded to the customer")
        if answer.get("err_code") in REVERSE_UNKNOWN:
            return _outcome(Status.UNKNOWN, answer, "reverse again")
        return _outcome(Status.DECLINED, answer, "refund instead")

    @_settled
    def refund(self, out_trade_no: str, amount_fen: int, total_fen: int, out_refund_no: str) -> Outcome:
        answer = self._call("refund", REFUND, out_trade_no, {
            "out_trade_no": out_trade_no,
            "out_refund_no": out_refund_no,
            "total_fee": str(total_fen),
            "refund_fee": str(amount_fen),
        }, out_refund_no=out_refund_no)
        if answer["result_code"] == "SUCCESS":
            return _outcome(Status.UNKNOWN, answer, f"refund {answer.get('refund_id', '')} accepted; "
                                                    "refundquery tells when it succeeded")
        code = answer.get("err_code", "")
        return _outcome(Status.UNKNOWN if code in REFUND_UNKNOWN else Status.DECLINED, answer)

    @_settled
    def query_refund(self, out_trade_no: str, out_refund_no: str) -> Outcome:
        answer = self._call("query_refund", QUERY_REFUND, out_trade_no, {"out_refund_no": out_refund_no},
                            out_refund_no=out_refund_no)
        if answer["result_code"] != "SUCCESS":
            return _failed(answer, declined=REFUND_QUERY_DECLINED)
        state = answer.get("refund_status_0", "")
        return _outcome(REFUND_STATES.get(state, Status.UNKNOWN), answer, code=state,
                        text=f"refund {answer.get('refund_id_0', '')}")

    def close(self) -> None:
        self._gateway.close()

    # --- the daily bill (head office) ---------------------------------------------------------

    def bill(self, day: dt.date) -> Bill:
        """The bill of Beijing `day` (see the module docstring). Raises BillError, BillUnavailable."""
        fields = {"bill_date": f"{day:%Y%m%d}", "bill_type": "ALL", "tar_type": "GZIP"}
        try:
            reply = self._gateway.request("POST", DOWNLOAD_BILL, body=self._signed(fields),
                                          headers={"Content-Type": "text/xml; charset=utf-8"},
                                          max_bytes=MAX_BILL_BYTES, answer_s=BILL_DOWNLOAD_S)
        except (ProviderUnavailable, NoAnswer) as e:
            raise BillUnavailable(self.name, day, f"no answer from WeChat Pay: {e}") from None
        except ProviderError as e:  # ProviderMisconfigured: an address that cannot be used
            raise BillError(self.name, day, str(e)) from None
        if reply.status >= 500 or reply.status == 429:
            raise BillUnavailable(self.name, day, f"HTTP {reply.status} from {DOWNLOAD_BILL}: ask again later")
        if reply.status != 200:
            raise BillError(self.name, day, f"HTTP {reply.status} from {DOWNLOAD_BILL}")
        if reply.body.lstrip().startswith(b"<"):  # a bill starts with its header (or the gzip magic): XML is a failure
            return self._bill_failure(day, reply.body)
        return parse_bill(self.name, day, unpacked(self.name, day, reply.body))

    def _bill_failure(self, day: dt.date, body: bytes) -> Bill:
        """A failure `<xml>`: the day's state (no bill, not yet), or BillError quoting WeChat."""
        try:
            answer = from_xml(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BillError(self.name, day, f"a failure answer that is not WeChat's XML: {e}") from None
        said = [answer.get(k, "").strip() for k in ("return_msg", "error_code", "err_code", "err_code_des")]
        text = " ".join(_printable(v) for v in said if v) or "(no message)"
        state = next((BILL_STATES[v.lower()] for v in said if v.lower() in BILL_STATES), None)
        if state is None:
            raise BillError(self.name, day, f"WeChat Pay refused the bill request: {text}")
        return Bill(self.name, day, state, detail=f"{text} (unsigned)")

    # --- one exchange -----------------------------------------------------------------------

    def _call(self, call: str, path: str, out_trade_no: str, fields: dict[str, str], *,
              out_refund_no: str | None = None) -> dict[str, str]:
        """Send one signed request; return the answer's fields once they verified and return_code
        is SUCCESS. Raises _Refused with the outcome otherwise, ProviderMisconfigured for a verified
        refusal of our configuration, ProviderUnavailable (from the Gateway) when nothing was sent."""
        try:
            reply = self._gateway.request("POST", path, body=self._signed(fields),
                                          headers={"Content-Type": "text/xml; charset=utf-8"})
            if reply.status != 200:
                raise _Refused(Outcome(Status.UNKNOWN, f"HTTP {reply.status} from {path}; a query decides"))
            answer = from_xml(reply.text())
        except NoAnswer as e:
            raise _Refused(Outcome(Status.UNKNOWN, f"no answer: {e}")) from None
        except ValueError as e:
            raise _Refused(Outcome(Status.UNKNOWN, f"the answer from {path} is not WeChat's XML: {e}")) from None
        if answer.get("return_code") != "SUCCESS":
            raise _Refused(Outcome(Status.UNKNOWN, f"FAIL: {answer.get('return_msg', '')} (an unsigned refusal "
                                                   "proves nothing; a query decides)", code="FAIL"))
        if "sign" not in answer:
            raise _Refused(self.untrusted.outcome(call, out_trade_no, "no sign"))
        if not signed_correctly(answer, self._api_key, self._sign_type):
            raise _Refused(self.untrusted.outcome(call, out_trade_no, f"{self._sign_type} sign mismatch"))
        for name, ours in (("out_trade_no", out_trade_no), ("out_refund_no_0", out_refund_no),
                           ("out_refund_no", out_refund_no)):
            if ours is not None and answer.get(name, ours) != ours:
                raise _Refused(self.untrusted.outcome(call, out_trade_no, f"answer is about {name} "
                                                                          f"{answer[name]!r}"))
        if answer.get("err_code") in MISCONFIGURED:
            raise ProviderMisconfigured(f"{path}: {answer['err_code']}: {answer.get('err_code_des', '')}")
        answer.setdefault("result_code", "")
        return answer

    def _signed(self, fields: dict[str, str]) -> bytes:
        """The request body: our fields plus appid, mch_id, a fresh nonce_str, sign_type and sign."""
        full = {"appid": self._appid, "mch_id": self._mch_id, "nonce_str": secrets.token_hex(16), **fields}
        if self._sign_type != "MD5":  # MD5 is WeChat's default, and then sign_type is not sent
            full["sign_type"] = self._sign_type
        full["sign"] = sign(full, self._api_key, self._sign_type)
        return to_xml(full)


def _printable(text: str, limit: int = 200) -> str:
    """A platform text for a reason: at most `limit` characters, control characters as spaces."""
    return "".join(c if c.isprintable() else " " for c in text[:limit])


def _paid(answer: dict[str, str]) -> Outcome:
    return Outcome(Status.PAID, "SUCCESS: paid", platform_txn_id=answer.get("transaction_id") or None,
                   code="SUCCESS", funding_source=answer.get("bank_type") or None)


def _failed(answer: dict[str, str], *, declined: frozenset[str]) -> Outcome:
    """A result_code FAIL answer of a query: DECLINED when its err_code is in `declined`, else
    UNKNOWN (ask again)."""
    return _outcome(Status.DECLINED if answer.get("err_code") in declined else Status.UNKNOWN, answer)


def _outcome(status: Status, answer: dict[str, str], note: str = "", *, code: str | None = None,
             text: str | None = None) -> Outcome:
    """An outcome naming the platform's code and text: by default err_code and err_code_des when
    the answer has them, else result_code."""
    if code is None:
        code = answer.get("err_code") or answer.get("result_code", "")
    if text is None:
        text = answer.get("err_code_des", "")
    reason = f"{code or '(no code)'}: {text}" if text else (code or "(no code)")
    return Outcome(status, f"{reason} ({note})" if note else reason,
                   platform_txn_id=answer.get("transaction_id") or None, code=code)

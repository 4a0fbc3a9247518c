"""`kind = "jeepay"`: the Jeepay aggregator's merchant API: one account takes WeChat, Alipay and
UnionPay payment codes (facts: ../shared/reference/aggregator.md).

The protocol, as this adapter speaks it:
  * Every call is a POST of a JSON object to a path under `base_url` (the merchant's own
    `jeepay-payment` gateway). It carries `mchNo`, `appId`, `reqTime` (ms), `version` "1.0",
    `signType` "MD5" and `sign`: MD5 over the fields sorted by name (null and "" left out), each
    as `name=value&`, then `key=<app secret>`, in upper-case hex (`sign_string`, `md5_sign`).
  * An answer is `{"code":0,"data":{...},"msg":"SUCCESS","sign":"..."}`, signed the same way
    over every key of `data` as received; or `{"code":9999,"msg":"..."}`, which Jeepay never
    signs. A code-0 answer whose sign does not verify, or that lacks data or sign, is not
    trusted: UNKNOWN, one SECURITY log line (`UntrustedAnswers`). An unsigned failure is
    believed only where the protocol gives nothing better: that the order or refund does not
    exist (nothing was charged), and that Jeepay refused our own credentials.
  * The failure code does not tell "refused before the channel was asked" from "failed after the
    channel took the money". So a failure of `unifiedOrder` is UNKNOWN (a query decides), except
    for the messages Jeepay sends before it creates an order: a bad sign or an unknown merchant
    (ProviderMisconfigured), and a payment code it cannot route (DECLINED).

Units and ids: amounts are integer fen (`amount`, `refundAmount`); `mchOrderNo` is the journal's
out_trade_no; the store and terminal ids go in `extParam`. `channelExtra` is a string holding
`{"authCode": code}`, signed as sent. The payment code is never logged, nor put in a reason or
an exception text.

Jeepay has no reverse. `reverse` queries, and closes an unpaid order (state 0 or 1); a paid
order is DECLINED (the resolver refunds it). A state-0 order is closed only once Jeepay's own
clock says it is `CLOSE_INIT_AFTER_S` old: closing 0 is local to Jeepay, and a channel success
still on its way in the `unifiedOrder` request could no longer update a closed order.

Time: each HTTP call takes at most `call_limit_s` (see appliance/payments/http.py). `reverse`
(query, close, query) and `refund` (refund, then query the refund when the refund was refused)
start a further call only while less than `FOLLOW_UP_SHARE` of one call limit has passed, so
they return within (1 + FOLLOW_UP_SHARE) x call_limit_s; otherwise they answer UNKNOWN and the
caller's next attempt goes on.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Literal

from appliance.errors import ConfigError, NoAnswer, ProviderMisconfigured
from appliance.payments import Outcome, PayRequest, Provider, Status, providers
from appliance.payments.http import (CONNECT_TIMEOUT, READ_TIMEOUT, Gateway, HttpOptions, UntrustedAnswers,
                                     gateway_url)
from appliance.payments.keys import secret_text
from appliance.redact import mask, mask_digit_runs
from appliance.schema import FIRST_QUERY_AFTER, QUERY_EVERY, RETRY_EVERY, REVERSE_AFTER, SecretFile, opt

log = logging.getLogger(__name__)

#: Seconds an unpaid order in state 0 must have existed, by Jeepay's clock, before `reverse`
#: closes it: the unifiedOrder request that created it has surely ended (aggregator.md §7).
CLOSE_INIT_AFTER_S = 60.0
#: `expiredTime` of every order, seconds. Jeepay closes unpaid orders past it locally, without
#: asking the channel, so it must leave Jeepay's reissue task (state-1 orders older than 10
#: minutes, every minute) time to learn a late channel success first.
EXPIRED_TIME_S = 1800
#: A further call of one `reverse` or `refund` starts only before this share of a call limit has passed.
FOLLOW_UP_SHARE = 1 / 3

WAY_CODES = ("AUTO_BAR", "WX_BAR", "ALI_BAR", "YSF_BAR")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _identifier(value: str) -> str:
    """Schema check of mch_no and app_id: as the console shows them, 1-64 letters, digits, _ or -."""
    if not _ID.fullmatch(value):
        raise ValueError(f"must be 1-64 letters, digits, '_' or '-' as the Jeepay console shows it, got {value!r}")
    return value


def app_secret_file(f: SecretFile) -> SecretFile:
    """Schema check: the app secret (应用私钥), one line of printable ASCII without spaces. A
    key file put here by mistake is named as such; the secret itself never enters the message."""
    try:
        text = f.read()
    except ConfigError as e:  # unreadable, not UTF-8: the schema names the key itself
        raise ValueError(e.reason) from None
    if text.startswith("-----BEGIN"):
        raise ValueError(f"secret file {f.path} holds a PEM key; Jeepay signs with the app's secret text "
                         "(应用私钥), one line")
    secret_text()(f)
    if not all("!" <= c <= "~" for c in text):
        raise ValueError(f"secret file {f.path} must hold the app secret as one word of printable ASCII "
                         "(no spaces)")
    return f


@dataclass(frozen=True, kw_only=True)
class JeepayOptions(HttpOptions):
    """`[providers.NAME]` of kind "jeepay". Timings: aggregator.md §7 (connect 3 s; query every
    3 s; close after 60 s; retry every 15 s), read bounded by the lane's call limit."""

    base_url: str = opt(check=gateway_url, doc="your Jeepay payment gateway (jeepay-payment): scheme, host and "
                                               "port, e.g. https://pay.example.com; no default (self-hosted)")
    mch_no: str = opt(check=_identifier, doc="商户号, from the merchant console (商户中心)")
    app_id: str = opt(check=_identifier, doc="the merchant app's AppId (应用列表)")
    app_secret_file: SecretFile = opt(check=app_secret_file, doc="file holding the app's secret (应用私钥), "
                                                                 "mode 0600")
    way_code: Literal["AUTO_BAR", "WX_BAR", "ALI_BAR", "YSF_BAR"] = opt(
        "AUTO_BAR", doc="AUTO_BAR lets Jeepay route each code by its prefix; or one fixed way")
    connect_timeout_s: float = opt(3.0, check=CONNECT_TIMEOUT, doc="TCP connect + TLS handshake, per URL")
    read_timeout_s: float = opt(6.0, check=READ_TIMEOUT,
                                doc="waiting for the answer (unifiedOrder asks the channel while we wait)")
    first_query_after_s: float = opt(3.0, check=FIRST_QUERY_AFTER,
                                     doc="an uncertain payment: wait this long before the first query")
    query_every_s: float = opt(3.0, check=QUERY_EVERY)
    reverse_after_s: float = opt(60.0, check=REVERSE_AFTER,
                                 doc="give up querying and close, counted from the pay call (>= 60: see docs)")
    retry_every_s: float = opt(15.0, check=RETRY_EVERY, doc="between close/refund retries")


# --- the protocol, pure -------------------------------------------------------------------------


def _text(value) -> str:
    """A value as Jeepay signs it: numbers as plain decimals, booleans as true/false, objects as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def sign_string(fields: dict) -> str:
    """The text Jeepay signs: `name=value&` for every field but `sign` whose value is neither null
    nor "", sorted case-insensitively (Java's CASE_INSENSITIVE_ORDER), without the key."""
    pairs = [f"{k}={_text(v)}&" for k, v in fields.items() if k != "sign" and v is not None and v != ""]
    return "".join(sorted(pairs, key=str.lower))


def md5_sign(fields: dict, secret: str) -> str:
    """Jeepay's MD5 sign of `fields` (a request, or an answer's `data`): upper-case hex."""
    text = sign_string(fields) + "key=" + secret
    return hashlib.md5(text.encode("utf-8")).hexdigest().upper()


def signed_request(fields: dict, secret: str) -> bytes:
    """The JSON body of a request: `fields` plus their `sign`, UTF-8."""
    body = dict(fields, sign=md5_sign(fields, secret))
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def channel_extra(auth_code: str) -> str:
    """unifiedOrder's `channelExtra` for a bar-code way: a string holding JSON, signed exactly as sent."""
    return json.dumps({"authCode": auth_code}, separators=(",", ":"))


def auto_bar_way(code: str) -> str | None:
    """The way Jeepay's AUTO_BAR routes a payment code to (length and prefix only, aggregator.md §2),
    or None when it refuses the code ("不支持的条码")."""
    head = int(code[:2]) if code[:2].isdigit() else -1
    if len(code) == 18 and 10 <= head <= 15:
        return "WX_BAR"
    if 16 <= len(code) <= 24 and 25 <= head <= 30:
        return "ALI_BAR"
    if len(code) == 19 and head == 62:
        return "YSF_BAR"
    return None


@dataclass(frozen=True)
class Answer:
    """A Jeepay answer whose sign verified (or a failure, which Jeepay never signs)."""

    code: int
    msg: str
    data: dict | None
    server_time_s: float  # the gateway's clock when it answered (its Date header), else ours

    @property
    def ok(self) -> bool:
        return self.code == 0

    def failure(self) -> str:
        return f"{self.code}: {self.msg}"


def parse_answer(text: str) -> dict:
    """The envelope of an answer. Decimals stay as written (they are signed as written).
    Raises ValueError when it is not a JSON object with an integer `code`."""
    envelope = json.loads(text, parse_float=Decimal)
    if not isinstance(envelope, dict) or type(envelope.get("code")) is not int:
        raise ValueError("not a Jeepay answer (no JSON object with an integer code)")
    return envelope


def answer_problem(envelope: dict, secret: str) -> str | None:
    """Why an answer must not be trusted, or None. A code-0 answer must carry `data` (an object)
    and a `sign` over it; a failure carries neither, and a sign or data it does carry must verify."""
    data, sign = envelope.get("data"), envelope.get("sign")
    if envelope["code"] != 0 and data is None and sign is None:
        return None
    if not isinstance(data, dict):
        return "a success answer without data" if data is None else "data is not an object"
    if not isinstance(sign, str) or not sign:
        return "no sign"
    try:
        expected = md5_sign(data, secret)
    except (TypeError, ValueError, RecursionError):  # a nested decimal, nesting too deep: no Jeepay data
        return "data that cannot be signed"
    if not hmac.compare_digest(expected.encode("ascii"), sign.upper().encode("utf-8")):  # str: ASCII only
        return "wrong sign"
    return None


# --- outcomes -------------------------------------------------------------------------------------

#: Pay order states (PayOrder.STATE_*): status, Jeepay's name of the state, what it means.
_ORDER_STATES = {
    0: (Status.UNKNOWN, "INIT", "order created, the channel has not answered yet"),
    1: (Status.UNKNOWN, "ING", "paying: the customer confirms, or the channel's answer is pending"),
    2: (Status.PAID, "SUCCESS", "paid"),
    3: (Status.DECLINED, "FAIL", "payment failed"),
    4: (Status.DECLINED, "CANCEL", "order revoked, not paid"),
    5: (Status.REFUNDED, "REFUND", "paid, then refunded in full"),
    6: (Status.DECLINED, "CLOSED", "order closed, not paid"),
}
#: Refund order states (RefundOrder.STATE_*).
_REFUND_STATES = {
    0: (Status.UNKNOWN, "INIT", "refund created, not yet with the channel"),
    1: (Status.UNKNOWN, "ING", "refund in progress"),
    2: (Status.REFUNDED, "SUCCESS", "refunded to the customer"),
    3: (Status.DECLINED, "FAIL", "refund failed"),
    4: (Status.DECLINED, "CLOSED", "refund closed unresolved"),
}
#: Failures Jeepay answers before it creates anything, about our own account or request (§4).
_MISCONFIGURED = frozenset({"商户或商户应用不存在", "验签失败", "不支持的支付方式", "商户应用不支持该支付方式",
                            "用户支付条码[authCode]不可为空"})
#: Failures Jeepay answers before it creates an order, about the payment code: AUTO_BAR cannot route it.
_NOT_ROUTABLE = frozenset({"条码为空", "不支持的条码"})
#: The failure of a query (pay or refund) whose order Jeepay never created: nothing moved.
_NOT_FOUND = "订单不存在"
#: A close of an order no longer in state 0 or 1 (paid meanwhile, or closed already).
_NOT_CLOSABLE = "当前订单不可关闭"


def _misconfigured(answer: Answer) -> bool:
    """Jeepay refused our credentials or request shape; it says so before creating an order."""
    return answer.msg in _MISCONFIGURED or answer.msg.endswith("不能为空")  # a required field we did not send


def order_outcome(data: dict, out_trade_no: str, funding: str | None = None) -> Outcome:
    """The Outcome of a verified pay order (`orderState` in unifiedOrder, `state` in query).
    `funding`: the way the code was routed to, when the answer does not name it (unifiedOrder)."""
    if data.get("mchOrderNo") != out_trade_no:
        return Outcome(Status.UNKNOWN, f"the answer is about order {data.get('mchOrderNo')!r}, not this one")
    state = data.get("orderState", data.get("state"))
    status, code, meaning = _ORDER_STATES.get(state, (Status.UNKNOWN, str(state), "a state this adapter "
                                                                                  "does not know"))
    txn = data.get("payOrderId") or None
    if status is Status.PAID:
        return Outcome(status, f"{code}: {meaning}", txn, code, data.get("wayCode") or funding)
    if state == 3:
        err, text = data.get("errCode") or "", mask_digit_runs(str(data.get("errMsg") or ""))
        if not err:  # WxBar maps unexpected channel exceptions to 3: such a 3 may hide a charge
            log.warning("Jeepay order %s failed without a channel code (%s): check it in the channel's bill",
                        out_trade_no, text or "no text")
        return Outcome(status, f"{err or code}: {text or meaning}", txn, err or code)
    return Outcome(status, f"{code}: {meaning}", txn, code)


def refund_outcome(data: dict, out_refund_no: str) -> Outcome:
    """The Outcome of a verified refund order (refundOrder and refund query answers)."""
    if data.get("mchRefundNo") != out_refund_no:
        return Outcome(Status.UNKNOWN, f"the answer is about refund {data.get('mchRefundNo')!r}, not this one")
    state = data.get("state")
    status, code, meaning = _REFUND_STATES.get(state, (Status.UNKNOWN, str(state), "a state this adapter "
                                                                                   "does not know"))
    err, text = data.get("errCode") or "", mask_digit_runs(str(data.get("errMsg") or ""))
    if status is Status.DECLINED and err:
        return Outcome(status, f"{err}: {text or meaning}", data.get("refundOrderId"), err)
    return Outcome(status, f"{code}: {meaning}", data.get("refundOrderId") or None, code)


def _failed(answer: Answer, status: Status, what: str) -> Outcome:
    return Outcome(status, f"{answer.failure()} ({what})", code=str(answer.code))


# --- the adapter ------------------------------------------------------------------------------


class _Unsettled(Exception):
    """No trusted answer (no answer, an HTTP error, unreadable, untrusted): the call answers `outcome`."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.reason)
        self.outcome = outcome


_JSON = {"Content-Type": "application/json; charset=UTF-8", "Accept": "application/json"}


@providers.register("jeepay", JeepayOptions)
class JeepayProvider(Provider):
    """The Jeepay merchant API through one Gateway (see the module docstring). Thread-safe: nothing
    per call is kept on self."""

    kind = "jeepay"

    def __init__(self, name: str, options: JeepayOptions, state_dir: Path | None = None):
        super().__init__(name, options.policy())
        self.options = options
        self._secret = options.app_secret_file.read()
        self._gateway = Gateway(options, key=f"providers.{name}")
        self.untrusted = UntrustedAnswers(name)
        self._follow_up_s = options.call_limit_s * FOLLOW_UP_SHARE

    # --- the five calls -----------------------------------------------------------------------

    def pay(self, req: PayRequest) -> Outcome:
        """unifiedOrder. PAID, DECLINED (the channel's decline, or a code AUTO_BAR cannot route),
        UNKNOWN (paying, any failure after routing, no answer, untrusted). Raises
        ProviderUnavailable (nothing sent) and ProviderMisconfigured (our account refused)."""
        way = self.options.way_code
        fields = {"mchOrderNo": req.out_trade_no, "wayCode": way, "amount": req.amount_fen, "currency": "CNY",
                  "subject": req.subject[:64], "body": f"{req.subject} ({req.store_id}/{req.terminal_id})"[:256],
                  "expiredTime": EXPIRED_TIME_S, "channelExtra": channel_extra(req.auth_code),
                  "extParam": json.dumps({"storeId": req.store_id, "terminalId": req.terminal_id},
                                         separators=(",", ":"))}
        try:
            answer = _scrubbed(self._call("pay", req.out_trade_no, "/api/pay/unifiedOrder", fields), req.auth_code)
        except _Unsettled as u:
            return u.outcome
        if answer.ok:
            routed = auto_bar_way(req.auth_code) if way == "AUTO_BAR" else way
            return order_outcome(answer.data, req.out_trade_no, routed)
        self._refuse_if_misconfigured(answer)
        if answer.msg in _NOT_ROUTABLE:
            return _failed(answer, Status.DECLINED, "Jeepay cannot route this payment code; no order was created")
        return _failed(answer, Status.UNKNOWN, "the order may exist: a query decides")

    def query(self, out_trade_no: str) -> Outcome:
        """PAID, DECLINED (failed, closed, or never created), REFUNDED, or UNKNOWN."""
        try:
            return self._order(out_trade_no)
        except _Unsettled as u:
            return u.outcome

    def reverse(self, out_trade_no: str) -> Outcome:
        """Jeepay has no reverse: query, then close an unpaid order. REVERSED when nothing is or
        stays charged (closed, failed, never created, refunded); DECLINED when it is paid (refund
        it); UNKNOWN when the close was refused or is not confirmed yet (call again)."""
        started = time.monotonic()
        try:
            known = self._order_answer("query", out_trade_no)
            if not known.ok:  # never created: nothing to reverse
                return self._reversed(self._order_failure(known))
            state = known.data.get("state")
            if state in (0, 1):
                return self._close(out_trade_no, known, started)
            return self._reversed(order_outcome(known.data, out_trade_no))
        except _Unsettled as u:
            return u.outcome

    def refund(self, out_trade_no: str, amount_fen: int, total_fen: int, out_refund_no: str) -> Outcome:
        """refundOrder for `amount_fen` (Jeepay knows the order's total; `total_fen` is not sent).
        A refund number Jeepay has seen is not idempotent there ("已存在"), so any refused refund is
        looked up by `out_refund_no`: the refund it finds decides; none -> DECLINED."""
        started = time.monotonic()
        fields = {"mchOrderNo": out_trade_no, "mchRefundNo": out_refund_no, "refundAmount": amount_fen,
                  "currency": "CNY", "refundReason": "cancelled at the lane"}
        try:
            answer = self._call("refund", out_trade_no, "/api/refund/refundOrder", fields)
            if answer.ok:
                return refund_outcome(answer.data, out_refund_no)
            self._refuse_if_misconfigured(answer)
            if not self._may_follow_up(started):
                return _failed(answer, Status.UNKNOWN, "the refund query decides")
            found = self._refund_answer(out_trade_no, out_refund_no)
        except _Unsettled as u:
            return u.outcome
        if found.ok:
            return refund_outcome(found.data, out_refund_no)
        if found.msg == _NOT_FOUND:
            return _failed(answer, Status.DECLINED, "refused; no refund was created")
        return _failed(found, Status.UNKNOWN, "the refund query failed")

    def query_refund(self, out_trade_no: str, out_refund_no: str) -> Outcome:
        """REFUNDED, UNKNOWN (in progress, or the query failed) or DECLINED (failed, or never created)."""
        try:
            found = self._refund_answer(out_trade_no, out_refund_no)
        except _Unsettled as u:
            return u.outcome
        if found.ok:
            return refund_outcome(found.data, out_refund_no)
        self._refuse_if_misconfigured(found)
        if found.msg == _NOT_FOUND:
            return _failed(found, Status.DECLINED, "Jeepay has no such refund")
        return _failed(found, Status.UNKNOWN, "the refund query failed")

    def close(self) -> None:
        self._gateway.close()

    # --- steps ------------------------------------------------------------------------------------

    def _order(self, out_trade_no: str) -> Outcome:
        answer = self._order_answer("query", out_trade_no)
        return order_outcome(answer.data, out_trade_no) if answer.ok else self._order_failure(answer)

    def _order_answer(self, call: str, out_trade_no: str) -> Answer:
        return self._call(call, out_trade_no, "/api/pay/query", {"mchOrderNo": out_trade_no})

    def _order_failure(self, answer: Answer) -> Outcome:
        """A failed query: "订单不存在" means Jeepay never created the order, so nothing was charged."""
        self._refuse_if_misconfigured(answer)
        if answer.msg == _NOT_FOUND:
            return _failed(answer, Status.DECLINED, "Jeepay never received this order; nothing was charged")
        return _failed(answer, Status.UNKNOWN, "the query failed")

    def _refund_answer(self, out_trade_no: str, out_refund_no: str) -> Answer:
        return self._call("refund query", out_trade_no, "/api/refund/query", {"mchRefundNo": out_refund_no})

    @staticmethod
    def _reversed(out: Outcome) -> Outcome:
        """What a reverse makes of the order's state: paid -> DECLINED (refund it), unpaid or
        refunded -> REVERSED, still open -> UNKNOWN."""
        if out.status is Status.PAID:
            return Outcome(Status.DECLINED, f"{out.code}: the order is paid; Jeepay cannot reverse it, refund "
                                            "instead", out.platform_txn_id, out.code, out.funding_source)
        if out.status in (Status.DECLINED, Status.REFUNDED):
            return Outcome(Status.REVERSED, f"{out.reason}: nothing stays charged", out.platform_txn_id, out.code)
        return out

    def _close(self, out_trade_no: str, known: Answer, started: float) -> Outcome:
        """Close an order in state 0 or 1, then confirm by query that it is closed (6)."""
        if known.data.get("state") == 0 and not _init_is_over(known):
            return Outcome(Status.UNKNOWN, "INIT: the order may still be with the channel; closing it waits until "
                                           f"it is {CLOSE_INIT_AFTER_S:g} s old", code="INIT")
        if not self._may_follow_up(started):
            return Outcome(Status.UNKNOWN, "the query took too long to close in the same call; close again")
        closed = self._call("close", out_trade_no, "/api/pay/close", {"mchOrderNo": out_trade_no})
        if not closed.ok:
            self._refuse_if_misconfigured(closed)
            why = "the order changed meanwhile" if closed.msg == _NOT_CLOSABLE else "close again later"
            return _failed(closed, Status.UNKNOWN, why)
        if not self._may_follow_up(started):
            return Outcome(Status.UNKNOWN, "closed; the next query confirms it", code="0")
        return self._reversed(self._order(out_trade_no))

    def _may_follow_up(self, started: float) -> bool:
        return time.monotonic() - started <= self._follow_up_s

    def _refuse_if_misconfigured(self, answer: Answer) -> None:
        if _misconfigured(answer):
            raise ProviderMisconfigured(f"Jeepay refused our request ({answer.failure()}): check mch_no, app_id, "
                                        "app_secret_file and way_code against the merchant console")

    # --- transport ------------------------------------------------------------------------------

    def _call(self, call: str, out_trade_no: str, path: str, fields: dict) -> Answer:
        """One signed request and its verified answer. Raises _Unsettled (UNKNOWN: no answer, an
        HTTP error, unreadable, untrusted), ProviderUnavailable (nothing sent) or
        ProviderMisconfigured (no Jeepay merchant API at this address)."""
        common = {"mchNo": self.options.mch_no, "appId": self.options.app_id,
                  "reqTime": str(int(time.time() * 1000)), "version": "1.0", "signType": "MD5"}
        body = signed_request({**common, **fields}, self._secret)
        try:
            reply = self._gateway.request("POST", path, body=body, headers=_JSON)
        except NoAnswer as e:
            raise _Unsettled(Outcome(Status.UNKNOWN, f"no answer from Jeepay ({e})")) from None
        if reply.status in (404, 405):  # no handler ran: the address is not a Jeepay gateway's
            raise ProviderMisconfigured(f"{reply.base_url}{path} answers HTTP {reply.status}: no Jeepay merchant "
                                        "API there; check base_url")
        if reply.status != 200:
            raise _Unsettled(Outcome(Status.UNKNOWN, f"HTTP {reply.status} from Jeepay"))
        try:
            envelope = parse_answer(reply.text())
        except (NoAnswer, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
            raise _Unsettled(Outcome(Status.UNKNOWN, f"unreadable answer from Jeepay ({type(e).__name__})")) from None
        why = answer_problem(envelope, self._secret)
        if why is not None:
            raise _Unsettled(self.untrusted.outcome(call, out_trade_no, why))
        return Answer(envelope["code"], str(envelope.get("msg") or ""), envelope.get("data"),
                      _server_time(reply.headers.get("date")))


def _scrubbed(answer: Answer, secret: str) -> Answer:
    """A verified answer with `secret` (the payment code) masked in `msg` and in `data`'s texts: a
    channel's error text, passed on as `msg` or `errMsg`, may quote the request it refused."""
    def clean(v):
        return v.replace(secret, mask(secret)) if isinstance(v, str) and secret else v
    data = {k: clean(v) for k, v in answer.data.items()} if isinstance(answer.data, dict) else answer.data
    return dataclasses.replace(answer, msg=clean(answer.msg), data=data)


def _server_time(date_header: str | None) -> float:
    """The gateway's clock from its Date header (seconds since the epoch), else this lane's."""
    try:
        return email.utils.parsedate_to_datetime(date_header).timestamp()
    except (TypeError, ValueError, IndexError):
        return time.time()


def _init_is_over(known: Answer) -> bool:
    """Whether an order in state 0 is old enough to close, by the gateway's own clock."""
    created_ms = known.data.get("createdAt")
    if type(created_ms) is not int:
        return False  # its age is unknown: wait for the channel's answer, or for its expiry
    return known.server_time_s - created_ms / 1000 >= CLOSE_INIT_AFTER_S

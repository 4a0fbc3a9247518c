"""A Jeepay gateway's merchant API (`jeepay-payment`) over a Ledger: `appliance simulate jeepay`.

It speaks what appliance/payments/jeepay.py speaks (facts: ../shared/reference/aggregator.md): JSON
requests signed with the app secret, which it checks over the endpoint's declared fields only
(a signed extra field fails, as on Jeepay), answering "验签失败" to a bad sign; answers signed
with the same secret, failures unsigned. It keeps Jeepay's order rows beside the ledger's books
(`orders`: way, ids, creation time), and shows the ledger's trades in Jeepay's states:

    PAYING 1, SUCCESS 2, PAYERROR 3 (errCode/errMsg of the channel the code was routed to),
    CLOSED 6, REFUND 5; and 0 while a slow unifiedOrder (scenario 97) has not answered yet.

Jeepay's rules it keeps: AUTO_BAR routes a code by length and prefix; a repeated mchOrderNo is
refused ("已存在") whatever it carries; close takes only state 0 or 1, and closing 0 is local (the
channel is not told; the ledger keeps any money it took, which is the hazard the adapter avoids);
a refund needs a paid order, money left, no other refund in flight, and a new mchRefundNo.

Scenarios (ledger.py) in Jeepay's words: 80 damages the unifiedOrder answer's sign; 81's close
answers a channel failure while the ledger says retry; 94 answers "系统异常" after the channel
took the money (the query shows it paid); 96 and 97 are delivered as the base class does.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.payments.jeepay import WAY_CODES, auto_bar_way, md5_sign
from appliance.simulators import Answer, Request, Simulator
from appliance.simulators.ledger import Decline, Refund, Reverse, Trade

MCH_NO = "M1700000001"
APP_ID = "66a1f0c2e4b0a1b2c3d4e5f6"
SECRET_FILE = "jeepay-app-secret"
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

#: The fields each endpoint's request class declares; anything else is dropped before the sign is checked.
_COMMON = ("mchNo", "appId", "reqTime", "version", "signType", "sign")
_ORDER_KEYS = _COMMON + ("payOrderId", "mchOrderNo")
_ENDPOINTS = {
    "/api/pay/unifiedOrder": _COMMON + ("mchOrderNo", "wayCode", "amount", "currency", "subject", "body", "clientIp",
                                        "notifyUrl", "returnUrl", "expiredTime", "channelExtra", "extParam",
                                        "divisionMode"),
    "/api/pay/query": _ORDER_KEYS,
    "/api/pay/close": _ORDER_KEYS,
    "/api/refund/refundOrder": _ORDER_KEYS + ("mchRefundNo", "refundAmount", "currency", "refundReason", "clientIp",
                                              "notifyUrl", "channelExtra", "extParam"),
    "/api/refund/query": _COMMON + ("refundOrderId", "mchRefundNo"),
}
_POST_ONLY = {"/api/pay/unifiedOrder", "/api/refund/refundOrder"}
_REQUIRED_COMMON = (("version", "版本号不能为空"), ("sign", "签名值不能为空"), ("reqTime", "时间戳不能为空"),
                    ("mchNo", "商户号不能为空"), ("appId", "商户应用ID不能为空"), ("signType", "签名类型不能为空"))
_REQUIRED_PAY = (("mchOrderNo", "商户订单号不能为空"), ("wayCode", "支付方式不能为空"), ("amount", "支付金额不能为空"),
                 ("currency", "货币代码不能为空"), ("subject", "商品标题不能为空"), ("body", "商品描述信息不能为空"))
_REQUIRED_REFUND = (("mchRefundNo", "商户退款单号不能为空"), ("refundAmount", "退款金额不能为空"),
                    ("currency", "货币代码不能为空"), ("refundReason", "退款原因不能为空"))

_IF_CODES = {"WX_BAR": "wxpay", "ALI_BAR": "alipay", "YSF_BAR": "ysfpay"}
_WX_DECLINES = {Decline.NOT_ENOUGH: ("NOTENOUGH", "用户余额不足"),
                Decline.EXPIRED: ("AUTHCODEEXPIRE", "二维码已过期，请用户在微信上刷新后再试"),
                Decline.INVALID: ("AUTH_CODE_INVALID", "授权码检验错误"),
                Decline.CODE_USED: ("AUTHCODEEXPIRE", "每个二维码仅限使用一次，请刷新再试")}
_ALI_INVALID = ("ACQ.PAYMENT_AUTH_CODE_INVALID", "Business Failed【支付失败，获取顾客账户信息失败，请顾客刷新付款码后重新收款】")
_ALI_DECLINES = {Decline.NOT_ENOUGH: ("ACQ.BUYER_BALANCE_NOT_ENOUGH", "Business Failed【买家余额不足】"),
                 Decline.EXPIRED: _ALI_INVALID, Decline.INVALID: _ALI_INVALID, Decline.CODE_USED: _ALI_INVALID}
#: The channel's decline code and text by way. UnionPay's codes are not confirmed from source
#: (aggregator.md §9): its way borrows WeChat's.
_DECLINES = {"WX_BAR": _WX_DECLINES, "ALI_BAR": _ALI_DECLINES, "YSF_BAR": _WX_DECLINES}
_LEDGER_STATES = {"PAYING": 1, "SUCCESS": 2, "PAYERROR": 3, "CLOSED": 6, "REFUND": 5}


@dataclass
class Order:
    """What Jeepay's order row holds beside the ledger's trade."""

    mch_order_no: str
    pay_order_id: str
    way_code: str
    amount: int
    currency: str
    subject: str
    body: str
    ext_param: str | None
    client_ip: str
    created_ms: int  # Jeepay's createdAt
    answering_until: float = 0.0  # monotonic: its unifiedOrder has not answered before this (state 0)
    closed_locally: bool = False  # closed in state 0: Jeepay shows 6, whatever the channel did


class _Refused(Exception):
    """A failure answer `{"code": code, "msg": msg}`."""

    def __init__(self, msg: str, code: int = 9999):
        super().__init__(msg)
        self.code = code
        self.msg = msg


class JeepaySimulator(Simulator):
    """The Jeepay gateway for one merchant app (MCH_NO, APP_ID, the secret in `keys_dir`)."""

    kind = "jeepay"

    def __init__(self, keys_dir: Path, ledger=None, *, port: int = 0, tls=None):
        self.orders: dict[str, Order] = {}  # by mchOrderNo
        self._lock = threading.RLock()  # one request's reads and writes of the books at a time
        super().__init__(keys_dir, ledger, port=port, tls=tls)

    # --- keys and config ------------------------------------------------------------------------

    @property
    def secret_file(self) -> Path:
        return self.keys_dir / SECRET_FILE

    def make_keys(self) -> None:
        """The app secret (128 letters and digits, as the console generates), mode 0600, unless it exists."""
        if not self.secret_file.exists():
            secret = "".join(secrets.choice(_ALNUM) for _ in range(128))
            self.secret_file.touch(mode=0o600)
            self.secret_file.write_text(secret + "\n")

    @property
    def secret(self) -> str:
        return self.secret_file.read_text().strip()

    def provider_options(self) -> dict:
        return {"kind": "jeepay", "base_url": self.url, "mch_no": MCH_NO, "app_id": APP_ID,
                "app_secret_file": str(self.secret_file)}

    # --- requests ----------------------------------------------------------------------------------

    def handle(self, req: Request) -> Answer:
        declared = _ENDPOINTS.get(req.path)
        if declared is None:
            return _spring(404, "Not Found", req.path)
        if req.path in _POST_ONLY and req.method != "POST":
            return _spring(405, "Method Not Allowed", req.path)
        route = {"/api/pay/unifiedOrder": self._pay, "/api/pay/query": self._query, "/api/pay/close": self._close,
                 "/api/refund/refundOrder": self._refund, "/api/refund/query": self._query_refund}[req.path]
        try:
            rq = {k: v for k, v in _params(req).items() if k in declared}
            self._authenticate(rq)
            with self._lock:
                return route(rq)
        except _Refused as r:
            return _json({"code": r.code, "msg": r.msg})

    def _authenticate(self, rq: dict) -> None:
        _require(rq, _REQUIRED_COMMON)
        if rq["mchNo"] != MCH_NO or rq["appId"] != APP_ID:
            raise _Refused("商户或商户应用不存在")
        if str(rq["sign"]).upper() != md5_sign(rq, self.secret):
            raise _Refused("验签失败")

    def _ok(self, data: dict, *, forged: bool = False) -> Answer:
        """A signed success answer (fastjson: keys sorted, nulls left out); `forged` damages its sign."""
        data = {k: v for k, v in data.items() if v is not None}
        sign = md5_sign(data, self.secret)
        if forged:
            sign = ("0" if sign[0] != "0" else "1") + sign[1:]
        return _json({"code": 0, "data": data, "msg": "SUCCESS", "sign": sign})

    # --- pay orders ------------------------------------------------------------------------------

    def _pay(self, rq: dict) -> Answer:
        self.ledger.count("pay")
        _require(rq, _REQUIRED_PAY)
        amount = _whole(rq["amount"], "支付金额不能为空")
        code = _auth_code(rq.get("channelExtra"))
        way = _route(rq["wayCode"], code)
        no = rq["mchOrderNo"]
        if no in self.orders or no in self.ledger.trades:
            raise _Refused(f"商户订单[{no}]已存在")
        trade, new = self.ledger.pay(no, code, amount)
        order = Order(no, "P" + trade.transaction_id[-19:], way, amount, str(rq["currency"]), str(rq["subject"]),
                      str(rq["body"]), rq.get("extParam"), str(rq.get("clientIp") or "127.0.0.1"),
                      int(trade.created * 1000))
        self.orders[no] = order
        if trade.scenario == "94":  # the channel took the money, then failed: Jeepay answers its exception
            return self.deliver(trade, new, _json({"code": 9999, "msg": "系统异常"}))
        if trade.scenario == "97":
            order.answering_until = time.monotonic() + self.ledger.slow_s
        # The answer carries the channel's result (a slow one arrives only once the row has it too).
        data = {"mchOrderNo": no, "payOrderId": order.pay_order_id, "orderState": _LEDGER_STATES[trade.state],
                "payDataType": "none", "payData": "", **self._channel_error(order, trade)}
        return self.deliver(trade, new, self._ok(data, forged=self.forged(trade)))

    def _query(self, rq: dict) -> Answer:
        self.ledger.count("query")
        order = self._order(rq)
        trade = self.ledger.query(order.mch_order_no)
        state = self._state(order, trade)
        data = {"payOrderId": order.pay_order_id, "mchNo": MCH_NO, "appId": APP_ID, "mchOrderNo": order.mch_order_no,
                "ifCode": _IF_CODES[order.way_code], "wayCode": order.way_code, "amount": order.amount,
                "currency": order.currency, "state": state, "clientIp": order.client_ip, "subject": order.subject,
                "body": order.body, "extParam": order.ext_param, "createdAt": order.created_ms}
        if state == 2:
            data |= {"channelOrderNo": trade.transaction_id, "successTime": int((trade.paid_at or 0) * 1000)}
        return self._ok(data | self._channel_error(order, trade))

    def _close(self, rq: dict) -> Answer:
        """Jeepay's close: state 0 closed locally; state 1 through the channel, which may refuse."""
        self.ledger.count("close")
        order = self._order(rq)
        trade = self.ledger.trades[order.mch_order_no]
        state = self._state(order, trade)
        if state not in (0, 1):
            raise _Refused("当前订单不可关闭")
        if state == 0:
            order.closed_locally = True
            return self._ok({})
        verdict, trade = self.ledger.reverse(order.mch_order_no)  # counts the attempt: scenario 81
        if verdict is Reverse.RETRY:
            raise _Refused("系统繁忙，请稍后再试")  # the channel's close failed; the order stays 1
        if trade.state == "PAYING":  # Reverse.EXPIRED: the ledger's reverse window; a close has none
            self.ledger.close(order.mch_order_no)
        return self._ok({})

    def _order(self, rq: dict) -> Order:
        """The order a query, close or refund names (payOrderId wins). Raises "订单不存在"."""
        pay_order_id, no = rq.get("payOrderId"), rq.get("mchOrderNo")
        if not pay_order_id and not no:
            raise _Refused("mchOrderNo 和 payOrderId 不能同时为空")
        if pay_order_id:
            order = next((o for o in self.orders.values() if o.pay_order_id == pay_order_id), None)
        else:
            order = self.orders.get(no)
        if order is None:
            raise _Refused("订单不存在")
        return order

    @staticmethod
    def _state(order: Order, trade: Trade) -> int:
        if order.closed_locally:
            return 6
        if time.monotonic() < order.answering_until:
            return 0  # the channel has answered the ledger; Jeepay's row has not been updated yet
        return _LEDGER_STATES[trade.state]

    @staticmethod
    def _channel_error(order: Order, trade: Trade) -> dict:
        if trade.state != "PAYERROR" or trade.decline is None:
            return {}
        err_code, err_msg = _DECLINES[order.way_code][trade.decline]
        return {"errCode": err_code, "errMsg": err_msg}

    # --- refunds ---------------------------------------------------------------------------------

    def _refund(self, rq: dict) -> Answer:
        self.ledger.count("refund")
        _require(rq, _REQUIRED_REFUND)
        amount = _whole(rq["refundAmount"], "退款金额不能为空")
        order = self._order(rq)
        trade = self.ledger.trades[order.mch_order_no]
        mine = [r for r in self.ledger.refunds.values() if r.out_trade_no == order.mch_order_no]
        if self._state(order, trade) != 2:
            raise _Refused("订单状态不正确， 无法完成退款")
        if amount > order.amount - sum(r.amount_fen for r in mine if r.state == "SUCCESS"):
            raise _Refused("申请金额超出订单可退款余额，请检查退款金额")
        if any(r.state == "PROCESSING" for r in mine):
            raise _Refused("支付订单具有在途退款申请，请稍后再试")
        if rq["mchRefundNo"] in self.ledger.refunds:
            raise _Refused(f"商户退款订单号[{rq['mchRefundNo']}]已存在")
        refund = self.ledger.refund(order.mch_order_no, rq["mchRefundNo"], amount)
        if not isinstance(refund, Refund):
            raise _Refused(f"系统异常[{refund}]")
        return self._ok(_refund_data(refund, order))

    def _query_refund(self, rq: dict) -> Answer:
        self.ledger.count("refund_query")
        refund_no = rq.get("mchRefundNo")
        if rq.get("refundOrderId"):
            refund_no = next((r.out_refund_no for r in self.ledger.refunds.values()
                              if "R" + r.refund_id[-19:] == rq["refundOrderId"]), None)
        elif not refund_no:
            raise _Refused("mchRefundNo 和 refundOrderId不能同时为空")
        refund = self.ledger.query_refund(refund_no) if refund_no else None
        if refund is None:
            raise _Refused("订单不存在")
        order = self.orders[refund.out_trade_no]
        data = _refund_data(refund, order) | {"payOrderId": order.pay_order_id, "mchNo": MCH_NO, "appId": APP_ID,
                                              "currency": order.currency, "createdAt": order.created_ms}
        return self._ok(data)


def _refund_data(refund: Refund, order: Order) -> dict:
    return {"refundOrderId": "R" + refund.refund_id[-19:], "mchRefundNo": refund.out_refund_no,
            "payAmount": order.amount, "refundAmount": refund.amount_fen,
            "state": 2 if refund.state == "SUCCESS" else 1, "channelOrderNo": refund.refund_id}


def _params(req: Request) -> dict:
    """The request's parameters: its JSON object (a JSON POST), else its query string and form."""
    if "application/json" in req.headers.get("content-type", "") and req.method != "GET":
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _Refused("参数有误[转换异常]", code=11)
        return body
    return {**req.query, **req.form()}


def _require(rq: dict, fields) -> None:
    for name, message in fields:
        if rq.get(name) in (None, ""):
            raise _Refused(message)


def _whole(value, message: str) -> int:
    """A Long field of at least 1 (fen)."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise _Refused(f"系统异常[{type(value).__name__} cannot be cast to Long]", code=10) from None
    if n < 1 or str(n) != str(value).strip():
        raise _Refused(message)
    return n


def _auth_code(channel_extra) -> str:
    """The payment code in channelExtra (a string holding JSON; smart match takes auth_code too)."""
    if channel_extra in (None, ""):
        return ""
    try:
        extra = json.loads(channel_extra) if isinstance(channel_extra, str) else None
    except ValueError:
        extra = None
    if not isinstance(extra, dict):
        raise _Refused("系统异常[channelExtra is not a JSON object]", code=10)
    return str(extra.get("authCode") or extra.get("auth_code") or "")


def _route(way: str, code: str) -> str:
    """The way the order is stored with (AUTO_BAR resolved by the code's length and prefix)."""
    if way == "AUTO_BAR":
        if not code:
            raise _Refused("条码为空")
        way = auto_bar_way(code) or ""
        if not way:
            raise _Refused("不支持的条码")
    elif way not in WAY_CODES:
        raise _Refused("不支持的支付方式")
    if not code:
        raise _Refused("用户支付条码[authCode]不可为空")
    return way


def _json(envelope: dict) -> Answer:
    body = json.dumps(envelope, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return Answer(200, body, {"Content-Type": "application/json;charset=UTF-8"})


def _spring(status: int, error: str, path: str) -> Answer:
    """Spring Boot's own answer to a path or method no controller takes."""
    body = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime()), "status": status,
            "error": error, "path": path}
    return Answer(status, json.dumps(body).encode(), {"Content-Type": "application/json"})


SIMULATOR = JeepaySimulator

"""WeChat Pay APIv3 code payment, simulated over loopback HTTP for `kind = "wechat_v3"`.

It checks every request as WeChat Pay does: the `Authorization` header must be
WECHATPAY2-SHA256-RSA2048 for our merchant number and merchant certificate serial, its timestamp
within 5 minutes, its signature valid with the merchant's public key over
`METHOD\\nURL\\nTIMESTAMP\\nNONCE\\nBODY\\n`. A request that fails is refused with
`401 {"code": "SIGN_ERROR"}` and no answer signature (WeChat signs only answers to requests it
accepted). Every other answer is signed with the platform key, `Wechatpay-Serial` naming the
public key id.

The ledger's outcomes in WeChat's words:

    pay, new trade     paid: 200 transaction; paying: 202 {"trade_state":"USERPAYING"};
                       declined: 403 NOT_ENOUGH, 400 AUTH_CODE_EXPIRED, 400 AUTH_CODE_INVALID
                       (invalid code; or used before: "每个付款码仅限使用一次");
                       scenario 94: 500 SYSTEM_ERROR (the money was taken)
    pay, repeated      the trade as it stands; a closed number: 403 ORDER_CLOSED; refunded: 403 ORDER_PAID
    query              200 with trade_state SUCCESS, USERPAYING, PAYERROR, CLOSED (REVOKED once
                       reversed), REFUND; 404 ORDER_NOT_EXIST
    reverse            200 {appid, mchid, out_trade_no}; 500 SYSTEM_ERROR while the ledger says
                       retry (81); 403 REVERSE_EXPIRE outside the window
    refund             200 with status PROCESSING or SUCCESS; 404 RESOURCE_NOT_EXISTS (no trade);
                       400 INVALID_REQUEST (not paid); 400 PARAM_ERROR (amounts)
    query_refund       200 with status; 404 RESOURCE_NOT_EXISTS

The pay answer of scenario 80 goes out with a damaged signature; 96 and 97 are delivered by
`Simulator.deliver` (dropped, late).

The daily bill (payments.md §8.1), the file written by appliance/simulators/wechat_bill.py:

    tradebill          GET /v3/bill/tradebill?bill_date=YYYY-MM-DD[&bill_type=ALL][&tar_type=GZIP]:
                       200 {hash_type SHA1, hash_value, download_url}; 400 PARAM_ERROR (a malformed
                       date, another bill_type or tar_type); 400 INVALID_REQUEST (older than three
                       months); 400 STATEMENT_CREATING (today or later, or before 09:00 of the next day,
                       by the ledger's clock); 400 NO_STATEMENT_EXIST (no money moved)
    billdownload       GET /v3/billdownload/file?token=...: the file (gzip if asked), unsigned, no
                       Wechatpay-* headers; the request's Authorization is checked over path and
                       query. 400 INVALID_REQUEST once the link is older than `bill_link_s`
                       (30 s, real time).

Test switches: `bill_fault` (wechat_bill.BILL_FAULTS: a wrong hash announced, a summary that
disagrees, a file that is not UTF-8, a plain file when gzip was asked), `bill_link_base` (the
address the download link names, default this simulator's).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlencode

from appliance.payments.keys import generate_rsa, load_private_key, load_public_key, rsa_sign, rsa_verify
from appliance.schema import SecretFile
from appliance.simulators import Answer, Request, Simulator
from appliance.simulators.ledger import Decline, Refund, RefundError, Reverse, Trade
from appliance.simulators.wechat_bill import Refusal, bill_text, packed, refusal

MCHID = "1900000109"
APPID = "wxd678efh567hg6787"
MERCHANT_SERIAL = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"
PUBLIC_KEY_ID = "PUB_KEY_ID_0119000001092024112600000000000001"
SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"

_AUTH = re.compile(r'(\w+)="([^"]*)"')
_TRADE = re.compile(r"/v3/pay/transactions/out-trade-no/(?P<number>[^/]+)(?P<reverse>/reverse)?")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
BILL_PATH = "/v3/bill/tradebill"
DOWNLOAD_PATH = "/v3/billdownload/file"
#: The bill's answers when the day has none to give.
BILL_REFUSALS = {Refusal.OUT_OF_RANGE: ("INVALID_REQUEST", "账单日期超出可下载范围（近三个月）"),
                 Refusal.CREATING: ("STATEMENT_CREATING", "账单生成中"),
                 Refusal.EMPTY: ("NO_STATEMENT_EXIST", "请求的账单文件不存在")}

#: Ledger declines -> (HTTP status, code, message).
DECLINES = {
    Decline.NOT_ENOUGH: (403, "NOT_ENOUGH", "用户账号余额不足"),
    Decline.EXPIRED: (400, "AUTH_CODE_EXPIRED", "付款码已过期，请刷新后重新支付"),
    Decline.INVALID: (400, "AUTH_CODE_INVALID", "付款码无效，请重新扫码"),
    Decline.CODE_USED: (400, "AUTH_CODE_INVALID", "每个付款码仅限使用一次，请刷新后重新支付"),
}
#: Ledger funding -> bank_type ("OTHERS" is WeChat's word for the wallet's balance).
BANK_TYPES = {"wallet": "OTHERS", "card": "CMB_DEBIT"}


class WechatV3Simulator(Simulator):
    kind = "wechat_v3"
    #: How long a bill's download link works, in real seconds.
    bill_link_s = 30.0
    bill_fault: str | None = None
    bill_link_base: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._links: dict[str, tuple[float, bytes]] = {}  # token -> (made, monotonic; the file as served)
        self._links_lock = threading.Lock()

    # --- keys ---

    @property
    def merchant_key_file(self) -> Path:
        return self.keys_dir / "apiclient_key.pem"

    @property
    def merchant_public_file(self) -> Path:
        return self.keys_dir / "merchant_pub.pem"

    @property
    def platform_key_file(self) -> Path:
        return self.keys_dir / "wechatpay_private.pem"

    @property
    def platform_public_file(self) -> Path:
        return self.keys_dir / "pub_key.pem"

    def make_keys(self) -> None:
        for private, public in ((self.merchant_key_file, self.merchant_public_file),
                                (self.platform_key_file, self.platform_public_file)):
            if not (private.exists() and public.exists()):
                generate_rsa(private, public)
        self._merchant_public = load_public_key(self.merchant_public_file)
        self._platform_key = load_private_key(SecretFile(self.platform_key_file))

    def provider_options(self) -> dict:
        return {"kind": "wechat_v3", "base_url": self.url, "backup_base_urls": [], "mchid": MCHID, "appid": APPID,
                "merchant_serial": MERCHANT_SERIAL, "merchant_key_file": str(self.merchant_key_file),
                "platform_public_key_id": PUBLIC_KEY_ID, "platform_public_key_file": str(self.platform_public_file)}

    # --- requests ---

    def handle(self, req: Request) -> Answer:
        call, number = self._route(req)
        if call is None:
            return self._signed(404, {"code": "NOT_FOUND", "message": "无此接口"})
        self.ledger.count(call)
        refused = self._refuse_signature(req)
        if refused:
            return Answer(401, json.dumps({"code": "SIGN_ERROR", "message": refused}, ensure_ascii=False).encode(),
                          {"Content-Type": "application/json"})
        try:
            doc = json.loads(req.body) if req.body else {}
        except ValueError:
            return self._signed(400, {"code": "INVALID_REQUEST", "message": "请求体不是 JSON"})
        wrong = self._wrong_account(call, doc, req.query)
        if wrong is not None:
            return wrong
        if call in ("bill", "bill_download"):
            return getattr(self, f"_{call}")(req.query)
        return getattr(self, f"_{call}")(doc, number)

    @staticmethod
    def _route(req: Request) -> tuple[str | None, str]:
        if req.method == "POST" and req.path == "/v3/pay/transactions/codepay":
            return "pay", ""
        if req.method == "POST" and req.path == "/v3/refund/domestic/refunds":
            return "refund", ""
        if req.method == "GET" and req.path in (BILL_PATH, DOWNLOAD_PATH):
            return ("bill" if req.path == BILL_PATH else "bill_download"), ""
        if req.method == "GET" and req.path.startswith("/v3/refund/domestic/refunds/"):
            return "query_refund", req.path.rsplit("/", 1)[1]
        trade = _TRADE.fullmatch(req.path)
        if trade and req.method == "GET" and not trade["reverse"]:
            return "query", unquote(trade["number"])
        if trade and req.method == "POST" and trade["reverse"]:
            return "reverse", unquote(trade["number"])
        return None, ""

    def _refuse_signature(self, req: Request) -> str:
        """Why WeChat Pay would refuse this request's signature ("" when it is good)."""
        scheme, _, params = req.headers.get("authorization", "").partition(" ")
        fields = dict(_AUTH.findall(params))
        if scheme != SIGNATURE_TYPE or not {"mchid", "nonce_str", "signature", "timestamp", "serial_no"} <= set(fields):
            return "Authorization 头格式错误"
        if fields["mchid"] != MCHID or fields["serial_no"].upper() != MERCHANT_SERIAL:
            return "商户号或商户证书序列号错误"
        if not fields["timestamp"].isdigit() or abs(time.time() - int(fields["timestamp"])) > 300:
            return "时间戳与微信支付服务器时间相差超过5分钟"
        url = req.path + (f"?{urlencode(req.query)}" if req.query else "")
        signed = "\n".join((req.method, url, fields["timestamp"], fields["nonce_str"], "")).encode() + req.body + b"\n"
        if not rsa_verify(self._merchant_public, signed, fields["signature"]):
            return "签名错误，请检查后再试"
        return ""

    def _wrong_account(self, call: str, doc: dict, query: dict) -> Answer | None:
        mchid = query.get("mchid") if call == "query" else doc.get("mchid", MCHID)
        if call in ("pay", "reverse") and doc.get("appid") != APPID:
            return self._signed(400, {"code": "APPID_MCHID_NOT_MATCH", "message": "AppID和mch_id不匹配"})
        if mchid != MCHID:
            return self._signed(400, {"code": "MCH_NOT_EXISTS", "message": "商户号不存在"})
        return None

    # --- the calls ---

    def _pay(self, doc: dict, _: str) -> Answer:
        try:
            out_trade_no, auth_code = doc["out_trade_no"], doc["payer"]["auth_code"]
            total, currency = doc["amount"]["total"], doc["amount"].get("currency", "CNY")
            doc["description"], doc["scene_info"]["store_info"]["out_id"]  # noqa: B018 - required fields
        except (KeyError, TypeError):
            return self._signed(400, {"code": "PARAM_ERROR", "message": "缺少必填参数"})
        if not isinstance(total, int) or isinstance(total, bool) or total < 1 or currency != "CNY":
            return self._signed(400, {"code": "PARAM_ERROR", "message": "amount.total 须为正整数（分），币种 CNY"})
        trade, new = self.ledger.pay(out_trade_no, auth_code, total)
        answer = self._pay_answer(trade, new, doc)
        if self.forged(trade):
            answer.headers["Wechatpay-Signature"] = _damaged(answer.headers["Wechatpay-Signature"])
        return self.deliver(trade, new, answer)

    def _pay_answer(self, trade: Trade, new: bool, doc: dict) -> Answer:
        if trade.state == "SUCCESS" and new and trade.scenario == "94":
            return self._signed(500, {"code": "SYSTEM_ERROR", "message": "系统繁忙，请稍后重试"})
        if trade.state == "SUCCESS":
            return self._signed(200, self._transaction(trade, doc.get("scene_info", {}).get("device_id")))
        if trade.state == "PAYING":
            return self._signed(202, {"trade_state": "USERPAYING"})
        if trade.state == "PAYERROR":
            status, code, message = DECLINES[trade.decline]
            return self._signed(status, {"code": code, "message": message})
        if trade.state == "CLOSED":
            return self._signed(403, {"code": "ORDER_CLOSED", "message": "订单已关闭"})
        return self._signed(403, {"code": "ORDER_PAID", "message": "订单已支付"})  # REFUND

    def _query(self, _: dict, out_trade_no: str) -> Answer:
        trade = self.ledger.query(out_trade_no)
        if trade is None:
            return self._signed(404, {"code": "ORDER_NOT_EXIST", "message": "订单不存在"})
        return self._signed(200, self._transaction(trade))

    def _reverse(self, _: dict, out_trade_no: str) -> Answer:
        result, trade = self.ledger.reverse(out_trade_no)
        if result is Reverse.RETRY:
            return self._signed(500, {"code": "SYSTEM_ERROR", "message": "系统错误，请使用相同参数再次调用撤销"})
        if result is Reverse.EXPIRED:
            return self._signed(403, {"code": "REVERSE_EXPIRE", "message": "订单已超过撤销期限，请使用退款"})
        return self._signed(200, {"appid": APPID, "mchid": MCHID, "out_trade_no": out_trade_no})

    def _refund(self, doc: dict, _: str) -> Answer:
        try:
            out_trade_no, out_refund_no = doc["out_trade_no"], doc["out_refund_no"]
            amount, total = doc["amount"]["refund"], doc["amount"]["total"]
        except (KeyError, TypeError):
            return self._signed(400, {"code": "PARAM_ERROR", "message": "缺少必填参数"})
        refund = self.ledger.refund(out_trade_no, out_refund_no, amount, total)
        if refund is RefundError.NOT_PAID:
            if out_trade_no not in self.ledger.trades:
                return self._signed(404, {"code": "RESOURCE_NOT_EXISTS", "message": "订单不存在"})
            return self._signed(400, {"code": "INVALID_REQUEST", "message": "订单未支付，不能退款"})
        if refund is RefundError.AMOUNT:
            return self._signed(400, {"code": "PARAM_ERROR", "message": "退款金额或订单金额错误"})
        return self._signed(200, self._refund_doc(refund))

    def _query_refund(self, _: dict, out_refund_no: str) -> Answer:
        refund = self.ledger.query_refund(out_refund_no)
        if refund is None:
            return self._signed(404, {"code": "RESOURCE_NOT_EXISTS", "message": "退款单不存在"})
        return self._signed(200, self._refund_doc(refund))

    def _bill(self, query: dict[str, str]) -> Answer:
        date, kind, tar = query.get("bill_date", ""), query.get("bill_type", "ALL"), query.get("tar_type", "")
        try:
            day = dt.date.fromisoformat(date) if _DATE.fullmatch(date) else None
        except ValueError:
            day = None
        if day is None or kind != "ALL" or tar not in ("", "GZIP"):
            return self._signed(400, {"code": "PARAM_ERROR", "message": "bill_date 须为 yyyy-MM-dd，本模拟器只提供 "
                                                                        "bill_type=ALL，tar_type 为空或 GZIP"})
        why = refusal(self.ledger, day)
        if why is not None:
            code, message = BILL_REFUSALS[why]
            return self._signed(400, {"code": code, "message": message})
        text = bill_text(self.ledger, day, appid=APPID, mchid=MCHID, fault=self.bill_fault)
        digest = hashlib.sha1(text + (b"x" if self.bill_fault == "hash" else b"")).hexdigest()
        token = secrets.token_urlsafe(24)
        with self._links_lock:
            self._links = {t: v for t, v in self._links.items() if time.monotonic() - v[0] <= self.bill_link_s}
            self._links[token] = (time.monotonic(), packed(text, tar == "GZIP" and self.bill_fault != "plain"))
        link = f"{self.bill_link_base or self.url}{DOWNLOAD_PATH}?token={token}" + ("&tartype=gzip" if tar else "")
        return self._signed(200, {"hash_type": "SHA1", "hash_value": digest, "download_url": link})

    def _bill_download(self, query: dict[str, str]) -> Answer:
        with self._links_lock:
            made, body = self._links.get(query.get("token", ""), (float("-inf"), b""))
        if time.monotonic() - made > self.bill_link_s:
            return Answer(400, json.dumps({"code": "INVALID_REQUEST", "message": "下载链接已失效，请重新申请"},
                                          ensure_ascii=False).encode(), {"Content-Type": "application/json"})
        return Answer(200, body, {"Content-Type": "application/octet-stream"})

    # --- answers ---

    def _transaction(self, trade: Trade, device_id: str | None = None) -> dict:
        state = {"PAYING": "USERPAYING", "CLOSED": "REVOKED" if trade.reverses else "CLOSED"}.get(trade.state,
                                                                                                  trade.state)
        doc = {"appid": APPID, "mchid": MCHID, "out_trade_no": trade.out_trade_no, "trade_type": "MICROPAY",
               "trade_state": state, "trade_state_desc": _STATE_TEXT.get(state, state)}
        if trade.paid_at is not None:
            doc |= {"transaction_id": trade.transaction_id, "bank_type": BANK_TYPES.get(trade.funding, "OTHERS"),
                    "success_time": _rfc3339(trade.paid_at),
                    "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
                    "amount": {"total": trade.amount_fen, "payer_total": trade.amount_fen, "currency": "CNY",
                               "payer_currency": "CNY"}}
        if device_id:
            doc["scene_info"] = {"device_id": device_id}
        return doc

    def _refund_doc(self, refund: Refund) -> dict:
        trade = self.ledger.trades[refund.out_trade_no]
        return {"refund_id": refund.refund_id, "out_refund_no": refund.out_refund_no,
                "transaction_id": trade.transaction_id, "out_trade_no": refund.out_trade_no, "channel": "ORIGINAL",
                "user_received_account": "支付用户零钱", "create_time": _rfc3339(time.time()),
                "status": refund.state,
                "amount": {"total": trade.amount_fen, "refund": refund.amount_fen, "payer_total": trade.amount_fen,
                           "payer_refund": refund.amount_fen, "currency": "CNY"}}

    def _signed(self, status: int, doc: dict) -> Answer:
        """An answer signed as WeChat Pay signs: over `TIMESTAMP\\nNONCE\\nBODY\\n` with the platform key."""
        body = json.dumps(doc, ensure_ascii=False).encode()
        timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
        signature = rsa_sign(self._platform_key, f"{timestamp}\n{nonce}\n".encode() + body + b"\n")
        return Answer(status, body, {
            "Content-Type": "application/json; charset=utf-8", "Request-ID": secrets.token_hex(16).upper(),
            "Wechatpay-Nonce": nonce, "Wechatpay-Signature": signature, "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Serial": PUBLIC_KEY_ID, "Wechatpay-Signature-Type": SIGNATURE_TYPE})


_STATE_TEXT = {"SUCCESS": "支付成功", "USERPAYING": "用户支付中，需要输入密码", "PAYERROR": "支付失败",
               "CLOSED": "已关闭", "REVOKED": "已撤销", "REFUND": "转入退款"}


def _damaged(signature: str) -> str:
    """The signature with its first byte changed: still base64, no longer valid."""
    raw = bytearray(base64.b64decode(signature))
    raw[0] ^= 0xFF
    return base64.b64encode(bytes(raw)).decode("ascii")


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+08:00", time.gmtime(t + 8 * 3600))


SIMULATOR = WechatV3Simulator

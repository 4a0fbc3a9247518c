"""Alipay's open-platform gateway on loopback: alipay.trade.pay/query/cancel/refund and
alipay.trade.fastpay.refund.query, over the shared `Ledger`.

What it checks, as the real gateway does: a POST form to `/gateway.do`; the public parameters
(app_id, method, charset, sign_type=RSA2, timestamp, version, sign); the app id; the RSA2
signature with the app public key (refused with the signed 40002 isv.invalid-signature answer,
which quotes the string it checked); the timestamp, read as Beijing time, within 30 minutes
(40002 isv.invalid-timestamp); biz_content, its amounts in yuan with at most two decimals. An
unknown app id gets an *unsigned* error_response (the gateway has no key to sign with).

Answers are signed with the Alipay private key over the exact text of the response object.
Sent as `text/html;charset=utf-8`, like the real gateway, so no adapter may rely on the type.

The ledger's scenarios in Alipay's words:
  * paid: 10000 with fund_bill_list (ALIPAYACCOUNT for the wallet, BANKCARD for a card);
    paying: 10003; system error after the charge (94): 40004 ACQ.SYSTEM_ERROR;
  * declines: not enough balance -> ACQ.BUYER_BALANCE_NOT_ENOUGH (wallet) or
    ACQ.BUYER_BANKCARD_BALANCE_NOT_ENOUGH (card); an invalid, expired or already used code ->
    ACQ.PAYMENT_AUTH_CODE_INVALID (Alipay has one sub_code for the three; the sub_msg differs);
  * a pay repeated for a paid trade: ACQ.TRADE_HAS_SUCCESS; for a closed one: ACQ.TRADE_HAS_CLOSE;
  * query: trade_status WAIT_BUYER_PAY / TRADE_SUCCESS / TRADE_CLOSED (with send_pay_date when it
    was paid, then refunded), ACQ.TRADE_NOT_EXIST;
  * cancel: action close or refund; "retry" (81) is 40004 ACQ.SYSTEM_ERROR with retry_flag=Y;
    outside the window: ACQ.TRADE_CANCEL_TIME_OUT;
  * refund: fund_change=Y only for the call that moved the money (a repeat answers N, as Alipay
    does); a refund still processing (98) answers N and its query has no refund_status yet;
  * the daily bill (alipay.data.dataservice.bill.downloadurl.query, bill_type trade): a day not
    over yet by the ledger's clock -> 40004 isv.invalid_arguments; a day whose bill is not ready
    (`ledger.bill_ready`) or that moved no money -> 40004 isp.bill_not_exist; else a link
    `GET /bill/download?token=...` that works once within `bill_link_valid_s` real seconds, then
    answers the page "下载超时，请重新下载". The zip: appliance/simulators/alipay_bill.py;
    `bill_fault` damages it, `bill_link_base` makes the link point elsewhere (tests).
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from collections import deque
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from appliance.payments.alipay import BEIJING, BILL_METHOD, TIMESTAMP_FORMAT, beijing_time, response_key
from appliance.payments.bills import beijing_day
from appliance.payments.keys import generate_rsa, load_private_key, load_public_key, rsa_sign, rsa_verify
from appliance.schema import SecretFile
from appliance.simulators import Answer, Request, Simulator
from appliance.simulators.alipay_bill import ACCOUNT, EXPIRED_PAGE, LINK_VALID_S, DownloadLinks, bill_zip, file_name
from appliance.simulators.ledger import Decline, RefundError, Reverse, Trade

#: The simulated app's APPID (a sandbox-style number).
APP_ID = "9021000158600001"
PATH = "/gateway.do"
BILL_PATH = "/bill/download"
#: How far the request's timestamp may be from the simulator's clock.
CLOCK_SKEW = timedelta(minutes=30)

_PUBLIC = ("app_id", "method", "charset", "sign_type", "sign", "timestamp", "version")
_AMOUNT = re.compile(r"(0|[1-9][0-9]{0,8})(\.[0-9]{1,2})?")


class _Refusal(Exception):
    """A request the gateway answers with an error: (code, msg, sub_code, sub_msg)."""

    def __init__(self, code: str, msg: str, sub_code: str, sub_msg: str, signed: bool = True, key: str = ""):
        super().__init__(sub_code)
        self.fields = {"code": code, "msg": msg, "sub_code": sub_code, "sub_msg": sub_msg}
        self.signed = signed
        self.key = key  # the member it comes under, when not the method's response


def _business(sub_code: str, sub_msg: str, **extra) -> dict:
    return {"code": "40004", "msg": "Business Failed", "sub_code": sub_code, "sub_msg": sub_msg, **extra}


def _yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def _fen(text: str) -> int:
    if not isinstance(text, str) or not _AMOUNT.fullmatch(text):
        raise _Refusal("40004", "Business Failed", "ACQ.INVALID_PARAMETER", f"金额格式错误: {text!r}")
    yuan, _, cents = text.partition(".")
    fen = int(yuan) * 100 + int(cents.ljust(2, "0") or 0)
    if not 1 <= fen <= 100_000_000_00:
        raise _Refusal("40004", "Business Failed", "ACQ.INVALID_PARAMETER", f"金额超出范围: {text}")
    return fen


class AlipaySimulator(Simulator):
    kind = "alipay"

    def __init__(self, keys_dir: Path, ledger=None, *, port: int = 0, tls=None):
        super().__init__(keys_dir, ledger, port=port, tls=tls)
        self.app_id = APP_ID
        self._app_public = load_public_key(self.keys_dir / "app_public_key.pem")
        self._alipay_private = load_private_key(SecretFile(self.keys_dir / "alipay_private_key.pem"))
        self.requests: deque[tuple[str, dict]] = deque(maxlen=200)  # (method, form) as received, for tests
        self._lock = threading.Lock()
        self.bill_fault: str | None = None  # see appliance/simulators/alipay_bill.py FAULTS
        self.bill_link_valid_s = LINK_VALID_S
        self.bill_link_base: str | None = None  # the download link's scheme://host:port (default: this server)
        self._links = DownloadLinks()

    # --- keys ---------------------------------------------------------------------------------------

    @property
    def app_private_key_file(self) -> Path:
        """The app private key as Alipay's key tool prints it: bare base64 of PKCS#8 (mode 0600)."""
        return self.keys_dir / "app_private_key.txt"

    @property
    def app_private_key_pem(self) -> Path:
        """The same key as PKCS#8 PEM (mode 0600)."""
        return self.keys_dir / "app_private_key.pem"

    @property
    def alipay_public_key_file(self) -> Path:
        """The Alipay public key as the console shows it: bare base64."""
        return self.keys_dir / "alipay_public_key.txt"

    def make_keys(self) -> None:
        pairs = ((self.keys_dir / "app_private_key.pem", self.keys_dir / "app_public_key.pem"),
                 (self.keys_dir / "alipay_private_key.pem", self.keys_dir / "alipay_public_key.pem"))
        for private, public in pairs:
            if not private.exists() or not public.exists():
                generate_rsa(private, public)
        if not self.app_private_key_file.exists():
            key = load_private_key(SecretFile(self.app_private_key_pem))
            der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            _write_private(self.app_private_key_file, base64.b64encode(der) + b"\n")
        if not self.alipay_public_key_file.exists():
            key = load_public_key(self.keys_dir / "alipay_public_key.pem")
            der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            self.alipay_public_key_file.write_bytes(base64.b64encode(der) + b"\n")

    def provider_options(self) -> dict:
        return {"kind": "alipay", "base_url": self.url + PATH, "app_id": self.app_id,
                "app_private_key_file": str(self.app_private_key_file),
                "alipay_public_key_file": str(self.alipay_public_key_file)}

    # --- the gateway --------------------------------------------------------------------------------

    def handle(self, req: Request) -> Answer:
        if req.method == "GET" and req.path == BILL_PATH:
            return self._download(req.query.get("token", ""))
        if req.method != "POST" or req.path != PATH:
            return Answer(404, b"not found")
        form = req.form()
        method = form.get("method", "")
        with self._lock:
            self.requests.append((method, dict(form)))
        key = response_key(method) if method in self._CALLS else "error_response"
        try:
            self._check(form, method)
            biz = self._bill_biz(form) if method == BILL_METHOD else self._biz(form)
            fields, trade, new = getattr(self, self._CALLS[method])(biz)
        except _Refusal as e:
            return self._answer(e.key or key, e.fields, signed=e.signed)
        answer = self._answer(key, fields, forged=method == "alipay.trade.pay" and self.forged(trade))
        return self.deliver(trade, new, answer) if method == "alipay.trade.pay" and trade is not None else answer

    def _check(self, form: dict, method: str) -> None:
        for name in _PUBLIC:
            if not form.get(name):
                raise _Refusal("40001", "Missing Required Arguments", f"isv.missing-{name.replace('_', '-')}",
                               f"缺少{name}参数", signed=name != "app_id")
        if form["app_id"] != self.app_id:
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-app-id", "无效的AppID参数", signed=False,
                           key="error_response")
        if method not in self._CALLS:
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-method", "不存在的方法名")
        if form["sign_type"] != "RSA2" or form["charset"].lower() != "utf-8" or form["version"] != "1.0":
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-signature-type", "无效的签名类型、字符集或版本")
        content = "&".join(f"{k}={form[k]}" for k in sorted(form) if k != "sign" and form[k])  # the gateway's own
        if not rsa_verify(self._app_public, content.encode("utf-8"), form["sign"]):
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-signature",
                           f"验签出错，建议检查签名字符串或签名私钥与应用公钥是否匹配，网关生成的验签字符串为：{content}")
        try:
            sent = datetime.strptime(form["timestamp"], TIMESTAMP_FORMAT).replace(tzinfo=BEIJING)
        except ValueError:
            sent = None
        if sent is None or abs(sent - datetime.now(BEIJING)) > CLOCK_SKEW:
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-timestamp",
                           f"非法的时间戳参数 (gateway time {beijing_time()})")

    @staticmethod
    def _biz(form: dict) -> dict:
        biz = _biz_content(form)
        if not isinstance(biz, dict) or not isinstance(biz.get("out_trade_no"), str) or not biz["out_trade_no"]:
            raise _Refusal("40004", "Business Failed", "ACQ.INVALID_PARAMETER", "biz_content 或 out_trade_no 无效")
        return biz

    def _answer(self, key: str, fields: dict, *, signed: bool = True, forged: bool = False) -> Answer:
        text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        body = f'{{"{key}":{text}'
        if signed:
            sign = rsa_sign(self._alipay_private, text.encode("utf-8"))
            if forged:  # damaged in transit or forged: still base64, no longer Alipay's signature
                sign = ("A" if sign[0] != "A" else "B") + sign[1:]
            body += f',"sign":"{sign}"'
        return Answer(200, (body + "}").encode("utf-8"), {"Content-Type": "text/html;charset=utf-8"})

    # --- the calls: biz_content -> (response fields, the trade for pay's delivery, new) -----------------

    def _pay(self, biz: dict):
        if biz.get("scene") != "bar_code" or not biz.get("auth_code") or not biz.get("subject"):
            raise _Refusal("40004", "Business Failed", "ACQ.INVALID_PARAMETER", "scene、auth_code 或 subject 无效")
        fen = _fen(biz.get("total_amount"))
        self.ledger.count("pay")
        trade, new = self.ledger.pay(biz["out_trade_no"], biz["auth_code"], fen)
        return self._pay_answer(trade, new), trade, new

    def _pay_answer(self, trade: Trade, new: bool) -> dict:
        ids = {"out_trade_no": trade.out_trade_no, "trade_no": trade.transaction_id}
        if trade.state == "PAYERROR":
            return _business(*self._decline(trade))
        if trade.state in ("CLOSED", "REFUND"):
            return _business("ACQ.TRADE_HAS_CLOSE", "交易已经关闭", **ids)
        if trade.state == "PAYING":
            return {"code": "10003", "msg": " order success pay inprocess", **ids, "total_amount": _yuan(trade.amount_fen)}
        if not new:
            return _business("ACQ.TRADE_HAS_SUCCESS", "交易已被支付", **ids)
        if trade.scenario == "94":
            return _business("ACQ.SYSTEM_ERROR", "系统错误", **ids)
        return {"code": "10000", "msg": "Success", **ids, **self._paid_fields(trade)}

    @staticmethod
    def _decline(trade: Trade) -> tuple[str, str]:
        if trade.decline is Decline.NOT_ENOUGH:
            return (("ACQ.BUYER_BANKCARD_BALANCE_NOT_ENOUGH", "用户银行卡余额不足，建议用户更换付款方式")
                    if trade.funding == "card" else ("ACQ.BUYER_BALANCE_NOT_ENOUGH", "买家余额不足"))
        why = {Decline.EXPIRED: "付款码已过期", Decline.CODE_USED: "付款码已使用",
               Decline.INVALID: "付款码无效"}.get(trade.decline, "付款码无效")
        return "ACQ.PAYMENT_AUTH_CODE_INVALID", f"支付失败，{why}，请顾客刷新付款码后重新收款"

    @staticmethod
    def _paid_fields(trade: Trade) -> dict:
        channel = "BANKCARD" if trade.funding == "card" else "ALIPAYACCOUNT"
        amount = _yuan(trade.amount_fen)
        paid_at = datetime.fromtimestamp(trade.paid_at or trade.created, BEIJING).strftime(TIMESTAMP_FORMAT)
        return {"buyer_logon_id": "cus***@example.com", "total_amount": amount, "receipt_amount": amount,
                "buyer_pay_amount": amount, "gmt_payment": paid_at,
                "fund_bill_list": [{"fund_channel": channel, "amount": amount}]}

    def _query(self, biz: dict):
        self.ledger.count("query")
        trade = self.ledger.query(biz["out_trade_no"])
        if trade is None:
            return _business("ACQ.TRADE_NOT_EXIST", "交易不存在"), None, False
        fields = {"code": "10000", "msg": "Success", "out_trade_no": trade.out_trade_no,
                  "trade_no": trade.transaction_id, "total_amount": _yuan(trade.amount_fen)}
        if trade.state == "SUCCESS":
            paid = self._paid_fields(trade)
            fields |= {"trade_status": "TRADE_SUCCESS", "send_pay_date": paid.pop("gmt_payment"), **paid}
        elif trade.state == "PAYING":
            fields["trade_status"] = "WAIT_BUYER_PAY"
        else:  # PAYERROR, CLOSED; REFUND: paid, then refunded in full, so send_pay_date stays
            fields["trade_status"] = "TRADE_CLOSED"
            if trade.state == "REFUND":
                fields["send_pay_date"] = self._paid_fields(trade)["gmt_payment"]
        return fields, None, False

    def _cancel(self, biz: dict):
        self.ledger.count("reverse")
        result, trade = self.ledger.reverse(biz["out_trade_no"])
        ids = {"out_trade_no": trade.out_trade_no, "trade_no": trade.transaction_id}
        if result is Reverse.RETRY:
            return _business("ACQ.SYSTEM_ERROR", "系统错误，请重试", retry_flag="Y", **ids), None, False
        if result is Reverse.EXPIRED:
            return _business("ACQ.TRADE_CANCEL_TIME_OUT", "超过撤销时间范围，请使用退款接口", retry_flag="N",
                             **ids), None, False
        action = "refund" if trade.state == "REFUND" else "close"
        return {"code": "10000", "msg": "Success", **ids, "retry_flag": "N", "action": action}, None, False

    def _refund(self, biz: dict):
        fen = _fen(biz.get("refund_amount"))
        number = biz.get("out_request_no") or biz["out_trade_no"]  # Alipay: defaults to the trade's number
        self.ledger.count("refund")
        known = number in self.ledger.refunds
        refund = self.ledger.refund(biz["out_trade_no"], number, fen)
        if refund is RefundError.NOT_PAID:
            if biz["out_trade_no"] not in self.ledger.trades:
                return _business("ACQ.TRADE_NOT_EXIST", "交易不存在"), None, False
            return _business("ACQ.TRADE_STATUS_ERROR", "交易状态非法"), None, False
        if refund is RefundError.AMOUNT:
            return _business("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "退款金额超限"), None, False
        trade = self.ledger.trades[refund.out_trade_no]
        moved = not known and refund.state == "SUCCESS"
        return {"code": "10000", "msg": "Success", "out_trade_no": trade.out_trade_no,
                "trade_no": trade.transaction_id, "buyer_logon_id": "cus***@example.com",
                "fund_change": "Y" if moved else "N", "refund_fee": _yuan(refund.amount_fen)}, None, False

    def _refund_query(self, biz: dict):
        self.ledger.count("query_refund")
        trade = self.ledger.trades.get(biz["out_trade_no"])
        if trade is None:
            return _business("ACQ.TRADE_NOT_EXIST", "交易不存在"), None, False
        fields = {"code": "10000", "msg": "Success", "out_trade_no": trade.out_trade_no,
                  "trade_no": trade.transaction_id}
        refund = self.ledger.query_refund(biz.get("out_request_no") or "")
        if refund is None or refund.out_trade_no != trade.out_trade_no:
            return fields, None, False  # no such refund: Alipay answers success without refund data
        fields |= {"out_request_no": refund.out_refund_no, "refund_amount": _yuan(refund.amount_fen),
                   "total_amount": _yuan(trade.amount_fen)}
        if refund.state == "SUCCESS":
            fields["refund_status"] = "REFUND_SUCCESS"
        return fields, None, False

    @staticmethod
    def _bill_biz(form: dict) -> dict:
        biz = _biz_content(form)
        if not isinstance(biz, dict):
            raise _Refusal("40004", "Business Failed", "isv.invalid_arguments", "入参不合法")
        return biz

    def _bill_url(self, biz: dict):
        self.ledger.count("bill")
        try:
            day = datetime.strptime(biz.get("bill_date") or "", "%Y-%m-%d").date()
        except (TypeError, ValueError):
            day = None
        if biz.get("bill_type") != "trade" or day is None or day >= beijing_day(self.ledger.clock()):
            return _business("isv.invalid_arguments", "入参不合法"), None, False
        if not self.ledger.bill_ready(day) or not self.ledger.bill_lines(day, refunds_by_completion=True):
            return _business("isp.bill_not_exist", "账单不存在"), None, False
        token = self._links.issue(day, self.bill_link_valid_s)
        url = (f"{self.bill_link_base or self.url}{BILL_PATH}?token={token}&bizType=trade&userId={ACCOUNT}"
               f"&fileType=csv.zip&bizDates={day:%Y%m%d}&downloadFileName={file_name(day)}")
        return {"code": "10000", "msg": "Success", "bill_download_url": url}, None, False

    def _download(self, token: str) -> Answer:
        """The zip once, within the link's time; else the page Alipay shows for a dead link."""
        day = self._links.take(token)
        if day is None or self.bill_fault == "not_zip":
            return Answer(200, EXPIRED_PAGE, {"Content-Type": "text/html;charset=utf-8"})
        return Answer(200, bill_zip(self.ledger, day, fault=self.bill_fault),
                      {"Content-Type": "application/oct-stream",
                       "Content-Disposition": f"attachment;filename={file_name(day)}"})

    _CALLS = {"alipay.trade.pay": "_pay", "alipay.trade.query": "_query", "alipay.trade.cancel": "_cancel",
              "alipay.trade.refund": "_refund", "alipay.trade.fastpay.refund.query": "_refund_query",
              BILL_METHOD: "_bill_url"}


def _biz_content(form: dict):
    """biz_content's JSON, or None when it is not JSON."""
    try:
        return json.loads(form.get("biz_content") or "")
    except ValueError:
        return None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


SIMULATOR = AlipaySimulator

"""WeChat Pay v2 (micropay) on loopback: the five XML calls of `appliance.payments.wechat_v2`, over
one `Ledger`.

As the platform does, it refuses a request whose `sign` does not verify with the merchant's API key
(`return_code` FAIL "签名错误", unsigned), and signs every other answer with that key, the way the
request was signed (`sign_type` HMAC-SHA256, or MD5 when none is sent). The ledger's scenarios
become WeChat's codes: a decline's err_code (NOTENOUGH, AUTHCODEEXPIRE, AUTH_CODE_INVALID),
USERPAYING while the customer confirms, SYSTEMERROR for the system error after the charge (94),
reverse's `recall=Y` while the ledger says retry (81: once with result SUCCESS, once with FAIL
SYSTEMERROR, both of which WeChat sends), REVERSE_EXPIRE outside the reverse window, and
REVOKED for a trade reversed before it was paid.

The daily bill, /pay/downloadbill (payments.md §8.2): the file of appliance/simulators/wechat_bill.py
(gzip when tar_type=GZIP), unsigned; or an unsigned failure `<xml>` (return_code FAIL, return_msg,
error_code): "invalid bill_date" 20001 (malformed, older than three months), "invalid bill_type",
"invalid tar_type", "Bill Creating" (today or later, or before 09:00 of the next day by the
ledger's clock), "No Bill Exist" 20002 (no money moved). `bill_fault` (wechat_bill.BILL_FAULTS,
"hash" aside: v2 announces none) makes the file wrong for a test.

Keys in `keys_dir`, made on the first start: `apiv2-key.txt` (the 32-character API key, 0600),
and a self-signed API certificate `apiclient_cert.pem` with its key `apiclient_key.pem` (0600),
for the adapter's two-way TLS.

TLS mode: given `tls=` (a server `ssl.SSLContext` that asks for a client certificate, e.g.
`verify_mode = CERT_OPTIONAL` with the issuing CA loaded), the /secapi/ calls (reverse, refund)
need the client to have shown a certificate the context verified; without one they are refused
with HTTP 400, as WeChat's gateway does. `new_certificate` makes the CA and certificates for
that in tests.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.payments.keys import ALNUM
from appliance.payments.wechat_v2 import (DOWNLOAD_BILL, PAY, QUERY, QUERY_REFUND, REFUND, REVERSE, SIGN_TYPES,
                                          from_xml, sign, signed_correctly, to_xml)
from appliance.simulators import Answer, Request, Simulator
from appliance.simulators.ledger import Decline, Ledger, Refund, RefundError, Reverse, Trade
from appliance.simulators.wechat_bill import Refusal, bill_text, packed, refusal

#: The merchant this simulator serves (WeChat's own documentation examples).
MCH_ID = "1900000109"
APPID = "wxd930ea5d5a258f4f"

#: How the ledger's declines read in WeChat's codes.
DECLINES = {
    Decline.NOT_ENOUGH: ("NOTENOUGH", "余额不足"),
    Decline.EXPIRED: ("AUTHCODEEXPIRE", "二维码已过期，请用户在微信上刷新后再试"),
    Decline.INVALID: ("AUTH_CODE_INVALID", "请扫描微信支付授权码(以10/11/12/13/14/15为前缀的18位数字)"),
    Decline.CODE_USED: ("AUTH_CODE_INVALID", "101 每个二维码仅限使用一次，请刷新再试"),
}
#: The ledger's trade states as orderquery's trade_state (a trade closed by reverse is REVOKED).
TRADE_STATES = {"PAYING": "USERPAYING", "SUCCESS": "SUCCESS", "PAYERROR": "PAYERROR", "CLOSED": "REVOKED",
                "REFUND": "REFUND"}
#: The funding source of a paid trade, as WeChat's bank_type.
BANK_TYPES = {"wallet": "CFT", "card": "CMB_DEBIT"}

#: The bill's failure answers when the day has none to give: (return_msg, error_code).
BILL_REFUSALS = {Refusal.OUT_OF_RANGE: ("invalid bill_date", "20001"), Refusal.CREATING: ("Bill Creating", ""),
                 Refusal.EMPTY: ("No Bill Exist", "20002")}

_NO_CLIENT_CERT = (b"<html><head><title>400 No required SSL certificate was sent</title></head><body>"
                   b"<center><h1>400 Bad Request</h1></center><center>No required SSL certificate was sent"
                   b"</center></body></html>")


class WechatV2Simulator(Simulator):
    """WeChat Pay v2's micropay API for one merchant (see the module docstring)."""

    kind = "wechat_v2"
    bill_fault: str | None = None

    def __init__(self, keys_dir: Path, ledger: Ledger | None = None, *, port: int = 0,
                 tls: ssl.SSLContext | None = None):
        self.api_key_file = Path(keys_dir) / "apiv2-key.txt"
        self.client_cert_file = Path(keys_dir) / "apiclient_cert.pem"
        self.client_key_file = Path(keys_dir) / "apiclient_key.pem"
        self.client_cert_required = tls is not None
        super().__init__(keys_dir, ledger, port=port, tls=tls)
        self.api_key = self.api_key_file.read_text().strip()

    # --- keys and the adapter's table -------------------------------------------------------

    def make_keys(self) -> None:
        if not self.api_key_file.exists():
            _write_private(self.api_key_file, "".join(secrets.choice(ALNUM) for _ in range(32)).encode())
        if not (self.client_key_file.exists() and self.client_cert_file.exists()):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            cert = new_certificate(f"{MCH_ID} merchant", key)
            _write_private(self.client_key_file, private_pem(key))
            self.client_cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def provider_options(self) -> dict:
        return {"kind": self.kind, "base_url": self.url, "backup_base_urls": [], "mch_id": MCH_ID, "appid": APPID,
                "api_key_file": str(self.api_key_file), "sign_type": "HMAC-SHA256",
                "client_cert_file": str(self.client_cert_file), "client_key_file": str(self.client_key_file)}

    # --- the protocol -----------------------------------------------------------------------

    def handle(self, req: Request) -> Answer:
        """One call, checked in the platform's order: path, client certificate (TLS mode), method,
        XML, sign_type, merchant, sign (each refused unsigned), then appid (a signed refusal)."""
        calls = {PAY: self._pay, QUERY: self._query, REVERSE: self._reverse, REFUND: self._refund,
                 QUERY_REFUND: self._query_refund, DOWNLOAD_BILL: self._bill}
        call = calls.get(req.path)
        if call is None:
            return Answer(404, b"Not Found")
        if req.path.startswith("/secapi/") and self.client_cert_required and req.peer_cert is None:
            return Answer(400, _NO_CLIENT_CERT, {"Content-Type": "text/html"})
        if req.method != "POST":
            return _refusal("请使用post方法")
        try:
            fields = from_xml(req.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return _refusal("XML格式错误")
        sign_type = fields.get("sign_type") or "MD5"
        if sign_type not in SIGN_TYPES:
            return _refusal("sign_type参数错误")
        if fields.get("mch_id") != MCH_ID:
            return _refusal("mch_id参数错误")
        if not signed_correctly(fields, self.api_key, sign_type):
            return _refusal("签名错误")
        if fields.get("appid") != APPID:
            return self.signed_answer(sign_type, _failed("APPID_MCHID_NOT_MATCH", "appid和mch_id不匹配"))
        return call(fields, sign_type)

    def signed_answer(self, sign_type: str, result: dict[str, str], *, forged: bool = False) -> Answer:
        """An answer as WeChat sends one: return_code SUCCESS, the merchant's appid and mch_id, a
        fresh nonce_str and `result`, signed with the API key by `sign_type`. `forged`: the sign
        damaged (one character changed), as scenario 80 has it."""
        fields = {"return_code": "SUCCESS", "return_msg": "OK", "appid": APPID, "mch_id": MCH_ID,
                  "nonce_str": secrets.token_hex(16), **result}
        signature = sign(fields, self.api_key, sign_type)
        if forged:
            signature = signature[:-1] + ("0" if signature[-1] != "0" else "1")
        fields["sign"] = signature
        return Answer(200, to_xml(fields, cdata=True), {"Content-Type": "text/plain"})  # no charset, as WeChat

    def _pay(self, fields: dict[str, str], sign_type: str) -> Answer:
        missing = [k for k in ("body", "out_trade_no", "total_fee", "spbill_create_ip", "auth_code") if not fields.get(k)]
        if missing or not fields["total_fee"].isdigit() or int(fields["total_fee"]) < 1:
            return self.signed_answer(sign_type, _failed("PARAM_ERROR", f"参数错误: {', '.join(missing) or 'total_fee'}"))
        self.ledger.count("pay")
        trade, new = self.ledger.pay(fields["out_trade_no"], fields["auth_code"], int(fields["total_fee"]))
        answer = self.signed_answer(sign_type, self._pay_result(trade, new, fields), forged=self.forged(trade))
        return self.deliver(trade, new, answer)

    def _pay_result(self, trade: Trade, new: bool, fields: dict[str, str]) -> dict[str, str]:
        if trade.state == "SUCCESS" and new and trade.scenario == "94":
            return _failed("SYSTEMERROR", "系统超时")  # the money is taken all the same
        if trade.state == "SUCCESS":
            return {**_success(), **_paid(trade), "attach": fields.get("attach", ""),
                    "device_info": fields.get("device_info", "")}
        if trade.state == "PAYING":
            return _failed("USERPAYING", "需要用户输入支付密码")
        if trade.state == "PAYERROR":
            return _failed(*DECLINES[trade.decline])
        return _failed("ORDERREVERSED", "订单已撤销")  # CLOSED or REFUND: the number was reversed

    def _query(self, fields: dict[str, str], sign_type: str) -> Answer:
        self.ledger.count("query")
        trade = self.ledger.query(fields.get("out_trade_no", ""))
        if trade is None:
            return self.signed_answer(sign_type, _failed("ORDERNOTEXIST", "此交易订单号不存在"))
        state = TRADE_STATES[trade.state]
        result = {**_success(), "out_trade_no": trade.out_trade_no, "trade_state": state,
                  "trade_state_desc": {"SUCCESS": "支付成功", "USERPAYING": "需要用户输入支付密码",
                                       "PAYERROR": "支付失败", "REVOKED": "已撤销", "REFUND": "转入退款"}[state]}
        if trade.paid:
            result |= _paid(trade)
        return self.signed_answer(sign_type, result)

    def _reverse(self, fields: dict[str, str], sign_type: str) -> Answer:
        self.ledger.count("reverse")
        done, trade = self.ledger.reverse(fields.get("out_trade_no", ""))
        if done is Reverse.RETRY:  # WeChat says "call again" with either result (payments.md §7)
            first = trade.reverses % 2 == 1
            result = {**_success(), "recall": "Y"} if first else {**_failed("SYSTEMERROR", "系统超时"), "recall": "Y"}
        elif done is Reverse.EXPIRED:
            result = {**_failed("REVERSE_EXPIRE", "订单已超过可撤销期"), "recall": "N"}
        else:
            result = {**_success(), "recall": "N"}
        return self.signed_answer(sign_type, result)

    def _refund(self, fields: dict[str, str], sign_type: str) -> Answer:
        self.ledger.count("refund")
        numbers = [fields.get(k, "") for k in ("total_fee", "refund_fee")]
        if not all(n.isdigit() for n in numbers) or not fields.get("out_refund_no"):
            return self.signed_answer(sign_type, _failed("PARAM_ERROR", "参数错误"))
        total, amount = map(int, numbers)
        out_trade_no = fields.get("out_trade_no", "")
        refund = self.ledger.refund(out_trade_no, fields["out_refund_no"], amount, total)
        if refund is RefundError.NOT_PAID:
            known = out_trade_no in self.ledger.trades
            result = _failed("TRADE_STATE_ERROR", "订单状态错误") if known else _failed("ORDERNOTEXIST", "订单不存在")
        elif refund is RefundError.AMOUNT:
            result = _failed("INVALID_REQUEST", "订单金额或退款金额与之前请求不一致，请核实后再试")
        else:
            result = {**_success(), **self._refund_fields(refund), "out_refund_no": refund.out_refund_no,
                      "refund_id": refund.refund_id, "refund_fee": str(refund.amount_fen)}
        return self.signed_answer(sign_type, result)

    def _query_refund(self, fields: dict[str, str], sign_type: str) -> Answer:
        self.ledger.count("query_refund")
        refund = self.ledger.query_refund(fields.get("out_refund_no", ""))
        if refund is None:
            return self.signed_answer(sign_type, _failed("REFUNDNOTEXIST", "退款订单查询失败"))
        return self.signed_answer(sign_type, {
            **_success(), **self._refund_fields(refund), "refund_count": "1",
            "out_refund_no_0": refund.out_refund_no, "refund_id_0": refund.refund_id,
            "refund_fee_0": str(refund.amount_fen), "refund_status_0": refund.state})

    def _bill(self, fields: dict[str, str], _: str) -> Answer:
        self.ledger.count("bill")
        date, kind, tar = fields.get("bill_date", ""), fields.get("bill_type", "ALL"), fields.get("tar_type", "")
        try:
            day = datetime.datetime.strptime(date, "%Y%m%d").date() if re.fullmatch(r"[0-9]{8}", date) else None
        except ValueError:
            day = None
        why = refusal(self.ledger, day) if day is not None else Refusal.OUT_OF_RANGE
        if kind != "ALL" or tar not in ("", "GZIP"):
            return _bill_refusal("invalid bill_type" if kind != "ALL" else "invalid tar_type", "")
        if why is not None:
            return _bill_refusal(*BILL_REFUSALS[why])
        text = bill_text(self.ledger, day, appid=APPID, mchid=MCH_ID, fault=self.bill_fault)
        return Answer(200, packed(text, tar == "GZIP" and self.bill_fault != "plain"), {"Content-Type": "text/plain"})

    def _refund_fields(self, refund: Refund) -> dict[str, str]:
        trade = self.ledger.trades[refund.out_trade_no]
        return {"out_trade_no": trade.out_trade_no, "transaction_id": trade.transaction_id,
                "total_fee": str(trade.amount_fen)}


SIMULATOR = WechatV2Simulator


def _success() -> dict[str, str]:
    return {"result_code": "SUCCESS"}


def _failed(err_code: str, text: str) -> dict[str, str]:
    return {"result_code": "FAIL", "err_code": err_code, "err_code_des": text}


def _paid(trade: Trade) -> dict[str, str]:
    """The fields of a paid trade, in pay and orderquery answers."""
    return {"out_trade_no": trade.out_trade_no, "transaction_id": trade.transaction_id,
            "bank_type": BANK_TYPES[trade.funding], "total_fee": str(trade.amount_fen),
            "cash_fee": str(trade.amount_fen), "fee_type": "CNY", "trade_type": "MICROPAY",
            "openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o", "is_subscribe": "N",
            "time_end": datetime.datetime.fromtimestamp(trade.paid_at or trade.created).strftime("%Y%m%d%H%M%S")}


def _bill_refusal(return_msg: str, error_code: str) -> Answer:
    """downloadbill's failure: unsigned, return_code FAIL, with error_code when WeChat gives one."""
    fields = {"return_code": "FAIL", "return_msg": return_msg} | ({"error_code": error_code} if error_code else {})
    return Answer(200, to_xml(fields, cdata=True), {"Content-Type": "text/plain"})


def _refusal(return_msg: str) -> Answer:
    """A refusal at the communication level: return_code FAIL, unsigned, as WeChat sends it."""
    return Answer(200, to_xml({"return_code": "FAIL", "return_msg": return_msg}, cdata=True),
                  {"Content-Type": "text/plain"})


# --- keys and certificates --------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM, the form of WeChat's apiclient_key.pem."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_certificate(common_name: str, key: rsa.RSAPrivateKey, *,
                    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None = None, ca: bool = False,
                    ip: str | None = None, days: int = 3650) -> x509.Certificate:
    """An X.509 certificate for `key`: self-signed unless `issuer` (its certificate and key) is
    given; `ca`: a CA that may issue; `ip`: a server certificate for that address (IP SAN),
    otherwise one for a TLS client."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    elif ip is not None:
        builder = (builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                         critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())

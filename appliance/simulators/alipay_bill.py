"""The Alipay simulator's daily trade bill: the zip of one Beijing day, as Alipay writes it
(payments.md §8.4), from the ledger's movements, and the one-use download links to it.

`bill_zip(ledger, day)` writes `<PID>0156_<yyyyMMdd>_业务明细.csv` and `..._业务明细(汇总).csv`, GBK
text and GBK member names (no UTF-8 flag): comment lines, dashed markers, the header, ids ending in
a TAB, a 交易 line per payment, a 退款 line per refund (dated when it completed) and per cancel that
gave money back (negative amounts), the fee by `ledger.fee_fen` with the sign convention of
appliance/payments/alipay_bill.py (negative when taken), and a summary with one store and `合计`.

`fault` damages it for tests: "summary" (the 合计 counts one payment too many), "utf8" (the CSVs
in UTF-8), "not_zip" (the download is the link-expired page).
"""

from __future__ import annotations

import datetime as dt
import io
import secrets
import threading
import time
import zipfile

from appliance.payments.alipay_bill import DETAIL_HEADER, DETAIL_SUFFIX, FEE_SIGN, SUMMARY_HEADER, SUMMARY_SUFFIX
from appliance.payments.bills import beijing_time, day_start
from appliance.simulators.ledger import Ledger

#: The simulated merchant's PID (partner id); the bill's account is PID + "0156".
PID = "2088102177000001"
ACCOUNT = PID + "0156"
STORE = ("S0001", "模拟门店")
#: What Alipay answers a download link used late (or twice) instead of the zip.
EXPIRED_PAGE = "<html><body><p>下载超时，请重新下载</p></body></html>".encode("utf-8")
#: How long a download link works, in real seconds (Alipay: 30 s).
LINK_VALID_S = 30.0
FAULTS = (None, "summary", "utf8", "not_zip")


def file_name(day: dt.date) -> str:
    """The zip's name: `<PID>0156_<yyyyMMdd>.csv.zip`."""
    return f"{ACCOUNT}_{day:%Y%m%d}.csv.zip"


def _yuan(fen: int) -> str:
    return f"{'-' if fen < 0 else ''}{abs(fen) // 100}.{abs(fen) % 100:02d}"


def _date_cn(t: float) -> str:
    return dt.datetime.strptime(beijing_time(t), "%Y-%m-%d %H:%M:%S").strftime("%Y年%m月%d日 %H:%M:%S")


def _comments(kind: str, day: dt.date) -> list[str]:
    start = day_start(day)
    return [f"#支付宝{kind}查询", f"#账号：[{ACCOUNT}]",
            f"#起始日期：[{_date_cn(start)}]   终止日期：[{_date_cn(start + 86_400)}]"]


def bill_csvs(ledger: Ledger, day: dt.date, *, fault: str | None = None) -> tuple[str, str]:
    """The detail and the summary CSV texts of Beijing `day` (CRLF lines, as a Windows export)."""
    rows, paid, returned, fees, payments, refunds = [], 0, 0, 0, 0, 0
    for m in ledger.bill_lines(day, refunds_by_completion=True):
        trade = ledger.trades[m.out_trade_no]
        payment = m.kind == "payment"
        amount = m.amount_fen if payment else -m.amount_fen
        fee = FEE_SIGN * ledger.fee_fen(m.amount_fen) * (1 if payment else -1)  # fee given back on a refund
        done = m.at if m.done_at is None else m.done_at
        row = {c: "" for c in DETAIL_HEADER} | {
            "支付宝交易号": m.transaction_id + "\t", "商户订单号": m.out_trade_no + "\t",
            "业务类型": "交易" if payment else "退款", "商品名称": "Order", "创建时间": beijing_time(trade.created),
            "完成时间": beijing_time(done), "门店编号": STORE[0], "门店名称": STORE[1], "对方账户": "cus***@example.com",
            "订单金额（元）": _yuan(amount), "商家实收（元）": _yuan(amount), "退款批次号/请求号": m.out_refund_no and m.out_refund_no + "\t",
            "服务费（元）": _yuan(fee), "分润（元）": "0.00"}
        for c in ("支付宝红包（元）", "集分宝（元）", "支付宝优惠（元）", "商家优惠（元）", "券核销金额（元）",
                  "商家红包消费金额（元）", "卡消费金额（元）"):
            row[c] = "0.00"
        rows.append(",".join(row[c] for c in DETAIL_HEADER))
        fees += fee
        if payment:
            paid, payments = paid + amount, payments + 1
        else:
            returned, refunds = returned + amount, refunds + 1
    exported = f"#导出时间：[{_date_cn(ledger.clock())}]"
    detail = [*_comments("业务明细", day), "#" + "-" * 40 + "业务明细列表" + "-" * 40, ",".join(DETAIL_HEADER), *rows,
              "#" + "-" * 40 + "业务明细列表结束" + "-" * 36,
              f"#交易合计：{payments}笔，商家实收共{_yuan(paid)}元，商家优惠共0.00元",
              f"#退款合计：{refunds}笔，商家实收退款共{_yuan(returned)}元，商家优惠退款共0.00元", exported]
    net = paid + returned

    def store(first: str, second: str, n_payments: int) -> str:
        return ",".join([first, second, str(n_payments), str(refunds), _yuan(net), _yuan(net), "0.00", "0.00", "0.00",
                         _yuan(fees), "0.00", _yuan(net + fees)])

    summary = [*_comments("业务汇总", day), "#" + "-" * 40 + "业务汇总列表" + "-" * 40, ",".join(SUMMARY_HEADER),
               store(*STORE, payments), store("合计", "", payments + (fault == "summary")),
               "#" + "-" * 40 + "业务汇总列表结束" + "-" * 36, exported]
    return "\r\n".join(detail) + "\r\n", "\r\n".join(summary) + "\r\n"


class _GbkName(zipfile.ZipInfo):
    """A member whose name is written as GBK bytes without the UTF-8 flag, as Alipay's zips are.
    Python's zipfile writes a non-ASCII name as UTF-8 and sets flag bit 11; both its local header
    and its central directory take the name from `_encodeFilenameFlags` (a private hook, stable
    since Python 3.x), so overriding it is all a GBK name needs."""

    __slots__ = ()

    def _encodeFilenameFlags(self):  # noqa: N802 - zipfile's name
        return self.filename.encode("gbk"), self.flag_bits


def bill_zip(ledger: Ledger, day: dt.date, *, fault: str | None = None) -> bytes:
    """The zip Alipay serves for Beijing `day` (see the module docstring)."""
    detail, summary = bill_csvs(ledger, day, fault=fault)
    encoding = "utf-8" if fault == "utf8" else "gbk"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for suffix, text in ((DETAIL_SUFFIX, detail), (SUMMARY_SUFFIX, summary)):
            info = _GbkName(f"{ACCOUNT}_{day:%Y%m%d}{suffix}", date_time=(day.year, day.month, day.day, 9, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, text.encode(encoding))
    return out.getvalue()


class DownloadLinks:
    """One-use download tokens, each for one day's bill, valid `valid_s` real seconds (the
    simulator's `bill_link_valid_s`). Thread-safe."""

    def __init__(self):
        self._days: dict[str, tuple[dt.date, float]] = {}
        self._lock = threading.Lock()

    def issue(self, day: dt.date, valid_s: float) -> str:
        token, now = secrets.token_hex(16), time.monotonic()
        with self._lock:
            for old in [t for t, (_, until) in self._days.items() if until < now]:  # never used: forgotten
                del self._days[old]
            self._days[token] = (day, now + valid_s)
        return token

    def take(self, token: str) -> dt.date | None:
        """The day of a token still valid, used up by this call; None for any other token."""
        with self._lock:
            day, until = self._days.pop(token, (None, 0.0))
        return day if day is not None and time.monotonic() <= until else None

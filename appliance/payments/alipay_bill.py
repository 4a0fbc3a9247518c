"""Alipay's daily trade bill (`bill_type = trade`, 业务明细): the downloaded zip -> `Bill`.

The zip (reference: payments.md §8.4) holds two CSV files whose **names and contents are GBK**
(the names without the zip's UTF-8 flag):

    <PID>0156_<yyyyMMdd>_业务明细.csv        the detail: one line per money movement
    <PID>0156_<yyyyMMdd>_业务明细(汇总).csv  the summary: one line per store, then `合计`

Members are picked by these name suffixes, never by order. In both files lines starting with `#`
are comments and the dashed lines (`----业务明细列表----`, with or without `#`) are markers; the
first other line is the header. Columns are mapped **by header name** (the names carry full-width
parentheses: `订单金额（元）`), and every line must have as many columns as the header (how Alipay
escapes a comma inside free text is not documented). Values are stripped: id-like ones end in a TAB.

Detail lines: `业务类型` 交易 -> PAYMENT (amount = 订单金额（元）, positive), 退款 -> REFUND (amount =
minus the negative 订单金额（元）; `退款批次号/请求号` is our out_request_no; a cancel that gave money
back is a 退款 line too). `at` is `完成时间` (a refund's: when it completed; Beijing). The detail's
comments `#交易合计：N笔` and `#退款合计：M笔`, when present, must count its lines.

Fees: Alipay's sources do not say which sign `服务费（元）` has. This parser reads it as the
merchant's money movement, as the summary's `实收净额 = 商家实收 + 服务费` suggests: negative for a fee
taken on a payment, positive for fee given back with a refund. `FEE_SIGN` turns it into
`BillLine.fee_fen` (positive = fee charged); the simulator writes the same convention. If a real
bill shows positive fees on payments, flip `FEE_SIGN`: nothing else depends on it.

Summary: its `合计` line states `BillTotals(payments=交易订单总笔数, returns=退款订单总笔数,
net_fen=订单金额（元）, fee_fen=服务费（元） x FEE_SIGN)`, checked against the detail's lines.

Every problem is a `BillError` naming the member and the line: not a zip, a member missing or
twice, names or text that are not GBK, a missing header column, a wrong column count, a bad amount
or time, a count or total that disagrees. A detail with no lines and a `合计` of zeros is a valid
bill with no lines.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import zipfile
import zlib
from urllib.parse import urlsplit, urlunsplit

from appliance.payments.bills import (MAX_BILL_BYTES, Bill, BillError, BillLine, BillState, BillTotals, LineKind,
                                      check_totals, yuan_to_fen)
from appliance.payments.http import link_problem

DETAIL_SUFFIX = "_业务明细.csv"
SUMMARY_SUFFIX = "_业务明细(汇总).csv"
#: The detail's header, as Alipay writes it (the columns this parser reads are a subset).
DETAIL_HEADER = ("支付宝交易号", "商户订单号", "业务类型", "商品名称", "创建时间", "完成时间", "门店编号", "门店名称",
                 "操作员", "终端号", "对方账户", "订单金额（元）", "商家实收（元）", "支付宝红包（元）", "集分宝（元）",
                 "支付宝优惠（元）", "商家优惠（元）", "券核销金额（元）", "券名称", "商家红包消费金额（元）",
                 "卡消费金额（元）", "退款批次号/请求号", "服务费（元）", "分润（元）", "备注")
SUMMARY_HEADER = ("门店编号", "门店名称", "交易订单总笔数", "退款订单总笔数", "订单金额（元）", "商家实收（元）",
                  "支付宝优惠（元）", "商家优惠（元）", "卡消费金额（元）", "服务费（元）", "分润（元）", "实收净额（元）")
_DETAIL_NEEDS = ("支付宝交易号", "商户订单号", "业务类型", "完成时间", "订单金额（元）", "退款批次号/请求号", "服务费（元）")
_SUMMARY_NEEDS = ("门店编号", "交易订单总笔数", "退款订单总笔数", "订单金额（元）", "服务费（元）")
#: `BillLine.fee_fen` = FEE_SIGN x 服务费 in fen (see the module docstring: the sign is an assumption).
FEE_SIGN = -1
#: The longest a bill's download may take, in seconds (up to MAX_BILL_BYTES; head office, not a lane).
DOWNLOAD_S = 120.0
#: The largest CSV member read, uncompressed (a zip bomb stops here).
MAX_MEMBER_BYTES = 4 * MAX_BILL_BYTES
_KINDS = {"交易": LineKind.PAYMENT, "退款": LineKind.REFUND}
_COUNT = {"payments": re.compile(r"#交易合计：\s*([0-9]+)\s*笔"), "returns": re.compile(r"#退款合计：\s*([0-9]+)\s*笔")}
_TIME = "%Y-%m-%d %H:%M:%S"


def is_zip(data: bytes) -> bool:
    """Whether a download is a zip at all (an expired link answers an HTML page instead)."""
    return zipfile.is_zipfile(io.BytesIO(data))


def parse_bill(platform: str, day: dt.date, data: bytes) -> Bill:
    """The FETCHED bill of Beijing `day` from the zip's bytes, its totals checked. Raises BillError."""
    p = _Parse(platform, day)
    detail, summary = p.members(data)
    lines, counts = p.detail(detail)
    stated = p.summary(summary)
    for name, n in counts.items():
        listed = sum(1 for x in lines if x.returns_money == (name == "returns"))
        if n != listed:
            p.fail(f"{detail[0]}: the comment {'#交易合计' if name == 'payments' else '#退款合计'} counts {n}, "
                   f"the file lists {listed}")
    check_totals(platform, day, lines, stated)
    refunds = sum(1 for x in lines if x.returns_money)
    return Bill(platform, day, BillState.FETCHED, tuple(lines), stated,
                detail=f"{len(lines) - refunds} payment and {refunds} refund lines, as the summary's 合计 states")


class _Parse:
    def __init__(self, platform: str, day: dt.date):
        self.platform, self.day = platform, day

    def fail(self, reason: str):
        raise BillError(self.platform, self.day, reason)

    def members(self, data: bytes) -> tuple[tuple[str, str], tuple[str, str]]:
        """(name, text) of the detail and of the summary."""
        try:
            with zipfile.ZipFile(io.BytesIO(data), metadata_encoding="gbk") as z:
                return self._member(z, DETAIL_SUFFIX), self._member(z, SUMMARY_SUFFIX)
        except zipfile.BadZipFile as e:
            self.fail(f"the download is not a readable zip ({len(data)} bytes: {e})")
        except UnicodeDecodeError:
            self.fail("the zip's member names are not GBK")
        except (zlib.error, NotImplementedError, RuntimeError, EOFError) as e:  # damaged, unknown method, encrypted
            self.fail(f"a zip member cannot be read: {e}")

    def _member(self, z: zipfile.ZipFile, suffix: str) -> tuple[str, str]:
        found = [i for i in z.infolist() if i.filename.endswith(suffix)]
        if len(found) != 1:
            names = ", ".join(z.namelist())[:300]
            self.fail(f"the zip holds {len(found)} members named *{suffix} (one expected; it holds: {names})")
        info = found[0]
        with z.open(info) as f:
            raw = f.read(MAX_MEMBER_BYTES + 1)
        if len(raw) > MAX_MEMBER_BYTES:
            self.fail(f"{info.filename}: larger than {MAX_MEMBER_BYTES} bytes uncompressed")
        try:
            return info.filename, raw.decode("gbk")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            self.fail(f"{info.filename} line {line}: not GBK text (byte {e.start}); UTF-8 instead?")

    def table(self, member: tuple[str, str], needs: tuple[str, ...]):
        """The rows of a CSV member as (line number, {header name: stripped value}), and its comments."""
        name, text = member
        header, rows, comments = None, [], []
        for n, raw in enumerate(text.split("\n"), 1):
            line = raw.rstrip("\r")
            if line.startswith("#"):
                comments.append(line)
                continue
            if not line.strip() or line.lstrip().startswith("-"):  # blank, or a dashed marker
                continue
            values = [v.strip() for v in next(csv.reader([line]))]
            if header is None:
                header = values
                missing = [c for c in needs if c not in header]
                if missing:
                    self.fail(f"{name} line {n}: the header lacks {', '.join(missing)} "
                              f"(not an Alipay trade bill, or not GBK?)")
                continue
            if len(values) != len(header):
                self.fail(f"{name} line {n}: {len(values)} columns, the header has {len(header)}")
            rows.append((n, dict(zip(header, values))))
        if header is None:
            self.fail(f"{name}: no header line")
        return rows, comments

    def fen(self, name: str, n: int, row: dict, column: str) -> int:
        try:
            return yuan_to_fen(row[column])
        except ValueError as e:
            self.fail(f"{name} line {n}: {column}: {e}")

    def detail(self, member) -> tuple[list[BillLine], dict[str, int]]:
        name = member[0]
        rows, comments = self.table(member, _DETAIL_NEEDS)
        lines = []
        for n, row in rows:
            kind = _KINDS.get(row["业务类型"])
            if kind is None:
                self.fail(f"{name} line {n}: 业务类型 {row['业务类型'][:20]!r} is neither 交易 nor 退款")
            if not row["支付宝交易号"]:
                self.fail(f"{name} line {n}: no 支付宝交易号")
            amount = self.fen(name, n, row, "订单金额（元）")
            if (amount > 0) != (kind is LineKind.PAYMENT) or amount == 0:
                self.fail(f"{name} line {n}: a {row['业务类型']} line of {row['订单金额（元）']} yuan "
                          f"(交易 is positive, 退款 negative)")
            try:
                dt.datetime.strptime(row["完成时间"], _TIME)
            except ValueError:
                self.fail(f"{name} line {n}: 完成时间 {row['完成时间'][:24]!r} is not yyyy-MM-dd HH:mm:ss")
            refund_no = row["退款批次号/请求号"] if kind is LineKind.REFUND else ""
            lines.append(BillLine(row["商户订单号"], row["支付宝交易号"], kind, abs(amount),
                                  FEE_SIGN * self.fen(name, n, row, "服务费（元）"), row["完成时间"],
                                  row["业务类型"], refund_no))
        counts = {}
        for key, pattern in _COUNT.items():
            found = [m for m in map(pattern.match, comments) if m]
            if found:
                counts[key] = int(found[-1][1])
        return lines, counts

    def summary(self, member) -> BillTotals:
        name = member[0]
        rows, _ = self.table(member, _SUMMARY_NEEDS)
        total = [(n, row) for n, row in rows if row["门店编号"] == "合计"]
        if len(total) != 1:
            self.fail(f"{name}: {len(total)} lines 合计 (one expected)")
        n, row = total[0]
        counts = {}
        for column in ("交易订单总笔数", "退款订单总笔数"):
            if not re.fullmatch("[0-9]{1,9}", row[column]):
                self.fail(f"{name} line {n}: {column} {row[column][:20]!r} is not a count")
            counts[column] = int(row[column])
        return BillTotals(payments=counts["交易订单总笔数"], returns=counts["退款订单总笔数"],
                          net_fen=self.fen(name, n, row, "订单金额（元）"),
                          fee_fen=FEE_SIGN * self.fen(name, n, row, "服务费（元）"))


def bill_link(url: str, over_http: bool) -> tuple[str, str]:
    """(the link to fetch, why it is not fetched or ""). Alipay documents plain-http links on its
    own domain (http://dwbillcenter.alipay.com/...): such a link is fetched over https, or as given
    when `over_http` (the operator's choice: the zip is unsigned). Any other link must pass
    `link_problem`: https, or http to a loopback simulator."""
    parts = urlsplit(url)
    if parts.scheme == "http" and (parts.hostname or "").endswith(".alipay.com") and not parts.username:
        return (url, "") if over_http else (urlunsplit(parts._replace(scheme="https")), "")
    return url, link_problem(url)

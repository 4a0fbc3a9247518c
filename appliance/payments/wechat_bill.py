"""WeChat Pay's daily trade bill (交易账单), the file both `wechat_v3` and `wechat_v2` download
(payments.md §8.3): bytes in, a checked `Bill` out.

The file: UTF-8, lines ending in CRLF or LF, comma-separated without quoting. Four parts: the
detail header, the detail lines, the summary header (its first column is 总交易单数) and the one
summary line. Every value starts with a backtick (stripped here). Columns are found **by header
name**, never by position, so each layout reads the same: ALL (payments and refunds), SUCCESS
(payments only), REFUND (with 退款申请时间/退款成功时间), and the legacy one (总金额/企业红包金额 in
place of 应结订单金额/代金券金额, summary 总交易额/总退款金额).

A line's 交易状态 is its kind, not the order's current state:

    SUCCESS   PAYMENT  amount = 订单金额 (legacy 总金额; else 应结订单金额)
    REFUND    REFUND   amount = 申请退款金额, else 退款金额
    REVOKED   REVOKED  as REFUND; when both are 0, the order amount (the reversal gave it all back)

`state` is 交易状态, with 退款状态 for the refund and reversal lines ("REFUND/PROCESSING": frozen
when the bill was made; query the refund for its end). `fee_fen` is 手续费, signed (negative on the
lines that give money back), five decimals that must be whole fen.

The summary becomes `BillTotals` (lines = 总交易单数, paid = 订单总金额 or legacy 总交易额,
returned = 申请退款总金额, else 退款总金额 or legacy 总退款金额, fee = 手续费总金额) and must agree
with the lines (`check_totals`). Anything malformed is a `BillError` naming the line: bytes that
are not UTF-8, a header without the columns read here, a line whose column count differs from its
header's (a comma in free text: §8.6), an amount or a time that does not parse, an unknown 交易状态,
a missing summary, text after it. An empty file is an error too, never an empty bill: a day
without money movements is answered by the platform's own "no bill" code, not by an empty file.
"""

from __future__ import annotations

import datetime as dt
import re
import zlib

from appliance.payments.bills import MAX_BILL_BYTES, Bill, BillError, BillLine, BillState, BillTotals, LineKind, \
    check_totals, yuan_to_fen

#: The columns read from every detail layout (an amount column is needed as well, see AMOUNT_COLUMNS).
REQUIRED = ("交易时间", "微信订单号", "商户订单号", "交易状态", "手续费")
#: Where a payment line's amount is, first found first: ALL/SUCCESS, legacy, then the settled amount.
AMOUNT_COLUMNS = ("订单金额", "总金额", "应结订单金额")
#: Where a refund or reversal line's amount is, first non-zero first.
RETURNED_COLUMNS = ("申请退款金额", "退款金额")
#: The summary header's first column.
SUMMARY_FIRST = "总交易单数"
#: Summary columns -> BillTotals fields, first found first.
SUMMARY_PAID = ("订单总金额", "总交易额")
SUMMARY_RETURNED = ("申请退款总金额", "退款总金额", "总退款金额")
SUMMARY_FEE = "手续费总金额"

KINDS = {"SUCCESS": LineKind.PAYMENT, "REFUND": LineKind.REFUND, "REVOKED": LineKind.REVOKED}
GZIP_MAGIC = b"\x1f\x8b"

_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")


def unpacked(platform: str, day: dt.date, body: bytes, limit: int = MAX_BILL_BYTES) -> bytes:
    """The bill's bytes: gunzipped when `body` starts with the gzip magic, else as they are (a
    bill asked for uncompressed, or decompressed on the way). Raises BillError for a broken gzip
    stream, or one that unpacks to more than `limit` bytes (a gzip bomb stops there)."""
    if not body.startswith(GZIP_MAGIC):
        return body
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
    try:
        data = inflate.decompress(body, limit + 1)
    except zlib.error as e:
        raise BillError(platform, day, f"the download is not a valid gzip stream ({e})") from None
    if len(data) > limit:
        raise BillError(platform, day, f"the bill unpacks to more than {limit} bytes")
    if not inflate.eof:
        raise BillError(platform, day, "the gzip stream is truncated")
    return data


def parse_bill(platform: str, day: dt.date, data: bytes) -> Bill:
    """The uncompressed bill file -> a FETCHED `Bill` whose lines add up to its summary.
    Raises BillError (see the module docstring)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BillError(platform, day, f"line {line}: not UTF-8 (a gzip stream read as text, or another "
                                       f"charset)") from None
    rest = _numbered(text.removeprefix("\ufeff"))
    first = next(rest, None)
    if first is None:
        raise BillError(platform, day, "the bill is empty (no header, no summary)")
    reader = _Reader(platform, day)
    n, raw = first
    header = reader.header(n, raw)
    missing = [c for c in REQUIRED if c not in header] + \
        ([] if any(c in header for c in AMOUNT_COLUMNS) else ["订单金额"])
    if missing:
        raise BillError(platform, day, f"line {n}: not a WeChat bill header (no {', '.join(missing)})")
    lines = []
    for n, raw in rest:
        if _cells(raw)[0] == SUMMARY_FIRST:
            totals = _totals(reader, n, raw, next(rest, None))
            extra = next(rest, None)
            if extra is not None:
                raise BillError(platform, day, f"line {extra[0]}: text after the summary line")
            check_totals(platform, day, lines, totals)
            return Bill(platform, day, BillState.FETCHED, tuple(lines), totals,
                        detail=f"{len(lines)} lines, summary checked")
        lines.append(_line(reader, n, reader.values(n, raw, header)))
    raise BillError(platform, day, f"no summary: no {SUMMARY_FIRST} header after line {n}")


def _numbered(text: str):
    """(line number, line) of each line that is not blank; lines end in LF or CRLF. A generator, so
    that a bill of many MB is never held twice (as its text and as a list of its lines)."""
    start, n = 0, 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        n += 1
        line = text[start:end].removesuffix("\r")
        if line.strip():
            yield n, line
        start = end + 1


class _Reader:
    """Cells of one bill, with errors naming the platform, the day and the line."""

    def __init__(self, platform: str, day: dt.date):
        self.platform, self.day = platform, day

    def error(self, n: int, reason: str) -> BillError:
        return BillError(self.platform, self.day, f"line {n}: {reason}")

    def header(self, n: int, raw: str) -> list[str]:
        names = _cells(raw)
        if len(set(names)) != len(names) or not all(names):
            raise self.error(n, "a header with an empty or repeated column name")
        return names

    def values(self, n: int, raw: str, header: list[str]) -> dict[str, str]:
        cells = _cells(raw)
        if len(cells) != len(header):
            raise self.error(n, f"{len(cells)} columns, the header has {len(header)} (a comma in free text?)")
        return dict(zip(header, cells))

    def fen(self, n: int, row: dict[str, str], column: str) -> int:
        try:
            return yuan_to_fen(row[column])
        except ValueError as e:
            raise self.error(n, f"{column}: {e}") from None

    def count(self, n: int, row: dict[str, str], column: str) -> int:
        value = row[column]
        if not (value.isascii() and value.isdigit()):
            raise self.error(n, f"{column}: not a count: {value[:24]!r}")
        return int(value)


def _cells(raw: str) -> list[str]:
    """A line's values, each without its leading backtick and surrounding blanks."""
    return [c.strip().removeprefix("`").strip() for c in raw.split(",")]


def _line(reader: _Reader, n: int, row: dict[str, str]) -> BillLine:
    status = row["交易状态"]
    kind = KINDS.get(status)
    if kind is None:
        raise reader.error(n, f"交易状态 {status[:24]!r} is not SUCCESS, REFUND or REVOKED")
    amounts = {c: reader.fen(n, row, c) for c in AMOUNT_COLUMNS + RETURNED_COLUMNS if c in row}  # all must parse
    ordered = next(amounts[c] for c in AMOUNT_COLUMNS if c in amounts)
    if kind is LineKind.PAYMENT:
        amount, state, out_refund_no = ordered, status, ""
    else:
        returned = [amounts[c] for c in RETURNED_COLUMNS if c in amounts]
        amount = next((a for a in returned if a), ordered if kind is LineKind.REVOKED else 0)
        refund_state = row.get("退款状态", "")
        state = f"{status}/{refund_state}" if refund_state else status
        out_refund_no = row.get("商户退款单号", "")
    if amount <= 0:
        raise reader.error(n, f"a {status} line without a positive amount")
    if not _TIME.fullmatch(row["交易时间"]):
        raise reader.error(n, f"交易时间 is not YYYY-MM-DD HH:MM:SS: {row['交易时间'][:24]!r}")
    return BillLine(out_trade_no=row["商户订单号"], platform_txn_id=row["微信订单号"], kind=kind, amount_fen=amount,
                    fee_fen=reader.fen(n, row, "手续费"), at=row["交易时间"], state=state,
                    out_refund_no=out_refund_no)


def _totals(reader: _Reader, n: int, raw_header: str, summary: tuple[int, str] | None) -> BillTotals:
    header = reader.header(n, raw_header)
    if summary is None:
        raise reader.error(n, "a summary header without its summary line")
    m, raw = summary
    row = reader.values(m, raw, header)
    paid = next((c for c in SUMMARY_PAID if c in row), None)
    returned = next((c for c in SUMMARY_RETURNED if c in row), None)
    return BillTotals(lines=reader.count(m, row, SUMMARY_FIRST),
                      paid_fen=reader.fen(m, row, paid) if paid else None,
                      returned_fen=reader.fen(m, row, returned) if returned else None,
                      fee_fen=reader.fen(m, row, SUMMARY_FEE) if SUMMARY_FEE in row else None)

"""WeChat Pay's daily trade bill as its simulators serve it (v3 and v2 share the file: payments.md §8.3).

`bill_text` writes the ALL layout of one Beijing day from `Ledger.bill_lines(day)` (refunds dated
when they were asked for, as WeChat dates them): backtick-prefixed values, CRLF line ends, one line
per money movement (SUCCESS for a payment, REFUND for a refund with its 退款状态 as it stands now,
REVOKED for a reversal that gave money back), the fee by `Ledger.fee_fen` with five decimals and
negative on the lines that give money back, 特约商户号 `0`, and the summary computed from the lines.

`refusal` says why a day has no bill to give, in the simulators' shared words; each front end
turns it into its platform's answer. `BILL_FAULTS` are the wrong bills a test can ask a simulator
for (its `bill_fault` attribute).
"""

from __future__ import annotations

import datetime as dt
import gzip
from enum import StrEnum

from appliance.payments.bills import beijing_day, beijing_time
from appliance.simulators.ledger import Ledger, Movement

HEADER = ("交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,"
          "应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,商品名称,商户数据包,"
          "手续费,费率,订单金额,申请退款金额,费率备注")
SUMMARY_HEADER = "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额"
#: How far back a bill can be asked for, in calendar months (WeChat: the last three months).
MONTHS_KEPT = 3

#: `bill_fault` values: "hash" (v3: a wrong SHA-1 announced), "summary" (a summary line that
#: disagrees with the lines), "garbled" (the file in GBK: not UTF-8), "plain" (served uncompressed
#: although gzip was asked for, as an access layer that unpacked it would).
BILL_FAULTS = ("hash", "summary", "garbled", "plain")


class Refusal(StrEnum):
    OUT_OF_RANGE = "out_of_range"  # older than MONTHS_KEPT months
    CREATING = "creating"  # today or later, or not generated yet (before 09:00 of the next day)
    EMPTY = "empty"  # no money moved that day


def refusal(ledger: Ledger, day: dt.date) -> Refusal | None:
    """Why the bill of Beijing `day` cannot be had by the ledger's clock, or None when it can."""
    today = beijing_day(ledger.clock())
    months = today.year * 12 + today.month - 1 - MONTHS_KEPT
    if day < today.replace(year=months // 12, month=months % 12 + 1, day=min(today.day, 28)):
        return Refusal.OUT_OF_RANGE
    if day >= today or not ledger.bill_ready(day):
        return Refusal.CREATING
    if not ledger.bill_lines(day):
        return Refusal.EMPTY
    return None


def bill_text(ledger: Ledger, day: dt.date, *, appid: str, mchid: str, fault: str | None = None) -> bytes:
    """The day's bill file (ALL layout, UTF-8, CRLF), or a wrong one for `fault` "summary"/"garbled"."""
    rows = [_row(ledger, m, appid, mchid) for m in ledger.bill_lines(day)]
    sums = {k: sum(r[k] for r in rows) for k in ("settled", "refunded", "fee", "ordered", "asked")}
    if fault == "summary":
        sums["ordered"] += 1
    summary = [str(len(rows)), _yuan(sums["settled"]), _yuan(sums["refunded"]), "0.00", _yuan(sums["fee"], fee=True),
               _yuan(sums["ordered"]), _yuan(sums["asked"])]
    lines = [HEADER, *(_ticked(r["cells"]) for r in rows), SUMMARY_HEADER, _ticked(summary)]
    text = "".join(line + "\r\n" for line in lines)
    return text.encode("gbk" if fault == "garbled" else "utf-8")


def packed(data: bytes, gzipped: bool) -> bytes:
    """The file as it is downloaded: gzip (mtime 0, so one bill always packs alike) or plain."""
    return gzip.compress(data, mtime=0) if gzipped else data


def _row(ledger: Ledger, m: Movement, appid: str, mchid: str) -> dict:
    paid = m.kind == "payment"
    fee = ledger.fee_fen(m.amount_fen) * (1 if paid else -1)
    settled, returned = (m.amount_fen, 0) if paid else (0, m.amount_fen)
    status = {"payment": "SUCCESS", "refund": "REFUND", "revoked": "REVOKED"}[m.kind]
    refund_state = "" if paid else ("PROCESSING" if m.kind == "refund" and m.done_at is None else "SUCCESS")
    cells = [beijing_time(m.at), appid, mchid, "0", "", m.transaction_id, m.out_trade_no,
             "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o", "MICROPAY", status, "OTHERS", "CNY", _yuan(settled), "0.00",
             m.refund_id or ("0" if paid else ""), m.out_refund_no or ("0" if paid else ""), _yuan(returned), "0.00",
             "" if paid else "ORIGINAL", refund_state, "lane sale", "", _yuan(fee, fee=True), "0.60%",
             _yuan(settled), _yuan(returned), ""]
    return {"cells": cells, "settled": settled, "refunded": returned, "fee": fee, "ordered": settled,
            "asked": returned}


def _yuan(fen: int, *, fee: bool = False) -> str:
    """Fen as the bill writes yuan: "12.34", a fee with five decimals ("-0.07000")."""
    text = f"{'-' if fen < 0 else ''}{abs(fen) // 100}.{abs(fen) % 100:02d}"
    return text + "000" if fee else text


def _ticked(cells: list[str]) -> str:
    return ",".join("`" + c for c in cells)

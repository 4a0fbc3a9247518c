"""Alipay's daily bill zip -> Bill (appliance/payments/alipay_bill.py), table-driven over a bill
written here by hand (GBK names without the UTF-8 flag, TAB-suffixed ids, comments, markers,
refunds), each case one damage; and the simulator's zip, as raw bytes and through the parser.
"""

from __future__ import annotations

import datetime as dt
import io
import zipfile

import pytest

from appliance.payments.alipay_bill import bill_link, is_zip, parse_bill
from appliance.payments.bills import BillError, BillState, BillTotals, LineKind, day_start
from appliance.simulators.alipay_bill import bill_zip
from appliance.simulators.ledger import Ledger

DAY = dt.date(2026, 11, 20)
ACCOUNT = "20881021770000010156"
DETAIL_NAME = f"{ACCOUNT}_20261120_业务明细.csv"
SUMMARY_NAME = f"{ACCOUNT}_20261120_业务明细(汇总).csv"

HEADER = ("支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,终端号,对方账户,订单金额（元）,"
          "商家实收（元）,支付宝红包（元）,集分宝（元）,支付宝优惠（元）,商家优惠（元）,券核销金额（元）,券名称,商家红包消费金额（元）,"
          "卡消费金额（元）,退款批次号/请求号,服务费（元）,分润（元）,备注")
PAY_1 = ("2026112022001400001\t,T1\t,交易,饮料,2026-11-20 10:00:00,2026-11-20 10:00:02,S0001,一号店,,L01,cus***@x.com,"
         "12.34,12.34,0.00,0.00,0.00,0.00,0.00,,0.00,0.00,,-0.07,0.00,")
PAY_2 = ("2026112022001400002\t,T2\t,交易,面包,2026-11-20 11:00:00,2026-11-20 11:00:01,S0001,一号店,,L01,cus***@x.com,"
         "5.00,5.00,0.00,0.00,0.00,0.00,0.00,,0.00,0.00,,-0.03,0.00,")
REFUND_1 = ("2026112022001400001\t,T1\t,退款,饮料,2026-11-20 10:00:00,2026-11-20 15:30:00,S0001,一号店,,L01,cus***@x.com,"
            "-2.00,-2.00,0.00,0.00,0.00,0.00,0.00,,0.00,0.00,R1\t,0.01,0.00,")
DETAIL = f"""#支付宝业务明细查询
#账号：[{ACCOUNT}]
#起始日期：[2026年11月20日 00:00:00]   终止日期：[2026年11月21日 00:00:00]
#-----------------------------------------业务明细列表----------------------------------------
{HEADER}
{PAY_1}
{PAY_2}
{REFUND_1}
#-----------------------------------------业务明细列表结束------------------------------------
#交易合计：2笔，商家实收共17.34元，商家优惠共0.00元
#退款合计：1笔，商家实收退款共-2.00元，商家优惠退款共0.00元
#导出时间：[2026年11月21日 09:12:00]
"""
SUMMARY_HEADER = ("门店编号,门店名称,交易订单总笔数,退款订单总笔数,订单金额（元）,商家实收（元）,支付宝优惠（元）,商家优惠（元）,"
                  "卡消费金额（元）,服务费（元）,分润（元）,实收净额（元）")
SUMMARY = f"""#支付宝业务汇总查询
#账号：[{ACCOUNT}]
#起始日期：[2026年11月20日 00:00:00]   终止日期：[2026年11月21日 00:00:00]
#-----------------------------------------业务汇总列表----------------------------------------
{SUMMARY_HEADER}
S0001,一号店,2,1,15.34,15.34,0.00,0.00,0.00,-0.09,0.00,15.25
合计,,2,1,15.34,15.34,0.00,0.00,0.00,-0.09,0.00,15.25
#-----------------------------------------业务汇总列表结束------------------------------------
#导出时间：[2026年11月21日 09:12:00]
"""


def gbk_zip(members: dict[str, bytes]) -> bytes:
    """A zip whose member names are GBK bytes without the UTF-8 flag, written independently of
    the simulator: zipfile writes an ASCII stand-in of the same byte length, then the stand-in's
    bytes are replaced by the GBK name in the local headers and the central directory (names are
    outside the CRC)."""
    out, stand_ins = io.BytesIO(), {}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for i, (name, data) in enumerate(members.items()):
            raw = name.encode("gbk")
            stand_in = f"{i}".ljust(len(raw), "~").encode("ascii")
            stand_ins[stand_in] = raw
            z.writestr(stand_in.decode("ascii"), data)
    data = out.getvalue()
    for stand_in, raw in stand_ins.items():
        assert data.count(stand_in) == 2
        data = data.replace(stand_in, raw)
    return data


def bill_bytes(detail: str = DETAIL, summary: str = SUMMARY, *, encoding: str = "gbk", crlf: bool = True) -> bytes:
    def encode(text: str) -> bytes:
        return (text.replace("\n", "\r\n") if crlf else text).encode(encoding)
    return gbk_zip({DETAIL_NAME: encode(detail), SUMMARY_NAME: encode(summary)})


def test_a_bill_with_payments_and_a_refund():
    bill = parse_bill("ali", DAY, bill_bytes())
    assert bill.state is BillState.FETCHED and (bill.platform, bill.day) == ("ali", DAY)
    assert [(x.out_trade_no, x.platform_txn_id, x.kind, x.amount_fen, x.fee_fen, x.at, x.state, x.out_refund_no)
            for x in bill.lines] == [
        ("T1", "2026112022001400001", LineKind.PAYMENT, 1234, 7, "2026-11-20 10:00:02", "交易", ""),
        ("T2", "2026112022001400002", LineKind.PAYMENT, 500, 3, "2026-11-20 11:00:01", "交易", ""),
        ("T1", "2026112022001400001", LineKind.REFUND, 200, -1, "2026-11-20 15:30:00", "退款", "R1")]
    assert bill.totals == BillTotals(payments=2, returns=1, net_fen=1534, fee_fen=9)


def _lines_ok(bill):
    return len(bill.lines) == 3 and bill.totals.net_fen == 1534


EMPTY_DETAIL = DETAIL.replace(f"{PAY_1}\n{PAY_2}\n{REFUND_1}\n", "").replace("2笔", "0笔").replace("1笔", "0笔")
EMPTY_SUMMARY = SUMMARY.replace("S0001,一号店,2,1,15.34,15.34,0.00,0.00,0.00,-0.09,0.00,15.25\n", "").replace(
    "合计,,2,1,15.34,15.34,0.00,0.00,0.00,-0.09,0.00,15.25", "合计,,0,0,0.00,0.00,0.00,0.00,0.00,0.00,0.00,0.00")



def utf8_named_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:  # zipfile flags non-ASCII names as UTF-8
        z.writestr(DETAIL_NAME, DETAIL.encode("gbk"))
        z.writestr(SUMMARY_NAME, SUMMARY.encode("gbk"))
    return out.getvalue()


OK = [  # (case, the zip's bytes, what the bill must satisfy)
    ("LF line ends", bill_bytes(crlf=False), _lines_ok),
    ("dashed markers without #", bill_bytes(DETAIL.replace("#---", "---")), _lines_ok),
    ("no count comments", bill_bytes(DETAIL.replace("#交易合计", "#x").replace("#退款合计", "#y")), _lines_ok),
    ("columns in another order, mapped by name",
     bill_bytes(DETAIL.replace(HEADER, HEADER.replace("支付宝交易号,商户订单号", "商户订单号,支付宝交易号"))),
     lambda b: b.lines[0].out_trade_no == "2026112022001400001" and b.lines[0].platform_txn_id == "T1"),
    ("names flagged UTF-8 are read too", utf8_named_zip(), _lines_ok),
    ("an empty day: no lines, 合计 of zeros", bill_bytes(EMPTY_DETAIL, EMPTY_SUMMARY),
     lambda b: b.lines == () and b.totals == BillTotals(payments=0, returns=0, net_fen=0, fee_fen=0)),
]


@pytest.mark.parametrize("data, check", [c[1:] for c in OK], ids=[c[0] for c in OK])
def test_ok__variants_of_the_format(data, check):
    bill = parse_bill("ali", DAY, data)
    assert bill.state is BillState.FETCHED and check(bill)


FAIL = [  # (case, the zip's bytes, words the BillError must contain)
    ("not a zip: the expired-link page", "<html>下载超时，请重新下载</html>".encode("utf-8"), "not a readable zip"),
    ("a truncated zip", bill_bytes()[:200], "not a readable zip"),
    ("UTF-8 instead of GBK", bill_bytes(encoding="utf-8"), "not GBK"),
    ("no summary member", gbk_zip({DETAIL_NAME: DETAIL.encode("gbk")}), "0 members named *_业务明细(汇总).csv"),
    ("two detail members", gbk_zip({DETAIL_NAME: b"", "x/" + DETAIL_NAME: b"", SUMMARY_NAME: b""}),
     "2 members named *_业务明细.csv"),
    ("summary counts a payment too many", bill_bytes(summary=SUMMARY.replace("合计,,2,1", "合计,,3,1")),
     "summary disagrees with its lines: payments 3 stated, 2 in the lines"),
    ("summary fee differs", bill_bytes(summary=SUMMARY.replace("0.00,-0.09,0.00,15.25\n#", "0.00,-0.10,0.00,15.25\n#")),
     "fee_fen 10 stated, 9 in the lines"),
    ("summary net differs", bill_bytes(summary=SUMMARY.replace("合计,,2,1,15.34", "合计,,2,1,17.34")),
     "net_fen 1734 stated, 1534"),
    ("no 合计 line", bill_bytes(summary=SUMMARY.replace("合计,,", "S0002,,")), "0 lines 合计"),
    ("detail comment counts differ", bill_bytes(DETAIL.replace("#退款合计：1笔", "#退款合计：2笔")),
     "#退款合计 counts 2, the file lists 1"),
    ("a comma inside a name: one column too many", bill_bytes(DETAIL.replace("饮料,2026-11-20 10:00:00,2026-11-20 10:00:02",
                                                                           "饮,料,2026-11-20 10:00:00,2026-11-20 10:00:02")),
     f"{DETAIL_NAME} line 6: 26 columns, the header has 25"),
    ("a bad amount", bill_bytes(DETAIL.replace(",12.34,12.34,", ",12.345,12.34,")),
     "line 6: 订单金额（元）: an amount finer than a fen"),
    ("a bad fee", bill_bytes(DETAIL.replace(",-0.03,", ",--0.03,")), "line 7: 服务费（元）: not an amount"),
    ("a refund with a positive amount", bill_bytes(DETAIL.replace(",-2.00,-2.00,", ",2.00,-2.00,")),
     "line 8: a 退款 line of 2.00 yuan"),
    ("an unknown 业务类型", bill_bytes(DETAIL.replace(",交易,面包,", ",转账,面包,")), "业务类型 '转账' is neither"),
    ("a bad 完成时间", bill_bytes(DETAIL.replace("2026-11-20 11:00:01", "2026/11/20 11:00")), "完成时间"),
    ("a header column missing", bill_bytes(DETAIL.replace("服务费（元）", "手续费（元）")), "the header lacks 服务费（元）"),
    ("a count that is no number", bill_bytes(summary=SUMMARY.replace("合计,,2,1", "合计,,2,x")),
     "退款订单总笔数 'x' is not a count"),
]


@pytest.mark.parametrize("data, words", [c[1:] for c in FAIL], ids=[c[0] for c in FAIL])
def test_fail__damaged_bills_name_what_and_where(data, words):
    with pytest.raises(BillError) as e:
        parse_bill("ali", DAY, data)
    assert str(e.value).startswith("platform ali: bill of 2026-11-20: ")
    assert words in str(e.value)


def test_is_zip():
    assert is_zip(bill_bytes()) and not is_zip(b"<html>") and not is_zip(b"")


@pytest.mark.parametrize("url, over_http, fetched", [
    ("http://dwbillcenter.alipay.com/downloadBillFile.resource?token=x", False,
     "https://dwbillcenter.alipay.com/downloadBillFile.resource?token=x"),  # Alipay's documented link: over https
    ("http://dwbillcenter.alipay.com/downloadBillFile.resource?token=x", True,
     "http://dwbillcenter.alipay.com/downloadBillFile.resource?token=x"),  # the operator chose http
    ("https://dwbillcenter.alipay.com/x", False, "https://dwbillcenter.alipay.com/x"),
    ("http://alipay.com.example.net/x", True, None),  # not Alipay's domain: refused
    ("http://192.0.2.1/x", True, None),
    ("http://127.0.0.1:9/bill/download", False, "http://127.0.0.1:9/bill/download"),  # a simulator
])
def test_alipays_http_bill_links_are_fetched_over_https_unless_configured(url, over_http, fetched):
    link, why = bill_link(url, over_http)
    assert (link if not why else None) == fetched


def test_the_simulators_zip_has_gbk_names_without_the_utf8_flag_and_parses():
    """The simulator's zip as raw bytes: GBK names, no flag bit 11 (a reader that ignores the
    encoding sees other names), GBK text; and through the parser, its summary agrees with its lines."""
    now = [day_start(DAY) + 10 * 3600]
    ledger = Ledger(clock=lambda: now[0])
    ledger.pay("T1", "280000000000000000", 1234)
    ledger.pay("T2", "280000000000000001", 99_00)
    now[0] += 3600
    ledger.refund("T2", "R1", 10_00)
    data = bill_zip(ledger, DAY)
    assert DETAIL_NAME.encode("gbk")[20:] in data and SUMMARY_NAME.encode("gbk")[20:] in data
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert all(not i.flag_bits & 0x800 for i in z.infolist())
        assert not any(n.endswith("_业务明细.csv") for n in z.namelist())  # cp437 by default: not these names
    with zipfile.ZipFile(io.BytesIO(data), metadata_encoding="gbk") as z:
        detail = z.read(next(n for n in z.namelist() if n.endswith("_业务明细.csv"))).decode("gbk")
    assert "\t," in detail and "#交易合计：2笔" in detail and ",-10.00," in detail
    bill = parse_bill("ali", DAY, data)
    assert [(x.out_trade_no, x.kind, x.amount_fen, x.fee_fen, x.out_refund_no) for x in bill.lines] == [
        ("T1", LineKind.PAYMENT, 1234, 7, ""), ("T2", LineKind.PAYMENT, 9900, 59, ""),
        ("T2", LineKind.REFUND, 1000, -6, "R1")]
    assert bill.totals == BillTotals(payments=2, returns=1, net_fen=1234 + 9900 - 1000, fee_fen=7 + 59 - 6)

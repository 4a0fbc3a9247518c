"""appliance.hq.web: `appliance hq serve` as a real process over HTTP, on SQLite and PostgreSQL: the
headline equals `appliance hq report --json`, the page follows new events, the CSV, masking, bad
input, read-only access and the token."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from appliance.hq import web
from appliance.hq.store import Store, StoreError
from conftest import appliance_cmd, subprocess_env, wait_for
from test_hq_report import AT, DAY, fill, txn
from test_schemas import STATUS, WILL, changed

FULL_CODE = "134567890123456789"
pytestmark = pytest.mark.integration


def events() -> list[dict]:
    return [txn(n=1, fen=1250, funding="CMB_DEBIT"), txn(n=2, seq=2, state="declined", ptype="alipay"),
            txn(n=3, seq=3, fen=700), txn(n=3, seq=4, fen=700, state="refunded"),
            txn(n=4, seq=5, state="unknown", fen=99),
            changed(txn(terminal_id="L02", n=1, fen=5000, ptype="unionpay"), reason=f"refused {FULL_CODE}"),
            txn(store_id="S0002", n=1, fen=333, ptype="alipay", funding="ALIPAYACCOUNT"),
            txn(n=9, seq=9, day="2026-11-30")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`appliance hq serve` on a free loopback port, until stop()."""

    def __init__(self, url: str, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*appliance_cmd(), "hq", "serve", "--db", url, "--listen",
                                      f"127.0.0.1:{self.port}", *extra], env=subprocess_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def up():
            assert self.proc.poll() is None, self.proc.communicate()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        assert wait_for(up, 30)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, str, dict]:
        req = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read().decode(), dict(e.headers)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def filled(hq_db_url):
    store = fill(Store(hq_db_url), events())
    store.set_status(changed(STATUS, terminal_id="L01", backlog=3), AT)
    store.set_status(changed(WILL, terminal_id="L02"), AT)
    store.close()
    return hq_db_url


@pytest.fixture
def server(filled):
    s = Server(filled)
    yield s
    s.stop()


def figures(html: str) -> dict:
    return {k: re.search(rf'<span id="{k}">([^<]*)</span>', html).group(1)
            for k in ("amount", "count", "declined", "cancelled", "open")}


def report_json(url: str) -> dict:
    out = subprocess.run([*appliance_cmd(), "hq", "report", "--db", url, "--date", DAY, "--json"],
                         capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def expected(doc: dict) -> dict:
    s = doc["stores"]
    fen = sum(x["amount_fen"] for x in s)
    return {"amount": f"{fen // 100}.{fen % 100:02d}", "count": str(sum(x["count"] for x in s)),
            "declined": str(sum(x["declined"] for x in s)), "cancelled": str(sum(x["cancelled"] for x in s)),
            "open": str(sum(x["open"] for x in s))}


def test_the_day_page_shows_the_reports_figures_and_follows_new_events(server, filled):
    status, html, headers = server.get(f"/?date={DAY}")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert figures(html) == expected(report_json(filled)) == {
        "amount": "65.83", "count": "3", "declined": "1", "cancelled": "1", "open": "1"}
    assert '<script src="/static/hq.js">' in html and "http" not in html.split("<body>", 1)[1]  # no CDN
    assert re.search(r'L02</a></td><td><span class="offline">offline', html)
    assert re.search(r'L01</a></td><td><span class="online">online</span></td><td>[^<]+</td><td class=n>3</td>'
                     r'<td class=n>1</td>', html)
    assert FULL_CODE not in html
    assert server.get("/static/hq.js")[0] == 200 and server.get("/static/hq.css")[0] == 200
    store = Store(filled)
    try:
        store.add_event(txn(n=5, seq=10, fen=1000, ptype="alipay"), AT)
    finally:
        store.close()
    status, part, _ = server.get(f"/?date={DAY}&part=main")
    assert status == 200 and not part.startswith("<!doctype")
    assert figures(part) == expected(report_json(filled)) and figures(part)["amount"] == "75.83"


def test_the_lane_page_and_the_csv_show_masked_codes_only(server):
    status, html, _ = server.get(f"/lane/S0001/L02?date={DAY}")
    assert status == 200 and "1345**********6789" in html and FULL_CODE not in html and "50.00" in html
    status, text, headers = server.get(f"/payments.csv?date={DAY}")
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    assert headers["Content-Disposition"] == f'attachment; filename="payments-{DAY}.csv"'
    rows = list(csv.DictReader(io.StringIO(text)))
    assert FULL_CODE not in text
    assert sorted((r["store_id"], r["terminal_id"], r["out_trade_no"], r["state"], r["amount"]) for r in rows) == [
        ("S0001", "L01", "S0001_L01_1", "paid", "12.50"), ("S0001", "L01", "S0001_L01_2", "declined", "10.00"),
        ("S0001", "L01", "S0001_L01_3", "refunded", "7.00"), ("S0001", "L01", "S0001_L01_4", "unknown", "0.99"),
        ("S0001", "L02", "S0001_L02_1", "paid", "50.00"), ("S0002", "L01", "S0002_L01_1", "paid", "3.33")]
    assert {r["code"] for r in rows} == {"1345**********6789"}
    _, one, _ = server.get(f"/payments.csv?date={DAY}&store=S0002&terminal=L01")
    assert [r["out_trade_no"] for r in csv.DictReader(io.StringIO(one))] == ["S0002_L01_1"]


def test_bad_input_is_a_400(server):
    for path in ("/?date=2026-13-01", "/?date=20261201", "/?date=2026-12-01'--", "/payments.csv?date=x",
                 "/payments.csv?date=2026-12-01&store=S'1", "/lane/S0001/L%2701?date=2026-12-01"):
        status, body, _ = server.get(path)
        assert status == 400 and "must be" in body, (path, status, body)
    assert server.get(f"/?date={DAY}")[0] == 200


def test_the_server_cannot_write(filled, tmp_path):
    before = hashlib.sha256(Path(filled[len("sqlite:///"):]).read_bytes()).hexdigest() \
        if filled.startswith("sqlite") else None
    s = Server(filled)
    try:
        for path in (f"/?date={DAY}", f"/lane/S0001/L01?date={DAY}", f"/payments.csv?date={DAY}"):
            assert s.get(path)[0] == 200
    finally:
        s.stop()
    if before is not None:
        assert hashlib.sha256(Path(filled[len("sqlite:///"):]).read_bytes()).hexdigest() == before
    store = web.read_only_store(filled)
    try:
        with pytest.raises(StoreError):
            with store.guard():
                store.add_event(txn(n=7, seq=20), AT)
        assert web.payments(store, DAY, "S0002", "L01")[0]["amount"] == "3.33"
    finally:
        store.close()


def test_a_token_is_required_when_set_and_beyond_loopback(filled, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-0123456789\n")
    token_file.chmod(0o600)
    out = subprocess.run([*appliance_cmd(), "hq", "serve", "--db", filled, "--listen", "0.0.0.0:8999"],
                         capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert out.returncode == 2 and "hq.token_file: is required" in out.stderr
    s = Server(filled, "--token-file", str(token_file))
    try:
        assert s.get(f"/?date={DAY}")[0] == 401
        assert s.get(f"/?date={DAY}", {"Authorization": "Bearer s3cret-token-0123456788"})[0] == 401
        assert s.get(f"/payments.csv?date={DAY}", {"Cookie": "hq_token=wrong"})[0] == 401
        assert s.get("/?token=wrong")[0] == 401
        assert s.get(f"/?date={DAY}", {"Authorization": "Bearer s3cret-token-0123456789"})[0] == 200

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None
        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(s.base + "/?token=s3cret-token-0123456789", timeout=30)
        e.value.close()
        assert e.value.code in (302, 303)
        cookie = e.value.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        status, html, _ = s.get(f"/?date={DAY}", {"Cookie": cookie.split(";", 1)[0]})
        assert status == 200 and figures(html)["count"] == "3"
    finally:
        s.stop()


def test_the_day_page_shows_each_platforms_reconciliation(filled):
    import datetime as dt

    from appliance.hq import reconcile
    from appliance.hq.reconcile import Difference, Kind, DayState, Result

    day = dt.date.fromisoformat(DAY)
    store = Store(filled)
    try:
        for r in (Result(day, "wx", "wechat_v3", "bill", DayState.FETCHED, fee_fen=74,
                         matched={"payments": 3, "paid_fen": 6583, "returns": 1, "returned_fen": 100}),
                  Result(day, "ali", "alipay", "bill", DayState.FETCHED, fee_fen=12, differences=[
                      Difference(Kind.NOT_ON_BILL, "S0001_L02_7", "payment", "paid at head office, not on the bill",
                                 store_id="S0001", terminal_id="L02", hq_state="paid", hq_amount_fen=2583),
                      Difference(Kind.NOT_AT_HQ, "X99", "payment", "on the bill only", bill_amount_fen=500)]),
                  Result(day, "jp", "jeepay", "query", DayState.ERROR, error="1 of 2 queries had no definite answer",
                         next_try_at=1_900_000_000.0, note="jeepay has no bill API")):
            reconcile.save(store, r, 1_800_000_000.0)
    finally:
        store.close()
    s = Server(filled)
    try:
        status, html, _ = s.get(f"/?date={DAY}")
    finally:
        s.stop()
    assert status == 200
    assert re.search(r'<p class="rec ok" id="rec-wx">&#10004; wx \(wechat_v3\): bill fetched; 3 payment\(s\) 65.83 '
                     r'and 1 return\(s\) 1.00 matched, fees 0.74</p>', html)
    assert '<p class="rec bad" id="rec-ali">&#10008; ali (alipay): bill fetched;' in html and "2 difference(s)" in html
    assert '<a href="/lane/S0001/L02?date=2026-12-01">S0001/L02</a>' in html  # the lane of a difference, linked
    assert "at head office, not on the bill" in html and "on the bill, not at head office" in html
    assert re.search(r'id="rec-jp">&#8230; jp \(jeepay\): failed: 1 of 2 queries had no definite answer; next try '
                     r'2030-03-17T17:46:40.000Z', html)
    s = Server(filled)
    try:
        assert 'id="rec-none"' in s.get("/?date=2026-12-02")[1]  # a day without one
    finally:
        s.stop()

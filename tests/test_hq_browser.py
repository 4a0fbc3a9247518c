"""The day view in a real browser: Debian's headless Chromium driven by Selenium, over SQLite and
PostgreSQL, fed through the real pipeline. The headline read off the rendered page equals `appliance
hq report --json`; a payment that arrives while the page is open shows without a reload; the lane
page, and its CSV really downloaded by Chromium.

The three lanes' data comes the way it comes in a store: a real mosquitto (the `broker` fixture:
users `lane-S001-01`..`03` and `hq`), a running `appliance hq ingest --db <this test's database>`,
and each lane's schema-valid txn/event/status documents published on its own topics with its own
credentials (one paho client per lane, QoS 1, each PUBACK awaited). Publishing the lanes' exact
payloads, rather than running three `appliance run` lanes (tests/test_hq_end_to_end.py does that),
keeps this test to a few seconds and deterministic: the figures (a refund, a declined, an unknown, a
lane fault, an offline lane, a backlog) are chosen here, not drawn from the sandbox's outcomes.

`make test` installs chromium and chromium-driver (Makefile apt-deps); without them this skips,
saying so. HQ_SCREENSHOTS=DIR saves the screenshots there (docs/ for docs/hq.md)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from appliance.hq.store import Store
from broker import Peer, lane_user
from conftest import appliance_cmd, subprocess_env
from test_hq_end_to_end import _wait
from test_hq_report import DAY, txn
from test_hq_web import FULL_CODE, Server, expected, report_json
from test_schemas import LANE, STATUS, WILL, changed

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FIGURES = ("amount", "count", "declined", "cancelled", "open")
A, B, C = ("S001", "01"), ("S001", "02"), ("S001", "03")  # the broker fixture's lanes
pytestmark = pytest.mark.integration


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium; what it downloads lands in tmp_path/downloads (driver.downloads)."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
        pytest.skip(f"{CHROMIUM} / {DRIVER} missing: make apt-deps installs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,1400", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False,
                                           "download.directory_upgrade": True})
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    driver.set_page_load_timeout(30)
    # headless Chromium may ignore the prefs: the DevTools command sets the same directory for it
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def lane_docs() -> dict[tuple[str, str], list[tuple[str, dict]]]:
    """What each lane publishes, as (topic kind, document): lane 01 a paid, a declined, a paid then
    refunded and an unknown payment, online with a backlog of 3; lane 02 a paid payment (its reason
    carries a full code, which must never show), a scanner fault, then offline; lane 03 one payment."""
    def on(lane, **kw):
        return txn(store_id=lane[0], terminal_id=lane[1], **kw)
    return {
        A: [("txn", on(A, n=1, fen=1250, funding="CMB_DEBIT")), ("txn", on(A, n=2, seq=2, state="declined", ptype="alipay")),
            ("txn", on(A, n=3, seq=3, fen=700)), ("txn", on(A, n=3, seq=4, fen=700, state="refunded")),
            ("txn", on(A, n=4, seq=5, state="unknown", fen=99)),
            ("status", changed(STATUS, store_id=A[0], terminal_id=A[1], backlog=3))],
        B: [("txn", changed(on(B, n=1, fen=5000, ptype="unionpay"), reason=f"refused {FULL_CODE}")),
            ("event", changed(LANE, event_id=uuid.uuid4().hex, store_id=B[0], terminal_id=B[1], seq=2)),
            ("status", changed(WILL, store_id=B[0], terminal_id=B[1]))],
        C: [("txn", on(C, n=1, fen=333, ptype="alipay", funding="ALIPAYACCOUNT")),
            ("status", changed(STATUS, store_id=C[0], terminal_id=C[1], backlog=0))],
    }


class Lanes:
    """One connected paho client per lane, with that lane's own broker user."""

    def __init__(self, broker):
        self.peers = {}
        for lane in (A, B, C):
            peer = Peer(broker, lane_user(*lane), timeout=30)
            assert peer.connect() == 0
            self.peers[lane] = peer

    def publish(self, lane: tuple[str, str], kind: str, doc: dict) -> None:
        """Publish on lanes/<store>/<terminal>/<kind> at QoS 1 (statuses retained, as lanes send
        them) and wait for the PUBACK."""
        rc = self.peers[lane].publish(f"lanes/{lane[0]}/{lane[1]}/{kind}", json.dumps(doc), qos=1,
                                      retain=kind == "status")
        assert rc == 0, (lane, kind, rc)

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()


class Ingest:
    """`appliance hq ingest --db url` against the broker, until stop(); ready once subscribed."""

    def __init__(self, broker, url: str):
        self.proc = subprocess.Popen(
            appliance_cmd() + ["hq", "ingest", "--db", url, "--host", broker.host, "--port", str(broker.port),
                               "--username", "hq", "--password-file", str(broker.password_file("hq"))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env())
        self.log: list[bytes] = []
        threading.Thread(target=lambda: self.log.extend(iter(self.proc.stderr.readline, b"")), daemon=True).start()
        # a share group with no session yet drops what lanes send: wait for head office's subscription
        _wait(lambda: any(b"subscribed:" in line for line in self.log), 60, "head office to subscribe", self.tail)

    def tail(self) -> str:
        return b"".join(self.log)[-2000:].decode(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)
        self.proc.stderr.close()
        assert self.proc.returncode == 0, self.tail()


def stored(url: str) -> tuple[int, dict, int]:
    """(events, {lane: state}, rejects) in the head-office database."""
    store = Store(url, create=False)
    try:
        return (store.Event.select().count(), {(r.store_id, r.terminal_id): r.state for r in store.Lane.select()},
                store.Reject.select().count())
    finally:
        store.close()


def shot(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 1000
    if os.environ.get("HQ_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["HQ_SCREENSHOTS"]) / name)


def figures(driver) -> dict:
    """The headline figures, read in one script: the page swaps its <main> in place every 2 s, so an
    element found a moment before may be gone (stale) by the time its text is read."""
    return driver.execute_script(
        "return Object.fromEntries(arguments[0].map(k => [k, document.getElementById(k).innerText]))",
        list(FIGURES))


def click(driver, by, value) -> None:
    """Find and click, again if the page swapped the element out in between."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.find_element(by, value).click() or True)


def downloaded(directory: Path, timeout: float = 30) -> Path:
    """The one file Chromium finished downloading into `directory` (no .crdownload left)."""
    def done():
        files = list(directory.iterdir())
        return len(files) == 1 and not files[0].name.endswith(".crdownload") and files[0].stat().st_size > 0
    _wait(done, timeout, "Chromium's download", lambda: sorted(p.name for p in directory.iterdir()))
    return next(directory.iterdir())


def reconciled(url: str) -> None:
    """The day's reconciliation as `appliance hq reconcile` stores it: WeChat clean, Alipay with one
    payment of lane 03 missing from its bill (the matching itself: tests/test_hq_reconcile*.py)."""
    from appliance.hq import reconcile
    from appliance.hq.reconcile import DayState, Difference, Kind, Result

    day = dt.date.fromisoformat(DAY)
    store = Store(url)
    try:
        reconcile.save(store, Result(day, "wechat_main", "wechat_v3", "bill", DayState.FETCHED, fee_fen=12, matched={
            "payments": 2, "paid_fen": 1950, "returns": 1, "returned_fen": 700}), time.time())
        reconcile.save(store, Result(day, "alipay_main", "alipay", "bill", DayState.FETCHED, fee_fen=0, differences=[
            Difference(Kind.NOT_ON_BILL, f"{C[0]}_{C[1]}_1", "payment", "paid at head office, not on the platform's "
                       "bill", store_id=C[0], terminal_id=C[1], hq_state="paid", hq_amount_fen=333)]), time.time())
    finally:
        store.close()


def test_the_day_view_in_chromium(browser, broker, hq_db_url, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    Store(hq_db_url).close()  # the schema, so that serve can open the database before ingest has written
    ingest = Ingest(broker, hq_db_url)
    lanes = Lanes(broker)
    server = None
    try:
        docs = lane_docs()
        for lane, sent in docs.items():
            for kind, doc in sent:
                lanes.publish(lane, kind, doc)
        events = sum(kind != "status" for sent in docs.values() for kind, _ in sent)
        _wait(lambda: stored(hq_db_url) == (events, {A: "online", B: "offline", C: "online"}, 0), 60,
              "every lane's messages at head office", lambda: stored(hq_db_url))
        reconciled(hq_db_url)

        server = Server(hq_db_url)
        browser.get(f"{server.base}/?date={DAY}")
        assert figures(browser) == expected(report_json(hq_db_url)) == {
            "amount": "65.83", "count": "3", "declined": "1", "cancelled": "1", "open": "1"}
        WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: d.find_element(By.ID, "hours").is_displayed())
        ok = browser.find_element(By.ID, "rec-wechat_main").text
        assert ok.startswith("\u2714 wechat_main (wechat_v3): bill fetched; 2 payment(s) 19.50"), ok
        assert "1 difference(s)" in browser.find_element(By.ID, "rec-alipay_main").text
        link = browser.find_element(By.LINK_TEXT, f"{C[0]}/{C[1]}")  # the difference's lane
        assert link.get_attribute("href").endswith(f"/lane/{C[0]}/{C[1]}?date={DAY}")
        shot(browser, tmp_path, "hq-day.png")

        browser.execute_script("window.notReloaded = true")
        lanes.publish(C, "txn", txn(store_id=C[0], terminal_id=C[1], n=2, seq=2, fen=4200, ptype="wechat"))
        _wait(lambda: stored(hq_db_url)[0] == events + 1, 60, "the new payment at head office")
        after = expected(report_json(hq_db_url))
        assert after["count"] == "4" and after["amount"] == "107.83"
        t0 = time.monotonic()  # the page polls: within 5 s of the payment being stored (the issue)
        WebDriverWait(browser, 5, poll_frequency=0.1).until(lambda d: figures(d)["count"] == after["count"])
        took = time.monotonic() - t0
        assert figures(browser) == after, took
        assert browser.execute_script("return window.notReloaded === true")

        click(browser, By.LINK_TEXT, B[1])
        WebDriverWait(browser, 30).until(
            lambda d: f"{B[0]} / {B[1]}" in d.execute_script("return document.querySelector('h1').innerText"))
        page = browser.execute_script("return document.querySelector('main').innerText")
        assert "1345**********6789" in page and "50.00" in page and "unplugged" in page
        assert FULL_CODE not in browser.page_source
        shot(browser, tmp_path, "hq-lane.png")

        click(browser, By.ID, "csv")
        got = downloaded(browser.downloads)
        assert got.name == f"payments-{DAY}-{B[0]}-{B[1]}.csv"
        text = got.read_text(encoding="utf-8")
        assert FULL_CODE not in text
        rows = list(csv.DictReader(text.splitlines()))
        assert [(r["out_trade_no"], r["amount"], r["code"]) for r in rows] == [
            (f"{B[0]}_{B[1]}_1", "50.00", "1345**********6789")]
    finally:
        if server:
            server.stop()
        lanes.close()
        ingest.stop()

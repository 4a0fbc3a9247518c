"""The day view in a real browser: Debian's headless Chromium driven by Selenium, over SQLite and
PostgreSQL. The headline read off the rendered page equals `appliance hq report --json`; a payment
ingested while the page is open shows without a reload; the lane page and its CSV.

`make test` installs chromium and chromium-driver (Makefile apt-deps); without them this skips,
saying so. HQ_SCREENSHOTS=DIR saves the screenshots there (docs/ for docs/hq.md)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
from pathlib import Path

import pytest

from appliance.hq.store import Store
from test_hq_report import AT, DAY, fill, txn
from test_hq_web import FULL_CODE, Server, events, expected, report_json
from test_schemas import LANE, STATUS, WILL, changed

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FIGURES = ("amount", "count", "declined", "cancelled", "open")
pytestmark = pytest.mark.integration


@pytest.fixture
def browser(tmp_path):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
        pytest.skip(f"{CHROMIUM} / {DRIVER} missing: make apt-deps installs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,1400", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def three_lanes(url: str) -> None:
    """Events and statuses of three lanes (S0001/L01, S0001/L02, S0002/L01) as ingest stores them."""
    store = fill(Store(url), events())
    store.set_status(changed(STATUS, terminal_id="L01", backlog=3), AT)
    store.set_status(changed(WILL, terminal_id="L02"), AT)
    store.add_event(changed(LANE, terminal_id="L02", seq=2), AT)  # a fault: scanner unplugged
    store.set_status(changed(STATUS, store_id="S0002", terminal_id="L01", backlog=0), AT)
    store.close()


def shot(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 1000
    if os.environ.get("HQ_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["HQ_SCREENSHOTS"]) / name)


def test_the_day_view_in_chromium(browser, hq_db_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    three_lanes(hq_db_url)
    server = Server(hq_db_url)
    try:
        browser.get(f"{server.base}/?date={DAY}")
        shown = {k: browser.find_element(By.ID, k).text for k in FIGURES}
        assert shown == expected(report_json(hq_db_url))
        assert browser.find_element(By.ID, "hours").is_displayed()
        shot(browser, tmp_path, "hq-day.png")

        browser.execute_script("window.notReloaded = true")
        store = Store(hq_db_url)
        try:
            store.add_event(txn(store_id="S0002", n=2, seq=2, fen=4200, ptype="wechat"), AT)
        finally:
            store.close()
        after = expected(report_json(hq_db_url))
        t0 = time.monotonic()
        WebDriverWait(browser, 5, poll_frequency=0.1).until(
            lambda d: d.find_element(By.ID, "count").text == after["count"])
        took = time.monotonic() - t0
        assert {k: browser.find_element(By.ID, k).text for k in FIGURES} == after, took
        assert browser.execute_script("return window.notReloaded === true")

        browser.find_element(By.LINK_TEXT, "L02").click()
        WebDriverWait(browser, 10).until(lambda d: "S0001 / L02" in d.find_element(By.TAG_NAME, "h1").text)
        page = browser.find_element(By.TAG_NAME, "main").text
        assert "1345**********6789" in page and "50.00" in page and "unplugged" in page and FULL_CODE not in browser.page_source
        shot(browser, tmp_path, "hq-lane.png")
        href = browser.find_element(By.ID, "csv").get_attribute("href")
        text = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0]).then(r => r.text()).then(done, e => done('error ' + e));", href)
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [(r["out_trade_no"], r["amount"], r["code"]) for r in rows] == [
            ("S0001_L02_1", "50.00", "1345**********6789")]
    finally:
        server.stop()

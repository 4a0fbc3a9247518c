"""The platform adapters' HTTP layer: addresses, time limits, and nothing-sent vs maybe-sent."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from appliance.errors import ConfigError, NoAnswer, ProviderUnavailable
from appliance.payments import Status
from appliance.payments.http import MAX_ANSWER_BYTES, Gateway, HttpOptions, UntrustedAnswers, link_problem
from appliance.schema import build
from appliance.simulators import Answer, Request, Simulator

pytestmark = pytest.mark.integration


class Echo(Simulator):
    """A loopback server that answers by path: /drop, /slow, /big, /trickle, else echoes the body."""

    kind = "echo"
    hits: list[str]

    def make_keys(self):
        self.hits = []

    def provider_options(self):
        return {}

    def handle(self, req: Request) -> Answer:
        self.hits.append(req.path)
        if req.path == "/drop":
            return Answer(drop=True)
        if req.path == "/slow":
            return Answer(200, b"late", delay_s=1.0)
        if req.path == "/big":
            return Answer(200, b"x" * (MAX_ANSWER_BYTES + 1))
        return Answer(201, req.body or b"hi", {"X-Answer": "yes"})


def options(**raw) -> HttpOptions:
    raw.setdefault("base_url", "https://pay.example.com")
    return build(HttpOptions, raw, "providers.p", Path("."))


def refused_port() -> int:
    """A loopback port nobody listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def echo(tmp_path):
    with Echo(tmp_path / "keys") as sim:
        yield sim


@pytest.mark.parametrize("url,ok", [
    ("https://api.mch.weixin.qq.com", True),
    ("https://openapi.alipay.com/gateway.do", True),
    ("https://pay.example.com:8443/", True),
    ("http://127.0.0.1:9216", True),
    ("http://localhost:9216", True),
    ("http://[::1]:9216", True),
    ("http://127.8.9.10", True),
    ("http://pay.example.com", False),
    ("http://192.168.1.10:9216", False),
    ("ftp://pay.example.com", False),
    ("https://", False),
    ("pay.example.com", False),
    ("https://user:pw@pay.example.com", False),
    ("https://pay.example.com/?x=1", False),
    ("https://pay.example.com:notaport", False),
])
def test_gateway_addresses(url, ok):
    if ok:
        assert options(base_url=url).base_url == url.rstrip("/")
        return
    with pytest.raises(ConfigError) as e:
        options(base_url=url)
    assert e.value.key == "providers.p.base_url"


def test_backup_addresses_are_checked_by_index():
    with pytest.raises(ConfigError) as e:
        options(backup_base_urls=["https://b.example.com", "http://c.example.com"])
    assert e.value.key == "providers.p.backup_base_urls" and "http://c.example.com" in e.value.reason
    with pytest.raises(ConfigError, match="at most 2"):
        options(backup_base_urls=["https://b.example.com"] * 3)


@pytest.mark.parametrize("raw,limit,ok", [
    ({}, 2 + 10, True),
    ({"backup_base_urls": ["https://b.example.com"]}, 4 + 10, True),
    ({"connect_timeout_s": 3.0, "backup_base_urls": ["https://b.example.com"]}, 6 + 10, False),
    ({"read_timeout_s": 7.0}, 2 + 14, False),
])
def test_the_call_limit_stays_under_half_the_watchdog(raw, limit, ok):
    if ok:
        assert options(**raw).call_limit_s == limit
        return
    with pytest.raises(ConfigError) as e:
        options(**raw)
    assert e.value.key == "providers.p.read_timeout_s" and f"= {limit:g} s exceeds 15 s" in e.value.reason


def test_an_answer_is_returned_whatever_its_status(echo):
    g = Gateway(options(base_url=echo.url), key="providers.p")
    r = g.request("POST", "/pay", body=b"abc", headers={"Content-Type": "text/plain"})
    assert (r.status, r.body, r.headers["x-answer"], r.base_url) == (201, b"abc", "yes", echo.url)
    g.close()


def test_a_backup_is_tried_only_while_nothing_was_sent(echo):
    g = Gateway(options(base_url=f"http://127.0.0.1:{refused_port()}", backup_base_urls=[echo.url],
                        connect_timeout_s=0.5), key="providers.p")
    assert g.request("POST", "/pay", body=b"x").base_url == echo.url  # the primary refused: the backup took it
    first = Gateway(options(base_url=echo.url, backup_base_urls=[echo.url + "/"], read_timeout_s=0.3),
                    key="providers.p")
    with pytest.raises(NoAnswer):
        first.request("POST", "/drop")  # maybe arrived: never sent again elsewhere
    assert echo.hits.count("/drop") == 1


def test_nothing_reachable_is_provider_unavailable_naming_every_address(echo):
    echo.stop()
    dead = f"http://127.0.0.1:{refused_port()}"
    g = Gateway(options(base_url=echo.url, backup_base_urls=[dead], connect_timeout_s=0.5), key="providers.p")
    with pytest.raises(ProviderUnavailable) as e:
        g.request("GET", "/")
    assert echo.url in str(e.value) and dead in str(e.value)


@pytest.mark.parametrize("path", ["/drop", "/slow", "/big"])
def test_maybe_sent_without_a_complete_answer_is_no_answer_within_the_limit(echo, path):
    o = options(base_url=echo.url, connect_timeout_s=0.2, read_timeout_s=0.3)
    g = Gateway(o, key="providers.p")
    t0 = time.monotonic()
    with pytest.raises(NoAnswer):
        g.request("POST", path, body=b"x")
    assert time.monotonic() - t0 <= o.call_limit_s + 0.2


def test_a_bad_ca_file_or_client_certificate_is_a_config_error(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as e:
        Gateway(options(ca_file=str(bad)), key="providers.p")
    assert e.value.key == "providers.p.ca_file"
    with pytest.raises(ConfigError) as e:
        Gateway(options(), key="providers.p", client_cert=(bad, bad))
    assert e.value.key == "providers.p.client_cert_file"


def test_an_untrusted_answer_is_unknown_and_logged_once_per_call_and_trade(caplog):
    caplog.set_level(logging.ERROR)
    untrusted = UntrustedAnswers("wx")
    outs = [untrusted.outcome("pay", "T1", "bad signature") for _ in range(3)]
    untrusted.outcome("query", "T1", "bad signature")
    untrusted.outcome("pay", "T2", "no signature")
    assert {o.status for o in outs} == {Status.UNKNOWN}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all(line.startswith("SECURITY: platform wx") for line in lines)


@pytest.mark.parametrize("url, ok", [
    ("https://dwbillcenter.alipay.com/downloadBillFile.resource?bizType=trade&token=x", True),
    ("http://127.0.0.1:8080/bill/download?token=x", True),
    ("http://localhost/bill/download", True),
    ("http://dwbillcenter.alipay.com/downloadBillFile.resource?token=x", False),
    ("ftp://127.0.0.1/bill.zip", False),
    ("https://user:pw@example.com/x", False),
    ("https://example.com:port/x", False),
    ("/relative/path", False),
])
def test_download_links_fetched_only_over_https_or_to_loopback(url, ok):
    assert (link_problem(url) == "") is ok


def test_a_full_download_link_is_the_only_address_and_errors_leave_out_its_token():
    gw = Gateway(options(base_url=f"http://127.0.0.1:{refused_port()}"), key="providers.p")
    link = f"http://127.0.0.1:{refused_port()}/bill/download?token=SECRET1"
    try:
        with pytest.raises(ProviderUnavailable) as e:
            gw.request("GET", link)
    finally:
        gw.close()
    assert str(e.value).startswith(link.partition("?")[0] + "?…: ") and "SECRET1" not in str(e.value)
    assert str(e.value).count("127.0.0.1") == 1  # the link only, not the gateway's base_url

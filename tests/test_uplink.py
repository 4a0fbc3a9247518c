"""The uplink (appliance/uplink/): the outbox drained to a real mosquitto, status, daily totals and
commands, with a real Journal. The faults (broker down, killed, the service killed) are in
tests/test_uplink_faults.py."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from broker import HQ, BrokerTLS, Peer, acl_text
from conftest import lane_dict, wait_for
from uplink_kit import BASE, STORE, TERMINAL, check_all, drained, hq_peer, lane_cfg, lane_events, payments, seqs_of
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.config import from_dict
from appliance.journal import Journal
from appliance.uplink import Backoff, Outage, make_uplink

# --- pure parts -------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_doubling_to_the_ceiling_and_resets():
    b = Backoff(1.0, 60.0, random.Random(7))
    for n in range(12):
        delay = b.next()
        assert 1.0 <= delay <= min(60.0, 2.0 ** n)
    assert {Backoff(1.0, 60.0, random.Random(s)).next() for s in range(5)} == {1.0}  # the first is min_s
    b.reset()
    assert b.next() == 1.0
    late = [b.next() for _ in range(40)][-20:]
    assert max(late) <= 60.0 and len(set(late)) == 20  # jittered, never the same second twice


def test_outage_logs_its_start_once_and_its_end_once(caplog):
    now = [100.0]
    o = Outage(logging.getLogger("test.outage"), "uplink", lambda: now[0])
    with caplog.at_level(logging.DEBUG, "test.outage"):
        assert o.begin("refused") and not o.begin("refused again") and not o.begin("timeout")
        now[0] += 12.5
        assert o.end("backlog 3") and not o.end()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert lines == [("WARNING", "uplink down: refused"), ("INFO", "uplink back after 12.5 s; backlog 3")]
    assert o.reason == "timeout" and not o.active


# --- the drain --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_rows_go_out_in_seq_order_and_are_marked_sent_only_after_their_puback(tmp_path, lane_broker, lane_journal,
                                                                              uplinks):
    hq = hq_peer(lane_broker)
    payments(lane_journal, 150)
    u = uplinks(lane_cfg(tmp_path, lane_broker, max_inflight=20), lane_journal)
    assert drained(lane_journal)
    got = hq.received(300, f"{BASE}/txn")
    assert seqs_of(got) == list(range(1, 301))
    assert {json.loads(m.payload)["event_id"] for m in got} == {e["event_id"] for e in lane_journal.events()}

    # The broker frozen: the lane writes its publishes, no PUBACK comes, nothing is marked sent.
    os.kill(lane_broker.proc.pid, signal.SIGSTOP)
    try:
        payments(lane_journal, 10, start=150)
        time.sleep(1.0)
        assert lane_journal.outbox_state().backlog == 20
    finally:
        os.kill(lane_broker.proc.pid, signal.SIGCONT)
    assert drained(lane_journal)
    assert seqs_of(hq.received(320, f"{BASE}/txn")) == list(range(1, 321))
    state = u.state()
    assert state["connected"] and state["last_ack_seq"] == 320 and state["backlog"] == 0
    check_all(hq.messages)  # txn events, status and daily totals: as head office's schemas want them
    hq.close()


@pytest.mark.integration
def test_a_row_the_broker_refuses_stays_queued_and_is_logged_once(tmp_path, make_broker, lane_journal, uplinks,
                                                                  caplog):
    broker = make_broker(lanes=[(STORE, TERMINAL)], max_queued_messages=1_000_000)
    broker.stop()
    (broker.root / "acl").write_text(acl_text("lanes", broker.lanes).replace(f"topic write {BASE}/txn\n", ""))
    broker.start()
    hq = hq_peer(broker)
    lane_events(lane_journal, 2)
    payments(lane_journal, 1)
    lane_events(lane_journal, 2)
    with caplog.at_level(logging.INFO, "appliance.uplink"):
        u = uplinks(lane_cfg(tmp_path, broker), lane_journal)
        assert wait_for(lambda: lane_journal.outbox_state().last_ack_seq == 6)  # the lane events got through
        time.sleep(2.5)  # several retries of the refused ones
    state = lane_journal.outbox_state()
    assert (state.backlog, state.oldest_queued_seq) == (2, 3)
    assert seqs_of(hq.received(4, f"{BASE}/event"), "event") == [1, 2, 5, 6]
    assert not [m for m in hq.messages if m.topic == f"{BASE}/txn"]
    refusals = [r for r in caplog.records if "refused event seq" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelname == "WARNING" and "Not authorized" in refusals[0].getMessage()
    assert not [r for r in caplog.records if "back after" in r.getMessage()]
    assert u.state()["connected"] and "refused" in u.state()["last_error"]
    check_all(hq.messages)
    hq.close()


@pytest.mark.integration
def test_mqtt_3_1_1_is_selectable(tmp_path, lane_broker, lane_journal, uplinks):
    hq = hq_peer(lane_broker)
    lane_events(lane_journal, 5)
    u = uplinks(lane_cfg(tmp_path, lane_broker, protocol="3.1.1"), lane_journal)
    assert drained(lane_journal)
    assert seqs_of(hq.received(5, f"{BASE}/event"), "event") == [1, 2, 3, 4, 5]
    # mosquitto names MQTT 3.1.1 "p2" (its own numbering; v5 is "p5"); c0: no clean session
    assert f"as {u.client_id} (p2, c0, k30" in lane_broker.log_text()
    check_all(hq.messages)
    hq.close()


# --- status, Last Will, stop ---------------------------------------------------------------------


@pytest.mark.integration
def test_status_online_with_the_lane_then_stopped_both_retained(tmp_path, lane_broker, lane_journal, uplinks):
    health = {"lane": "ready", "faults": {}}
    lane_events(lane_journal, 3)
    cfg = lane_cfg(tmp_path, lane_broker, status_every_s=0.1)
    u = uplinks(cfg, lane_journal, health=lambda: dict(health), platforms=["sandbox", "alipay"])
    assert drained(lane_journal)
    late = Peer(lane_broker, HQ)  # a subscriber that comes later gets the retained status
    late.connect()
    late.subscribe(f"{BASE}/status")
    status = json.loads(late.received(1, f"{BASE}/status")[0].payload)
    assert status["state"] == "online" and status["software_version"]
    assert (status["store_id"], status["terminal_id"], status["lane"], status["faults"]) == (STORE, TERMINAL,
                                                                                            "ready", {})
    assert status["scanner"] == "ok" and status["platforms"] == {"sandbox": "ok", "alipay": "ok"}
    assert status["connected_since"] == u.state()["connected_since"]
    assert wait_for(lambda: json.loads(late.messages[-1].payload).get("backlog") == 0)
    seen = len(late.messages)  # nothing changes now, and still the status comes every status_every_s
    assert wait_for(lambda: len(late.messages) >= seen + 3, 5)
    assert {json.loads(m.payload)["state"] for m in late.messages[seen:]} == {"online"}

    health.update(lane="awaiting_code", faults={"scanner": "scanner unplugged", "platform": "platform alipay misconfigured"})
    assert wait_for(lambda: json.loads(late.messages[-1].payload)["lane"] == "awaiting_code", 5)
    status = json.loads(late.messages[-1].payload)
    assert status["scanner"] == "fault" and status["platforms"] == {"sandbox": "ok", "alipay": "fault"}

    u.close(2.0)
    assert wait_for(lambda: json.loads(late.messages[-1].payload)["state"] == "stopped", 5)
    stopped = json.loads(late.messages[-1].payload)
    assert stopped["backlog"] == 0 and stopped["last_ack_seq"] == 3
    check_all(late.messages)
    late.close()
    again = Peer(lane_broker, HQ)
    again.connect()
    again.subscribe(f"{BASE}/status")
    assert json.loads(again.received(1)[0].payload)["state"] == "stopped"  # retained, and no Last Will
    again.close()


# --- daily totals and day close ------------------------------------------------------------------


@pytest.mark.integration
def test_days_missed_while_off_are_closed_at_start_and_today_s_totals_follow(tmp_path, lane_broker, uplinks):
    now = [datetime(2026, 3, 1, 4, 0, tzinfo=timezone.utc)]  # noon in Shanghai
    journal = Journal(tmp_path / "state", STORE, TERMINAL, clock=lambda: now[0])
    try:
        payments(journal, 2)
        now[0] += timedelta(days=1)
        payments(journal, 1, start=2)
        hq = hq_peer(lane_broker)
        uplinks(lane_cfg(tmp_path, lane_broker, daily_every_s=0.1), journal)
        assert drained(journal)
        daily = [json.loads(m.payload) for m in hq.received(2, f"{BASE}/daily")]
        assert daily[0]["business_date"] == "2026-03-01" and daily[0]["closed"] is True
        assert daily[0]["seq"] == 7 and daily[0]["event_id"]  # a day close is an outbox row
        assert [(t["count"], t["amount_fen"]) for t in daily[0]["totals"]] == [(2, 201)]
        assert daily[1]["business_date"] == "2026-03-02" and daily[1]["closed"] is False
        assert [(t["count"], t["amount_fen"]) for t in daily[1]["totals"]] == [(1, 102)]
        check_all(hq.messages)
        hq.close()
        late = Peer(lane_broker, HQ)
        late.connect()
        late.subscribe(f"{BASE}/daily")
        assert json.loads(late.received(1)[0].payload)["business_date"] == "2026-03-02"  # retained
        late.close()
    finally:
        journal.close()


# --- commands ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_commands_run_on_their_own_thread_and_replies_carry_the_correlation_data(tmp_path, lane_broker, lane_journal,
                                                                                uplinks):
    seen = []

    def commands(name: str, payload: bytes) -> dict:
        seen.append((name, payload, threading.current_thread().name))
        return {"kind": "reply", "version": 1, "command": name, "request_id": json.loads(payload)["request_id"],
                "ok": True, "error": None, "result": {"pong": True}, "store_id": STORE, "terminal_id": TERMINAL,
                "at": "2026-01-01T00:00:00.000Z"}

    u = uplinks(lane_cfg(tmp_path, lane_broker), lane_journal, commands=commands)
    assert wait_for(lambda: u.state()["connected"])
    hq = Peer(lane_broker, HQ)
    hq.connect()
    hq.subscribe(f"{BASE}/cmd/+/reply")
    for correlation, response_topic in [(b"c-1", None), (b"c-2", "elsewhere/reply"),
                                        (b"c-3", f"{BASE}/cmd/other/reply")]:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = correlation
        if response_topic:
            props.ResponseTopic = response_topic
        info = hq.client.publish(f"{BASE}/cmd/ping", json.dumps({"request_id": correlation.decode()}), qos=1,
                                 properties=props)
        info.wait_for_publish(5)
    replies = hq.received(3)
    assert [(m.topic, m.properties.CorrelationData) for m in replies] == [
        (f"{BASE}/cmd/ping/reply", b"c-1"), (f"{BASE}/cmd/ping/reply", b"c-2"), (f"{BASE}/cmd/other/reply", b"c-3")]
    assert json.loads(replies[0].payload)["result"] == {"pong": True}
    check_all(replies)
    assert [(n, t) for n, _, t in seen] == [("ping", "uplink-commands")] * 3
    hq.close()


@pytest.mark.integration
def test_without_a_commands_module_every_command_gets_an_error_reply(tmp_path, lane_broker, lane_journal, uplinks):
    u = uplinks(lane_cfg(tmp_path, lane_broker, protocol="3.1.1"), lane_journal)
    assert wait_for(lambda: u.state()["connected"])
    hq = Peer(lane_broker, HQ)
    hq.connect()
    hq.subscribe(f"{BASE}/cmd/+/reply")
    hq.publish(f"{BASE}/cmd/charge", b'{"request_id":"r1","order":"A1","amount_fen":100}')
    reply, = check_all(hq.received(1))
    assert (reply["ok"], reply["command"], reply["kind"], reply["store_id"]) == (False, "charge", "reply", STORE)
    assert reply["error"]
    hq.close()


# --- the none adapter and state() ---------------------------------------------------------------


def test_none_uplink_sends_nothing_and_reports_the_backlog(tmp_path, lane_journal):
    lane_events(lane_journal, 3)
    u = make_uplink(from_dict(lane_dict(tmp_path / "state")), lane_journal)
    u.start()
    u.sync_now()
    state = u.state()
    u.close()
    assert state == {"kind": "none", "connected": False, "connected_since": None, "last_error": None,
                     "backlog": 3, "oldest_queued_seq": 1, "oldest_queued_at": state["oldest_queued_at"],
                     "last_seq": 3, "last_ack_seq": None, "last_ack_at": None}


# --- TLS -----------------------------------------------------------------------------------------


def _pem(path, data: bytes, mode: int = 0o644):
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def tls_files(tmp_path):
    """A CA, a server certificate for 127.0.0.1 and a lane's client certificate, all issued by it
    (EC P-256: quick to make), and a second CA that issued nothing here."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from appliance.simulators.wechat_v2 import new_certificate

    def key_pem(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def cert_pem(cert):
        return cert.public_bytes(serialization.Encoding.PEM)

    d = tmp_path / "tls"
    d.mkdir()
    ca_key, other_key, server_key, lane_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = new_certificate("test CA", ca_key, ca=True)
    return {
        "ca": _pem(d / "ca.pem", cert_pem(ca)),
        "other_ca": _pem(d / "other-ca.pem", cert_pem(new_certificate("other CA", other_key, ca=True))),
        "server_cert": _pem(d / "server.pem", cert_pem(new_certificate("broker", server_key, issuer=(ca, ca_key),
                                                                       ip="127.0.0.1"))),
        "server_key": _pem(d / "server.key", key_pem(server_key), 0o600),
        "lane_cert": _pem(d / "lane.pem", cert_pem(new_certificate("lane", lane_key, issuer=(ca, ca_key)))),
        "lane_key": _pem(d / "lane.key", key_pem(lane_key), 0o600),
    }


@pytest.mark.integration
def test_tls_with_a_client_certificate_and_a_refused_broker_certificate(tmp_path, make_broker, lane_journal, uplinks,
                                                                        tls_files, caplog):
    f = tls_files
    broker = make_broker(lanes=[(STORE, TERMINAL)], tls=BrokerTLS(f["ca"], f["server_cert"], f["server_key"],
                                                                  require_certificate=True))
    hq = hq_peer(broker)  # on the plain listener
    lane_events(lane_journal, 3)
    tls = {"port": broker.tls_port, "tls": True, "cert_file": str(f["lane_cert"]), "key_file": str(f["lane_key"])}

    with caplog.at_level(logging.INFO, "appliance.uplink"):  # a broker whose certificate the lane does not trust
        u = uplinks(lane_cfg(tmp_path, broker, ca_file=str(f["other_ca"]), **tls), lane_journal)
        assert wait_for(lambda: "not trusted" in (u.state()["last_error"] or ""), 10), u.state()
        u.close(1.0)
    assert lane_journal.outbox_state().backlog == 3 and not hq.messages[1:]
    assert [r.levelname for r in caplog.records if "down:" in r.getMessage()] == ["WARNING"]

    u = uplinks(lane_cfg(tmp_path, broker, ca_file=str(f["ca"]), **tls), lane_journal)
    assert drained(lane_journal)
    assert seqs_of(hq.received(3, f"{BASE}/event"), "event") == [1, 2, 3]
    assert u.state()["connected"]
    hq.close()


# --- an idle uplink sleeps (issue 10) ------------------------------------------------------------


@pytest.mark.integration
def test_an_idle_uplink_sleeps_and_a_commit_or_a_health_change_wakes_it_at_once(tmp_path, lane_broker, lane_journal,
                                                                                 uplinks):
    """No polling: once drained, the uplink does not read the outbox until the journal commits
    (here: a payment from this thread, as the till's would be), nor the lane's health until
    told it changed; each then reaches head office at once, although every timer is an hour away."""
    claims = []
    real_claim = lane_journal.claim
    lane_journal.claim = lambda *a, **kw: (claims.append(time.monotonic()), real_claim(*a, **kw))[1]
    health = {"lane": "ready", "faults": {}}
    reads = []
    hq = hq_peer(lane_broker)
    u = uplinks(lane_cfg(tmp_path, lane_broker, status_every_s=3600.0, daily_every_s=3600.0), lane_journal,
                health=lambda: (reads.append(1), dict(health))[1])
    assert wait_for(lambda: u.state()["connected"])
    assert drained(lane_journal) and wait_for(lambda: hq.messages)
    time.sleep(0.5)
    claims_before, reads_before = len(claims), len(reads)
    time.sleep(1.5)
    assert (len(claims), len(reads)) == (claims_before, reads_before), "the idle uplink looked anyway"

    payments(lane_journal, 1)
    assert wait_for(lambda: len(seqs_of(hq.messages)) == 2, 5)
    health.update(lane="awaiting_code")
    u.health_changed()
    assert wait_for(lambda: any(json.loads(m.payload).get("lane") == "awaiting_code"
                                for m in hq.messages if m.topic == f"{BASE}/status"), 5)
    hq.close()

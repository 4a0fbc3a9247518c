"""The uplink's faults, with a real mosquitto, a real journal and, where the issue asks for a killed
appliance, `appliance run` as a real process: the broker down for 1,000 payments, the broker
killed mid-drain, the service killed mid-drain, the Last Will. The lane loses nothing; duplicates
are allowed (head office de-duplicates by event_id). A killed broker loses what it acknowledged and
had not yet forwarded: that is the broker's durability, not the lane's (see the broker test)."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import time

import pytest
from broker import Peer
from conftest import appliance_cmd, lane_dict, subprocess_env, wait_for, write_config
from uplink_kit import BASE, STORE, TERMINAL, check_all, drained, event_ids, hq_peer, lane_cfg, lane_mqtt, payments, \
    seqs_of

from appliance.journal import Journal

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def paid_state(tmp_path_factory):
    """A state dir whose journal holds 1,000 paid payments (2,000 queued txn events), made once;
    `backlog_of_2000` copies it for a test."""
    state = tmp_path_factory.mktemp("paid") / "state"
    journal = Journal(state, STORE, TERMINAL)
    try:
        payments(journal, 1000)
    finally:
        journal.close()
    return state


@pytest.fixture
def backlog_of_2000(paid_state, tmp_path):
    """tmp_path/state: a copy of paid_state (the journal, its key and id files together: the same lane)."""
    shutil.copytree(paid_state, tmp_path / "state")
    return tmp_path / "state"


def test_broker_down_for_1000_payments_then_up_all_arrive_in_seq_order(tmp_path, lane_broker, backlog_of_2000,
                                                                       uplinks, caplog):
    """1,000 payments taken while the broker was down (the last 20 while the uplink keeps trying)."""
    hq = hq_peer(lane_broker)  # head office's persistent session: what comes while it is away waits for it
    hq.close()
    lane_broker.stop()
    lane_journal = Journal(backlog_of_2000, STORE, TERMINAL)
    with caplog.at_level(logging.INFO, "appliance.uplink"):
        u = uplinks(lane_cfg(tmp_path, lane_broker), lane_journal)
        payments(lane_journal, 20, start=1000)
        assert wait_for(lambda: "refused the connection" in (u.state()["last_error"] or ""))
        time.sleep(1.5)  # more retries, none logged
        lane_broker.start()
        hq = hq_peer(lane_broker, subscribe=False)
        assert drained(lane_journal, 60)
        got = hq.received(2040, f"{BASE}/txn")
    assert seqs_of(got) == list(range(1, 2041))  # all, in seq order, none twice
    lane_journal.close()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "uplink to head office" in r.getMessage()]
    assert [level for level, _ in lines] == ["WARNING", "INFO"], lines  # the outage once, its end once
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert "down: " in lines[0][1] and "refused the connection" in lines[0][1]
    assert "back after" in lines[1][1]
    hq.close()


def test_broker_killed_mid_drain_and_restarted_every_event_it_had_not_acknowledged_goes_out_again(
        tmp_path, make_broker, backlog_of_2000, uplinks):
    """The lane's part of "nothing lost": a row is marked sent only once the broker acknowledged it,
    and every other row is sent again to the restarted broker. What the killed broker had
    acknowledged but not yet forwarded to head office dies with it (mosquitto acknowledges a QoS 1
    publish from memory; its persistence is periodic): those rows, and only those, may be missing,
    and only between the last one head office got and the last one the broker acknowledged."""
    # The broker saves its database every second: head office's session (its subscription) survives
    # the kill, so what the lane sends the restarted broker waits for head office.
    lane_broker = make_broker(lanes=[(STORE, TERMINAL)], max_queued_messages=1_000_000, autosave_interval=1)
    hq = hq_peer(lane_broker)
    assert wait_for(lambda: (lane_broker.root / "data" / "mosquitto.db").exists(), 5)
    lane_journal = Journal(backlog_of_2000, STORE, TERMINAL)
    u = uplinks(lane_cfg(tmp_path, lane_broker, max_inflight=10), lane_journal)
    assert wait_for(lambda: len(hq.messages) >= 400)
    lane_broker.kill()
    before = seqs_of(hq.messages)
    assert wait_for(lambda: not u.state()["connected"])
    # Once the loss is seen, the PUBACKs that came before it are marked sent (at once: nothing more
    # can come); PUBACKs come in order, so seqs 1..acked are what the killed broker acknowledged.
    def settled() -> bool:
        before = lane_journal.outbox_state().last_ack_seq
        time.sleep(0.2)
        return lane_journal.outbox_state().last_ack_seq == before

    assert wait_for(settled)
    acked = lane_journal.outbox_state().last_ack_seq
    assert lane_journal.outbox_state().backlog == 2000 - acked
    assert 0 < acked < 2000, "the kill came too late: nothing was left to drain"
    lane_broker.start()  # on the same port
    hq = hq_peer(lane_broker, subscribe=False)  # head office's session, as last saved
    assert drained(lane_journal, 60)
    assert wait_for(lambda: set(range(acked + 1, 2001)) <= set(seqs_of(hq.messages)), 20), (
        "rows the killed broker had not acknowledged were not sent again: "
        f"{sorted(set(range(acked + 1, 2001)) - set(seqs_of(hq.messages)))[:20]}, acked {acked}, "
        f"head office had {len(before)} before, max {max(before)}")
    lost_in_broker = set(range(1, 2001)) - set(before) - set(seqs_of(hq.messages))
    assert all(max(before) < seq <= acked for seq in lost_in_broker), sorted(lost_in_broker)
    hq.close()
    lane_journal.close()


def _start(conf, log_path, **env):
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log, env=subprocess_env(**env))
    finally:
        log.close()


def test_service_killed_mid_drain_resends_at_least_once_and_its_last_will_says_offline(tmp_path, lane_broker,
                                                                                       backlog_of_2000):
    state = backlog_of_2000
    conf = write_config(tmp_path / "appliance.toml", lane_dict(
        state, mqtt=lane_mqtt(lane_broker, keepalive_s=1, max_inflight=1)))
    hq = hq_peer(lane_broker)
    log_path = tmp_path / "run.log"
    # SIGKILLed mid-drain: at its first commit of acknowledged rows (a kill after seeing some acked
    # raced a drain that, with no other thread polling, can end within one poll of the test)
    procs = [_start(conf, log_path, APPLIANCE_CRASH_AT="journal.ack.after_commit:1")]
    readonly = Journal(state, STORE, TERMINAL, readonly=True)
    try:
        assert procs[0].wait(60) == -signal.SIGKILL, log_path.read_text()
        assert (readonly.outbox_state().last_ack_seq or 0) > 1
        assert wait_for(lambda: json.loads(hq.messages[-1].payload).get("state") == "offline", 10), (
            "no Last Will within 1.5 x keepalive")
        assert hq.messages[-1].topic == f"{BASE}/status"
        check_all(hq.messages[-1:])  # the Last Will, as head office's schema wants it
        assert 0 < readonly.outbox_state().backlog < 2000

        procs.append(_start(conf, log_path))
        assert drained(readonly, 60), log_path.read_text()
        wanted = {e["event_id"] for e in readonly.events()}
        assert wait_for(lambda: event_ids(hq.messages) >= wanted, 20), len(wanted - event_ids(hq.messages))

        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(10) == 0
    finally:
        readonly.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    late = Peer(lane_broker, "hq")
    late.connect()
    late.subscribe(f"{BASE}/status")
    assert json.loads(late.received(1)[0].payload)["state"] == "stopped"  # retained: a clean stop, no Last Will
    late.close()
    hq.close()
    text = log_path.read_text()
    assert "Traceback" not in text and "uplink stopped (backlog 0)" in text

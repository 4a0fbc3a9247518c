"""The composition root: both real scanner adapters inside the running service."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from appliance import service
from appliance.config import from_dict
from appliance.indicator import Signal, make_indicator
from appliance.journal import Journal, State
from appliance.scan.evdev import EvdevScanner
from appliance.scan.stdin import StdinScanner
from appliance.wakeup import Stop
from conftest import WECHAT_PAID, appliance_cmd, lane_dict, subprocess_env, write_config
from test_scan_evdev import FakeDevice, Opener, typed

pytestmark = pytest.mark.integration


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _run_in_thread(cfg, scanner):
    lane = service.build(cfg, indicator=make_indicator(cfg.indicator))
    stop = Stop()
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("rc", service.run(cfg, stop=stop, scanner=scanner,
                                                                            lane=lane)))
    t.start()
    return lane, stop, t, done


def test_evdev_scanner_inside_the_service(tmp_path):
    cfg = from_dict(lane_dict(tmp_path / "state", scanner={"kind": "evdev", "device": "/dev/scanner"}))
    device = FakeDevice("/dev/scanner")
    opener = Opener(device)
    lane, stop, t, done = _run_in_thread(cfg, EvdevScanner(cfg.scanner, open_device=opener))
    try:
        _wait(lambda: device.grabbed)
        device.push(typed("ORD:A12:12.34\n"))
        _wait(lambda: lane.indicator.current is Signal.AWAITING_CODE)
        device.push(typed(WECHAT_PAID + "\n"))
        _wait(lambda: any(tx.state is State.PAID for tx in lane.journal.recent()))
        device.unplug()
        _wait(lambda: lane.indicator.current is Signal.FAULT)
        opener.push(FakeDevice("/dev/scanner"))
        _wait(lambda: lane.indicator.current is Signal.READY)
    finally:
        stop.set()
        t.join(timeout=5)
    assert done["rc"] == 0 and not t.is_alive()
    [txn] = lane.journal.recent()
    assert (txn.order, txn.amount_fen, txn.payment_type) == ("A12", 1234, "wechat")


def test_serial_scanner_inside_appliance_run(tmp_path):
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    conf = write_config(tmp_path / "a.toml", lane_dict(
        tmp_path / "state", scanner={"kind": "serial", "device": path, "baudrate": 115200, "terminator": "CR"},
        indicator={"kind": "log"}))
    proc = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    journal = Journal(tmp_path / "state", "S0001", "L01")
    watchdog = threading.Timer(30, proc.kill)  # never hang the suite on a silent service
    watchdog.start()
    try:
        for line in proc.stderr:  # the port is opened (and its input flushed) at start: wait for it
            if "Reading" in line:
                break
        os.write(master, b"ORD:S7:3.50\r")
        os.write(master, WECHAT_PAID.encode()[:9])
        os.write(master, WECHAT_PAID.encode()[9:] + b"\r")
        _wait(lambda: any(tx.state is State.PAID for tx in journal.recent()))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        watchdog.cancel()
        os.close(master)
    assert proc.returncode == 0, err
    [txn] = journal.recent()
    assert (txn.order, txn.amount_fen) == ("S7", 350)
    assert WECHAT_PAID not in err
    journal.close()



def test_the_service_queues_started_and_stopped_for_head_office(tmp_path):
    """`appliance run` (in-process) with [mqtt] enabled = false: the lane events wait in the outbox."""
    cfg = from_dict(lane_dict(tmp_path / "state"))
    stop = Stop()
    threading.Timer(0.5, stop.set).start()
    assert service.run(cfg, stop=stop) == 0
    journal = Journal(tmp_path / "state", "S0001", "L01", readonly=True)
    try:
        events = journal.events()
        state = journal.outbox_state()
    finally:
        journal.close()
    assert [(e["kind"], e["event"]) for e in events] == [("lane", "started"), ("lane", "stopped")]
    assert events[0]["detail"] == {"software_version": "0.1.0", "open_payments": 0, "uplink": "none"}
    assert events[1]["detail"] == {"waiting_on_platform": False}
    assert (state.backlog, state.last_ack_seq) == (2, None)


def test_the_service_answers_head_office_over_mqtt_and_reports_its_lane(tmp_path, lane_broker):
    """`appliance run` (in-process) with [mqtt] enabled: commands reach the service's own till (a
    charge arms it, the status shows it), sync reports the uplink, the events go out."""
    from broker import HQ, Peer
    from uplink_kit import BASE, check_all, lane_mqtt

    cfg = from_dict(lane_dict(tmp_path / "state", mqtt=lane_mqtt(lane_broker, status_every_s=0.1)))
    hq = Peer(lane_broker, HQ)
    hq.connect()
    hq.subscribe(f"{BASE}/#")
    lane, stop, t, done = _run_in_thread(cfg, None)
    try:
        _wait(lambda: lane.uplink.state()["connected"])
        hq.publish(f"{BASE}/cmd/sync", b'{"request_id":"s1"}')
        hq.publish(f"{BASE}/cmd/charge", b'{"request_id":"c1","order":"A1","amount_fen":1250}')
        _wait(lambda: len([m for m in hq.messages if m.topic.endswith("/reply")]) == 2)
        replies = {json.loads(m.payload)["command"]: json.loads(m.payload) for m in hq.messages
                   if m.topic.endswith("/reply")}
        assert replies["sync"]["ok"] and replies["sync"]["result"]["connected"] is True
        assert replies["charge"]["ok"] and replies["charge"]["result"]["state"] == "awaiting_code"
        _wait(lambda: any(json.loads(m.payload).get("lane") == "awaiting_code" for m in hq.messages
                          if m.topic == f"{BASE}/status"))
    finally:
        stop.set()
        t.join(timeout=15)
    assert done["rc"] == 0
    events = [json.loads(m.payload) for m in hq.messages if m.topic == f"{BASE}/event"]
    assert [e["event"] for e in events] == ["started", "stopped"]
    statuses = [json.loads(m.payload)["state"] for m in hq.messages if m.topic == f"{BASE}/status"]
    assert statuses[0] == "online" and statuses[-1] == "stopped"
    check_all(hq.messages)
    hq.close()


def test_a_stop_ends_every_sleeping_thread_at_once(tmp_path):
    """An idle lane's threads sleep without timeouts (till, resolver, control socket, a scanner
    waiting on input that never comes); a stop still ends each of them at once."""
    cfg = from_dict(lane_dict(tmp_path / "state"))
    r, w = os.pipe()
    before = set(threading.enumerate())
    lane, stop, t, done = _run_in_thread(cfg, StdinScanner(fd=r))
    try:
        _wait(lambda: (tmp_path / "state" / "control.sock").exists())
        time.sleep(0.5)  # every thread is asleep by now
        started = set(threading.enumerate()) - before - {t}
        assert {"till", "resolver", "control", "scanner-stdin", "filewatch"} <= {th.name for th in started}
        t0 = time.monotonic()
        stop.set()
        t.join(10)
        took = time.monotonic() - t0
    finally:
        stop.set()
        os.close(w)
    assert done["rc"] == 0 and took < 2.0, took
    assert [th.name for th in started if th.is_alive()] == []
    os.close(r)

"""End to end, all real: three `appliance run` lanes (stdin scanners, the sandbox platform) → a real
mosquitto with one user per lane → `appliance hq ingest` on SQLite → `appliance hq report`, whose
totals must equal what each lane's own journal says for the day."""

import json
import signal
import subprocess
import threading
import time

import pytest

from appliance.errors import JournalError
from appliance.journal import Journal
from conftest import appliance_cmd, lane_dict, subprocess_env, write_config

pytestmark = pytest.mark.integration

LANES = (("S001", "01"), ("S001", "02"), ("S001", "03"))


def _scans(n: int) -> list[tuple[str, str]]:
    """One lane's day, as cashier actions: paid, declined, paid after the password, paid then
    cancelled, on both payment types (the sandbox's outcomes by the code's last two digits)."""
    return [(f"ORD:E{n}a:12.50", f"1300000000{n:06d}07"),
            (f"ORD:E{n}b:3.00", f"2800000000{n:06d}90"),
            (f"ORD:E{n}c:88.80", f"2800000000{n:06d}92"),
            (f"ORD:E{n}d:7.00", f"1300000001{n:06d}08"),
            ("CMD:CANCEL", f"ORD:E{n}d:7.00")]


def _journal(state_dir, store, terminal):
    return Journal(state_dir, store, terminal, readonly=True)


def _settled(state_dir, store, terminal, actions: int) -> bool:
    """The lane finished its `actions`-th cashier action (a payment or a cancel) and the outbox is
    drained: the lane is ready for the next one, and head office has been sent everything."""
    try:
        j = _journal(state_dir, store, terminal)
    except JournalError:  # the service has not made it yet
        return False
    try:
        cancels = sum(1 for e in j.events() if e.get("state") == "cancel_requested")
        return (len(j.recent()) + cancels >= actions and not j.open_txns()
                and j.outbox_state().backlog == 0)
    finally:
        j.close()


def _wait(predicate, timeout, what, show=None):
    """Poll `predicate` until true; else fail naming `what` (and what `show()` says)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f": {show()}" if show else ""))


def test_payments_on_three_lanes_reach_head_office_once_and_the_report_matches_the_journals(tmp_path, broker):
    from appliance.hq.store import Store

    db = f"sqlite:///{tmp_path / 'hq.sqlite'}"
    hq = subprocess.Popen(appliance_cmd() + ["hq", "ingest", "--db", db, "--host", broker.host, "--port",
                                            str(broker.port), "--username", "hq", "--password-file",
                                            str(broker.password_file("hq"))],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env())
    log = []
    threading.Thread(target=lambda: log.extend(iter(hq.stderr.readline, b"")), daemon=True).start()
    lanes = []
    try:
        # Head office's session must exist before lanes send: a share group without one drops messages.
        _wait(lambda: any(b"subscribed:" in line for line in log), 30, "head office to subscribe")
        for n, (store, terminal) in enumerate(LANES):
            state = tmp_path / f"lane{n}" / "state"
            doc = lane_dict(state, terminal={"store_id": store, "terminal_id": terminal},
                            scanner={"kind": "stdin"}, indicator={"kind": "log"},
                            mqtt={**broker.mqtt_config(store, terminal), "daily_every_s": 0.2,
                                                                            "status_every_s": 0.2})
            conf = write_config(tmp_path / f"lane{n}.toml", doc)
            with open(tmp_path / f"lane{n}.log", "wb") as err:
                proc = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=err, env=subprocess_env())
            lanes.append((store, terminal, state, proc))
        for n, (store, terminal, state, proc) in enumerate(lanes):
            for k, action in enumerate(_scans(n), start=1):  # the till takes the next order once it is ready
                proc.stdin.write("".join(t + "\n" for t in action).encode())
                proc.stdin.flush()
                _wait(lambda: _settled(state, store, terminal, k), 30,  # noqa: B023 (called at once)
                      f"action {k} on lane {store}/{terminal}")

        day = _journal(lanes[0][2], *LANES[0]).business_date_now()
        expected, last_seqs = {}, {}
        for store, terminal, state, _ in lanes:
            j = _journal(state, store, terminal)
            assert sorted(t.state for t in j.recent()) == ["cancelled", "declined", "paid", "paid"]
            expected[(store, terminal)] = j.daily(day)["totals"]
            last_seqs[(store, terminal)] = j.outbox_state().last_seq
            j.close()

        def report():
            r = subprocess.run(appliance_cmd() + ["hq", "report", "--db", db, "--date", day, "--json"],
                               capture_output=True, text=True, env=subprocess_env(), timeout=60)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        def by_lane(rep):
            got = {}
            for row in rep["totals"]:
                key = (row["store_id"], row["terminal_id"])
                got.setdefault(key, []).append({k: v for k, v in row.items() if k not in ("store_id", "terminal_id")})
            return got

        def stored_seqs():
            store = Store(db, create=False)
            try:
                E = store.Event
                return {(s, t): [e.seq for e in E.select(E.seq).where(E.store_id == s, E.terminal_id == t)
                                 .order_by(E.seq)] for s, t in LANES}
            finally:
                store.close()

        # every event of every lane, stored exactly once (a duplicate event_id is a no-op there)
        _wait(lambda: stored_seqs() == {k: list(range(1, n + 1)) for k, n in last_seqs.items()}, 30,
              "every event at head office", lambda: (stored_seqs(), last_seqs))
        rep = report()
        assert by_lane(rep) == expected  # per store, terminal, payment type and funding source
        [s001] = rep["stores"]  # per lane: two paid, one declined, one cancelled
        assert (s001["count"], s001["declined"], s001["cancelled"]) == (6, 3, 3)
        assert rep["mismatches"] == []
        _wait(lambda: report()["attention"] == [], 30, "every lane online with no backlog at head office")

        for *_, proc in lanes:  # a clean stop shows `stopped` at head office (the retained status)
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(15) for *_, proc in lanes] == [0, 0, 0]
        _wait(lambda: _lane_states(db) == {lane: "stopped" for lane in LANES}, 30, "every lane stopped")
        assert {a["state"] for a in report()["attention"]} == {"stopped"}
    finally:
        for *_, proc in lanes:
            proc.kill()
            proc.stdin.close()
            proc.wait(15)
        hq.send_signal(signal.SIGTERM)
        hq.wait(15)
        hq.stderr.close()
    assert hq.returncode == 0, b"".join(log)[-2000:]


def _lane_states(db) -> dict:
    from appliance.hq.store import Store

    store = Store(db, create=False)
    try:
        return {(r.store_id, r.terminal_id): r.state for r in store.Lane.select()}
    finally:
        store.close()


def _payments(state_dir, store, terminal, count: int) -> None:
    """`count` paid payments journaled while no service ran (their events wait in the outbox)."""
    from appliance.journal import State

    j = Journal(state_dir, store, terminal)
    try:
        for n in range(count):
            t = j.open_payment(order=f"K{n}", amount_fen=100 + n, payment_type="wechat", platform="sandbox",
                               code=f"13{n:016d}")
            j.transition(t.txn_id, State.PAID, "SUCCESS", platform_txn_id=f"sbx{n}")
    finally:
        j.close()


def test_the_lane_head_office_and_the_broker_stopped_mid_drain_store_every_event_exactly_once(tmp_path, broker):
    """A lane drains 1,200 queued events: its service is SIGKILLed mid-drain (at a crash point of
    its outbox commits), the broker restarts (a clean stop: mosquitto saves its sessions then; a
    SIGKILLed mosquitto loses what it had acknowledged and not delivered, tests/broker.py), and head
    office's ingest is SIGKILLed while the restarted lane drains (its session at the broker keeps
    its share meanwhile): head office ends with every seq exactly once."""
    from appliance.hq.store import Store

    store_id, terminal_id = LANES[0]
    state = tmp_path / "state"
    _payments(state, store_id, terminal_id, 600)  # 1,200 events (pending, paid), then the lane's own
    doc = lane_dict(state, terminal={"store_id": store_id, "terminal_id": terminal_id},
                    mqtt={**broker.mqtt_config(store_id, terminal_id), "max_inflight": 5, "reconnect_max_s": 1.0})
    conf = write_config(tmp_path / "lane.toml", doc)
    db = f"sqlite:///{tmp_path / 'hq.sqlite'}"
    hq_cmd = appliance_cmd() + ["hq", "ingest", "--db", db, "--host", broker.host, "--port", str(broker.port),
                                "--username", "hq", "--password-file", str(broker.password_file("hq"))]
    lane_cmd = appliance_cmd() + ["run", "--config", str(conf)]
    procs = []

    def start(cmd, name, **env):
        with open(tmp_path / f"{name}.log", "ab") as err:
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                          env=subprocess_env(**env)))
        return procs[-1]

    def stored() -> list[int]:
        s = Store(db, create=False)
        try:
            return [e.seq for e in s.Event.select(s.Event.seq).order_by(s.Event.seq)]
        finally:
            s.close()

    try:
        hq = start(hq_cmd, "hq")
        _wait(lambda: b"subscribed:" in (tmp_path / "hq.log").read_bytes(), 30, "head office to subscribe")
        lane = start(lane_cmd, "lane", APPLIANCE_CRASH_AT="journal.ack.after_commit:1")  # mid-drain
        assert lane.wait(60) == -signal.SIGKILL
        assert 0 < _outbox(state, store_id, terminal_id).backlog < 1200, "the lane died outside its drain"
        broker.stop()  # a clean restart on the same port, with the sessions it saved
        broker.start()
        # mosquitto 2.0 forgets shared subscriptions at a restart (docs/mqtt.md, Broker settings):
        # what lanes send before head office subscribes again reaches nobody. Wait for it.
        _wait(lambda: (tmp_path / "hq.log").read_bytes().count(b"subscribed:") >= 2, 30,
              "head office to subscribe again")
        before = len(stored())  # taken before the lane starts: a quick drain may be over by the next line
        lane = start(lane_cmd, "lane")
        _wait(lambda: len(stored()) > before, 60, "the restarted lane's events at head office")
        hq.kill()  # mid-drain: what it had not committed it had not acknowledged, and comes again
        hq.wait()
        hq = start(hq_cmd, "hq")
        _wait(lambda: _outbox(state, store_id, terminal_id).backlog == 0, 60, "the lane to drain")
        last_seq = _outbox(state, store_id, terminal_id).last_seq
        _wait(lambda: stored()[:last_seq] == list(range(1, last_seq + 1)), 60, "every event at head office",
              lambda: (last_seq, sorted(set(range(1, last_seq + 1)) - set(stored()))))
        assert len(stored()) == len(set(stored()))  # exactly once: the unique event_id
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(15)


def _outbox(state_dir, store, terminal):
    j = _journal(state_dir, store, terminal)
    try:
        return j.outbox_state()
    finally:
        j.close()


def test_head_office_commands_reach_the_running_lane_through_the_broker(tmp_path, broker):
    """`charge` (the register pushes the order), then the customer's code on the scanner; `cancel`,
    `ping`, `sync` over the real broker with head office's credentials; malformed, oversized and
    unknown commands get error replies and change nothing."""
    from broker import Peer

    store_id, terminal_id = LANES[0]
    base = f"lanes/{store_id}/{terminal_id}"
    state = tmp_path / "state"
    doc = lane_dict(state, terminal={"store_id": store_id, "terminal_id": terminal_id},
                    scanner={"kind": "stdin"}, indicator={"kind": "log"}, mqtt=broker.mqtt_config(store_id, terminal_id))
    conf = write_config(tmp_path / "lane.toml", doc)
    hq = Peer(broker, "hq")
    hq.connect()
    hq.subscribe(f"{base}/cmd/+/reply")
    with open(tmp_path / "lane.log", "wb") as err:
        lane = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=err, env=subprocess_env())
    replies = 0

    def ask(name: str, payload) -> dict:
        nonlocal replies
        hq.publish(f"{base}/cmd/{name}", payload if isinstance(payload, bytes) else json.dumps(payload))
        replies += 1
        got = json.loads(hq.received(replies)[-1].payload)
        assert got["command"] == name and got["kind"] == "reply"
        return got

    try:
        _wait(lambda: b"uplink connected" in (tmp_path / "lane.log").read_bytes(), 30, "the lane's uplink")
        hq.timeout = 20
        assert ask("ping", {"request_id": "p1"})["result"] == {"pong": True}

        bad = [("charge", b"not json"), ("charge", b"{" + b" " * 5000 + b"}"), ("reboot", {"request_id": "x1"}),
               ("charge", {"request_id": "c/1", "order": "R1", "amount_fen": 100}),
               ("charge", {"request_id": "c1", "order": "R#1", "amount_fen": 100}),
               ("charge", {"request_id": "c1", "order": "R1", "amount_fen": 100, "code": "134567890123456789"}),
               ("cancel", {"request_id": "c1"})]
        for name, payload in bad:
            reply = ask(name, payload)
            assert reply["ok"] is False and reply["error"], (name, payload, reply)
            assert "134567890123456789" not in json.dumps(reply)
        assert _payments_of(state) == []  # nothing journaled

        armed = ask("charge", {"request_id": "c2", "order": "R1", "amount_fen": 1250})
        assert armed["ok"] is True and armed["result"]["state"] == "awaiting_code", armed
        lane.stdin.write(b"134567890123450107\n")  # the customer's code, on the lane's scanner
        lane.stdin.flush()
        _wait(lambda: _payments_of(state) == [("R1", 1250, "paid")], 30, "the register's order to be paid")

        cancelled = ask("cancel", {"request_id": "k1", "order": "R1"})
        assert cancelled["ok"] is True and cancelled["result"]["state"] == "cancelled", cancelled
        synced = ask("sync", {"request_id": "s1"})
        assert synced["ok"] is True and synced["result"]["connected"] is True and "backlog" in synced["result"]
    finally:
        lane.send_signal(signal.SIGTERM)
        lane.stdin.close()
        lane.wait(15)
        hq.close()
    assert lane.returncode == 0


def _payments_of(state_dir) -> list[tuple]:
    try:
        j = _journal(state_dir, *LANES[0])
    except JournalError:  # none yet
        return []
    try:
        return [(t.order, t.amount_fen, str(t.state)) for t in j.recent()]
    finally:
        j.close()

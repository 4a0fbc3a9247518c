"""appliance.hq.ingest against a real mosquitto (tests/broker.py) and real databases: messages as lanes
publish them, stored once; rejects recorded and the consumer alive; nothing acknowledged that was not
stored; two `appliance hq ingest` processes in one share group."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import uuid
from contextlib import contextmanager

import pytest

from appliance.hq.config import load
from appliance.hq.ingest import Ingest, Message, Router, subscriptions
from appliance.hq.store import Store
from broker import HQ, Peer, lane_user
from conftest import POSTGRES, appliance_cmd, subprocess_env, wait_for
from test_schemas import DAILY, LANE, STATUS, TXN, WILL, changed

pytestmark = pytest.mark.integration

LANES = (("S001", "01"), ("S001", "02"), ("S001", "03"))  # tests/broker.py's default lanes


def hq_config(broker, db_url: str, client_id: str = "hq-test-1", **more):
    return load(None, {"db": db_url, "host": broker.host, "port": broker.port, "username": HQ,
                       "password_file": str(broker.password_file(HQ)), "client_id": client_id,
                       "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, **more}).hq


def ids(store_id: str, terminal_id: str, doc: dict, **more) -> dict:
    return changed(doc, store_id=store_id, terminal_id=terminal_id, **more)


def txn(store_id: str, terminal_id: str, seq: int) -> dict:
    return ids(store_id, terminal_id, TXN, event_id=uuid.uuid4().hex, seq=seq, txn_id=seq,
               out_trade_no=f"{store_id}_{terminal_id}_{seq}")


def body(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@contextmanager
def ingesting(cfg):
    """An Ingest on a thread of this process, subscribed; stopped (SIGTERM's path) at the end."""
    stop = threading.Event()
    ingest = Ingest(cfg, Store(cfg.db))
    thread = threading.Thread(target=ingest.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert ingest.subscribed.wait(20), "ingest did not subscribe"
        yield ingest
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


@contextmanager
def lane(broker, store_id="S001", terminal_id="01"):
    peer = Peer(broker, lane_user(store_id, terminal_id))
    assert peer.connect() == 0
    try:
        yield peer
    finally:
        peer.close()


def counts(url: str) -> dict:
    s = Store(url, create=False)
    try:
        return {"event": s.Event.select().count(), "reject": s.Reject.select().count(),
                "lane": s.Lane.select().count(), "daily": s.Daily.select().count()}
    finally:
        s.close()


def test_subscriptions_are_shared_at_every_lane_topic():
    assert subscriptions("chain/east", "g1") == [f"$share/g1/chain/east/+/+/{t}" for t in
                                                 ("txn", "event", "daily", "status")]


def test_valid_duplicate_and_invalid_messages(broker, hq_db_url):
    base = "lanes/S001/01"
    first = txn("S001", "01", 1)
    with ingesting(hq_config(broker, hq_db_url)) as ingest, lane(broker) as peer:
        peer.publish(f"{base}/txn", body(first))
        peer.publish(f"{base}/txn", body(first))  # a redelivery
        peer.publish(f"{base}/txn", b"not json")
        peer.publish(f"{base}/txn", body(changed(first, event_id="X" * 32)))
        peer.publish(f"{base}/txn", body(ids("S001", "02", first)))  # ids of another lane on this topic
        peer.publish(f"{base}/event", body(ids("S001", "01", LANE, event_id=uuid.uuid4().hex, seq=2)))
        peer.publish(f"{base}/status", body(ids("S001", "01", STATUS)), retain=True)
        peer.publish(f"{base}/daily", body(ids("S001", "01", DAILY)), retain=True)
        peer.publish(f"{base}/daily", body(ids("S001", "01", DAILY, closed=True, event_id=uuid.uuid4().hex, seq=3)))
        peer.publish(f"{base}/txn", body(txn("S001", "01", 4)))  # the consumer lives on after the rejects
        assert wait_for(lambda: counts(hq_db_url) == {"event": 4, "reject": 3, "lane": 1, "daily": 1}), \
            counts(hq_db_url)
        want = {"txn": 3, "lane": 1, "daily": 2, "status": 1, "reject": 3}  # counted after the batch's commit
        assert wait_for(lambda: ingest.counts == want), ingest.counts
    s = Store(hq_db_url, create=False)
    try:
        reasons = sorted(r.reason for r in s.Reject.select())
        assert reasons[0].startswith("$.event_id: ") and reasons[1].startswith("$.store_id/terminal_id: S001/02")
        assert reasons[2].startswith("$: not JSON")
        assert sorted(e.kind for e in s.Event.select()) == ["day_close", "lane", "txn", "txn"]
        assert s.Daily.get().closed and s.Lane.get().state == "online"
    finally:
        s.close()


def test_nothing_is_acknowledged_before_it_is_stored(broker, postgres_server):
    """The database goes away: the messages in hand are never acknowledged, so when this ingest stops
    and a new one comes back under the same client id, the broker delivers them again."""
    import psycopg2

    url = postgres_server()
    name = url.rsplit("/", 1)[1]
    cfg = hq_config(broker, url)
    Store(url).close()
    admin = psycopg2.connect(dbname="postgres", **POSTGRES)
    admin.autocommit = True
    cur = admin.cursor()
    try:
        with ingesting(cfg) as ingest, lane(broker) as peer:
            peer.publish("lanes/S001/01/txn", body(txn("S001", "01", 1)))
            assert wait_for(lambda: ingest.counts["txn"] == 1)
            cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            for seq in range(2, 7):
                peer.publish("lanes/S001/01/txn", body(txn("S001", "01", seq)))
            assert wait_for(lambda: ingest.inbox.qsize() == 0 and ingest._db_down_since is not None)
        assert ingest.counts["txn"] == 1
        cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        assert counts(url)["event"] == 1
        with ingesting(cfg) as again:
            assert wait_for(lambda: counts(url)["event"] == 6), counts(url)
            assert again.counts["txn"] == 5
    finally:
        cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()


def test_a_message_the_database_refuses_on_its_own_is_a_reject(tmp_path):
    """Not a schema failure (head office's own bug or limit): that message is rejected, its batch is not."""
    url = f"sqlite:///{tmp_path / 'hq.sqlite'}"
    store = Store(url)
    store.db.execute_sql("CREATE TRIGGER no_l02 BEFORE INSERT ON event WHEN NEW.terminal_id = 'L02' "
                         "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END")
    ingest = Ingest(load(None, {"db": url}).hq, store)  # not connected: acks go nowhere
    batch = [Message("lanes/S0001/L01/txn", body(TXN), 1, 1),
             Message("lanes/S0001/L02/txn", body(changed(TXN, terminal_id="L02", event_id="a" * 32)), 2, 1),
             Message("lanes/S0001/L01/status", body(STATUS), 3, 1)]
    ingest._commit(batch, threading.Event())
    assert ingest.counts == {"txn": 1, "lane": 0, "daily": 0, "status": 1, "reject": 1}
    assert "refused by a trigger" in store.Reject.get().reason
    store.close()


def test_the_router_rejects_topics_it_does_not_know(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'hq.sqlite'}")
    router = Router(store, "chain/east")
    assert router.write(Message("chain/east/S0001/L01/status", body(WILL), 1, 1), []) == "status"
    for topic in ("chain/west/S0001/L01/status", "chain/east/S0001/status", "chain/east/S0001/L01/cmd"):
        assert router.write(Message(topic, body(WILL), 1, 1), []) == "reject"
    assert [r.reason for r in store.Reject.select()] == ["topic: not chain/east/<store>/<terminal>/<kind>"] * 3
    store.close()


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_two_ingest_processes_in_one_share_group_store_every_event_once(broker, db, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'hq.sqlite'}" if db == "sqlite" else request.getfixturevalue("postgres_server")()
    Store(url).close()  # tables first: two processes then only find them
    procs, logs = [], [tmp_path / f"ingest-{n}.log" for n in (1, 2)]
    try:
        for n, log in zip((1, 2), logs):
            cmd = [*appliance_cmd(), "hq", "ingest", "--db", url, "--host", broker.host, "--port", str(broker.port),
                   "--username", HQ, "--password-file", str(broker.password_file(HQ)), "--client-id", f"hq-{n}"]
            with open(log, "w") as err:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=subprocess_env()))
        assert wait_for(lambda: all("subscribed: $share/hq/lanes/" in log.read_text() for log in logs), 30)
        sent = []
        for store_id, terminal_id in LANES:
            with lane(broker, store_id, terminal_id) as peer:
                for seq in range(1, 101):
                    doc = txn(store_id, terminal_id, seq)
                    peer.publish(f"lanes/{store_id}/{terminal_id}/txn", body(doc))
                    if seq % 10 == 0:  # and some twice, as after a lane's reconnect
                        peer.publish(f"lanes/{store_id}/{terminal_id}/txn", body(doc))
                    sent.append(doc["event_id"])
        assert wait_for(lambda: counts(url)["event"] == len(sent), 60), counts(url)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    outs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outs
    s = Store(url, create=False)
    try:
        assert sorted(r.event_id for r in s.Event.select()) == sorted(sent)
        assert s.Reject.select().count() == 0
    finally:
        s.close()
    stored = [int(err.rsplit("ingest stopped: txn ", 1)[1].split(",")[0]) for err in outs]
    assert sum(stored) >= len(sent) and all(n > 0 for n in stored), stored  # both took part

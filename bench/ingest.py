"""Benchmark: head office's ingest (`appliance hq ingest`) of many lanes' txn events, on SQLite and
on PostgreSQL, with one and with two ingest processes in one share group.

A real mosquitto (tests/broker.py: one user per lane, an ACL, persistence) on a free port;
`lanes` simulated lanes, each its own MQTT client with its own credentials, publish `events`
txn events each at QoS 1 (up to 100 in flight per lane), all at once. Measured from the first
publish until the database holds every event: events/s. The publishers' own rate is shown too
(when it is close to the ingest rate, the publishers were the limit, not the ingest).

    python bench/ingest.py                 # 200 lanes x 100 events, the four setups (bench/RESULTS.md)
    python bench/ingest.py --smoke         # tiny: the test suite runs this so the script cannot rot
    python bench/ingest.py --pg postgresql://postgres@127.0.0.1:5432   # the server to create databases on
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from appliance.hq.store import Store  # noqa: E402
from appliance.journal import rfc3339, utc_now  # noqa: E402
from broker import HQ, Broker, lane_user  # noqa: E402


def txn(store_id: str, terminal_id: str, seq: int, at: str) -> bytes:
    doc = {"kind": "txn", "version": 2, "event_id": uuid.uuid4().hex, "seq": seq, "store_id": store_id,
           "terminal_id": terminal_id, "txn_id": seq, "out_trade_no": f"{store_id}_{terminal_id}_{seq}",
           "order": f"B{seq}", "payment_type": "wechat", "platform": "wechat", "funding_source": "CMB_DEBIT",
           "txn_kind": "pay", "amount": "12.50", "amount_fen": 1250, "currency": "CNY", "state": "paid",
           "previous_state": "pending", "reason": "SUCCESS", "code_masked": "1345**********6789",
           "platform_txn_id": f"42{seq:012d}", "source": "scan", "business_date": at[:10], "created_at": at,
           "at": at}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def new_database(kind: str, tmp: Path, pg: str, n: int) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / f'hq-{n}.sqlite'}"
    name = f"hq_bench_{os.getpid()}_{n}"
    _admin(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    return f"{pg}/{name}"


def drop_database(url: str, pg: str) -> None:
    if not url.startswith("sqlite"):
        _admin(pg, f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def _admin(pg: str, *statements: str) -> None:
    import psycopg2

    admin = psycopg2.connect(f"{pg}/postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            for sql in statements:
                cur.execute(sql)
    finally:
        admin.close()


def start_ingest(broker: Broker, url: str, processes: int, tmp: Path, group: str) -> list[tuple[subprocess.Popen, Path]]:
    """`processes` ingest processes in share group `group`. A group of its own per setup: mosquitto
    keeps sending a group's share to a stopped member's persistent session (queued for it)."""
    procs = []
    for n in range(1, processes + 1):
        log = tmp / f"ingest-{group}-{n}.log"
        cmd = [sys.executable, "-m", "appliance", "hq", "ingest", "--db", url, "--host", broker.host,
               "--port", str(broker.port), "--username", HQ, "--password-file", str(broker.password_file(HQ)),
               "--client-id", f"hq-{group}-{n}", "--group", group]
        with open(log, "w") as err:
            procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err), log))
    deadline = time.monotonic() + 60
    while not all("subscribed:" in log.read_text() for _, log in procs):
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
            raise RuntimeError("ingest did not subscribe: " + " | ".join(log.read_text()[-500:] for _, log in procs))
        time.sleep(0.05)
    return procs


def stop_ingest(procs) -> list[str]:
    for p, _ in procs:
        p.send_signal(signal.SIGTERM)
    for p, _ in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [log.read_text() for _, log in procs]


def connect_lanes(broker: Broker) -> list[tuple[mqtt.Client, str]]:
    clients = []
    for store_id, terminal_id in broker.lanes:
        user = lane_user(store_id, terminal_id)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
        c.username_pw_set(user, broker.users[user])
        c.max_inflight_messages_set(100)
        c.connect(broker.host, broker.port)
        c.loop_start()
        clients.append((c, f"{broker.prefix}/{store_id}/{terminal_id}/txn"))
    deadline = time.monotonic() + 60
    while not all(c.is_connected() for c, _ in clients):
        if time.monotonic() > deadline:
            raise RuntimeError("the lanes did not all connect")
        time.sleep(0.01)
    return clients


def run_one(broker: Broker, db: str, processes: int, events: int, tmp: Path, pg: str, n: int) -> dict:
    url = new_database(db, tmp, pg, n)
    Store(url).close()
    procs = start_ingest(broker, url, processes, tmp, f"bench{n}")
    clients = connect_lanes(broker)
    at = rfc3339(utc_now())
    bodies = [[txn(s, t, seq, at) for seq in range(1, events + 1)] for s, t in broker.lanes]
    total = len(bodies) * events
    store = Store(url, create=False)
    try:
        t0 = time.perf_counter()

        def publish(client, topic, payloads):
            infos = [client.publish(topic, b, qos=1) for b in payloads]
            for info in infos:
                info.wait_for_publish(60)

        threads = [threading.Thread(target=publish, args=(c, topic, b)) for (c, topic), b in zip(clients, bodies)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        published = time.perf_counter() - t0
        deadline = time.monotonic() + 600
        while (stored := store.Event.select().count()) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {stored} of {total} events stored")
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
    finally:
        store.close()
        for c, _ in clients:
            c.disconnect()
            c.loop_stop()
        logs = stop_ingest(procs)
        drop_database(url, pg)
    shares = [int(log.rsplit("ingest stopped: txn ", 1)[1].split(",")[0]) for log in logs]
    return {"events/s": total / elapsed, "seconds": elapsed, "publish events/s": total / published,
            "largest share of one process %": 100 * max(shares) / total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes")
    ap.add_argument("--lanes", type=int, default=200)
    ap.add_argument("--events", type=int, default=100, help="events per lane")
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="PostgreSQL server URL, no database")
    ap.add_argument("--db", action="append", choices=["sqlite", "postgresql"], help="default: both")
    args = ap.parse_args(argv)
    lanes, events = (3, 10) if args.smoke else (args.lanes, args.events)
    setups = [(db, p) for db in (args.db or ["sqlite", "postgresql"]) for p in (1, 2)]
    print(f"| ingest of {lanes} lanes x {events} events | events/s | seconds | publishers' events/s "
          f"| largest share of one process |\n|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        lane_ids = [(f"S{i // 10:03d}", f"{i % 10:02d}") for i in range(lanes)]
        with Broker(Path(tmp) / "broker", lanes=lane_ids) as broker:
            for n, (db, processes) in enumerate(setups):
                r = run_one(broker, db, processes, events, Path(tmp), args.pg, n)
                print(f"| {db}, {processes} process{'es' if processes > 1 else ''} | {r['events/s']:,.0f} "
                      f"| {r['seconds']:.2f} | {r['publish events/s']:,.0f} "
                      f"| {r['largest share of one process %']:.0f} % |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmarks: classification and scanner decoding speed, journal commit latency (fsync), end-to-end
charge latency, each payment platform adapter's pay round trip against its simulator, and the
uplink's drain of a backlog to a real mosquitto against a bare paho publisher.

    python bench/run.py            # full run, prints a Markdown table (recorded in bench/RESULTS.md)
    python bench/run.py --drain    # only the uplink's backlog drain (a real mosquitto) against bare paho
    python bench/run.py --smoke    # tiny sizes; the test suite runs this so the script cannot rot
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.classify import Classifier, load_rules  # noqa: E402
from appliance.config import ClassifyConfig, from_dict  # noqa: E402
from appliance.indicator import NullIndicator  # noqa: E402
from appliance.journal import Journal, State  # noqa: E402


def _pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def bench_classify(n: int) -> dict:
    c = Classifier(load_rules(None), ClassifyConfig().order_pattern, {"CMD:CANCEL": "cancel"})
    texts = ["134567890123456789", "286123456789012345678", "6212345678901234567", "ORD:A1001:12.50",
             "CMD:CANCEL", "HELLO", "1345678901"]
    t0 = time.perf_counter()
    for i in range(n):
        c.classify(texts[i % len(texts)])
    dt = time.perf_counter() - t0
    return {"classifications/s": n / dt, "µs each": dt / n * 1e6}


def bench_decoders(n: int) -> dict:
    """Scanner decoding: an 18-digit code plus Enter, as key events (evdev) and as bytes (serial)."""
    from types import SimpleNamespace

    from appliance.scan.keymap import EV_KEY, EV_SYN, KEY, SYN_REPORT, KeyDecoder
    from appliance.scan.serial import FrameDecoder

    code = "134567890123456789"
    events = []
    for i, ch in enumerate(code + "\n"):
        k = KEY["ENTER"] if ch == "\n" else KEY[ch]
        for value in (1, 0):
            events.append(SimpleNamespace(type=EV_KEY, code=k, value=value, sec=0, usec=i * 2000))
            events.append(SimpleNamespace(type=EV_SYN, code=SYN_REPORT, value=0, sec=0, usec=i * 2000))
    keys = KeyDecoder("us")
    t0 = time.perf_counter()
    for _ in range(n):
        for ev in events:
            keys.feed(ev, 0.0)
    dt_keys = time.perf_counter() - t0
    assert keys.feed(events[0], 0.0) == [] and keys.pending == 1  # decoder alive and in step
    frames = FrameDecoder("CR")
    wire = (code + "\r").encode()
    t0 = time.perf_counter()
    for _ in range(n):
        frames.feed(wire)
    dt_bytes = time.perf_counter() - t0
    return {"evdev codes/s": n / dt_keys, "evdev µs per code (76 events)": dt_keys / n * 1e6,
            "serial codes/s": n / dt_bytes}


def bench_journal(n: int, state_dir: Path) -> dict:
    j = Journal(state_dir, "S0001", "L01")
    opens, moves = [], []
    for i in range(n):
        t0 = time.perf_counter()
        txn = j.open_payment(order=f"B{i}", amount_fen=100, payment_type="wechat", platform="sandbox",
                             code=f"1345678901{i:08d}")
        t1 = time.perf_counter()
        j.transition(txn.txn_id, State.PAID, "SUCCESS")
        t2 = time.perf_counter()
        opens.append((t1 - t0) * 1e3)
        moves.append((t2 - t1) * 1e3)
    j.close()
    return {"open_payment p50 ms": statistics.median(opens), "open_payment p99 ms": _pct(opens, 99),
            "transition p50 ms": statistics.median(moves), "transition p99 ms": _pct(moves, 99)}


def bench_charge(n: int, state_dir: Path) -> dict:
    from appliance import service

    cfg = from_dict({"terminal": {"store_id": "S0001", "terminal_id": "L01", "state_dir": str(state_dir)},
                     "providers": {"sandbox": {"kind": "sandbox"}}, "routing": {"wechat": "sandbox"}})
    lane = service.build(cfg, indicator=NullIndicator())
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        r = lane.till.charge(f"C{i}", 1234, f"1345678901{i:06d}00")
        samples.append((time.perf_counter() - t0) * 1e3)
        assert r.txn.state is State.PAID
    lane.close()
    return {"charge p50 ms": statistics.median(samples), "charge p99 ms": _pct(samples, 99),
            "charges/s": 1e3 / statistics.mean(samples)}


def bench_platforms(n: int, tmp: Path) -> dict[str, dict]:
    """Each adapter's pay against its simulator over loopback HTTP: request signed, answer signed
    and verified (RSA-2048 both ways for wechat_v3 and alipay, HMAC-SHA256 for wechat_v2, MD5 for
    jeepay). What the adapter adds to a platform's own latency."""
    from appliance import simulators
    from appliance.payments import PayRequest, make_provider

    results = {}
    for kind in simulators.available():
        sim = simulators.simulator_class(kind)(tmp / f"{kind}-keys").start()
        cfg = from_dict({"terminal": {"store_id": "S0001", "terminal_id": "L01", "state_dir": str(tmp / kind)},
                         "providers": {"p": {**sim.provider_options(), "backup_base_urls": []}},
                         "routing": {"wechat": "p"}})
        provider = make_provider("p", cfg.providers["p"], tmp / kind)
        wallet = "28" if kind == "alipay" else "13"
        samples = []
        for i in range(n):
            req = PayRequest(f"S0001_L01_B{i:06d}", 1234, f"{wallet}{i:014d}00", "Order", "S0001", "L01")
            t0 = time.perf_counter()
            out = provider.pay(req)
            samples.append((time.perf_counter() - t0) * 1e3)
            assert out.status.value == "paid", out
        provider.close()
        sim.stop()
        results[f"{kind} pay over loopback HTTP"] = {"p50 ms": statistics.median(samples),
                                                    "p99 ms": _pct(samples, 99)}
    return results


def bench_drain(n: int, tmp: Path) -> dict:
    """The uplink's drain of `n` queued outbox events (n/2 paid payments) to a real mosquitto
    (tests/broker.py, its defaults) on loopback: from `start()`, the broker up, until the journal has
    every row acknowledged and marked sent; against a bare paho-mqtt QoS 1 publisher (same payloads
    and topics, no journal) to the same broker in the same run. Both keep at most the broker's
    Receive Maximum (mosquitto: 20) publishes unacknowledged, as MQTT 5 wants; the uplink's
    max_inflight is 100. Target: the uplink at >= 0.8 of the bare publisher's events/s."""
    import paho.mqtt.client as mqtt

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from broker import Broker

    from appliance.uplink import make_uplink

    journal = Journal(tmp / "drain", "S0001", "L01")
    for i in range(n // 2):
        txn = journal.open_payment(order=f"D{i}", amount_fen=100 + i, payment_type="wechat", platform="sandbox",
                                   code=f"1345678901{i:08d}")
        journal.transition(txn.txn_id, State.PAID, funding_source="BALANCE")
    rows = journal.claim(0, n)
    broker = Broker(tmp / "broker", lanes=[("S0001", "L01")]).start()
    try:
        cfg = from_dict({"terminal": {"store_id": "S0001", "terminal_id": "L01", "state_dir": str(tmp / "drain")},
                         "mqtt": broker.mqtt_config("S0001", "L01") | {"max_inflight": 100}})
        marked, all_marked = [0], threading.Event()
        ack = journal.ack

        def counting_ack(seqs):  # the end is the commit of the last ack: no polling beside the drain
            changed = ack(seqs)
            marked[0] += changed
            if marked[0] >= len(rows):
                all_marked.set()
            return changed

        journal.ack = counting_ack
        uplink = make_uplink(cfg, journal)
        t0 = time.perf_counter()
        uplink.start()
        assert all_marked.wait(300)
        drain_s = time.perf_counter() - t0
        uplink.close()
        assert journal.outbox_state().last_ack_seq == rows[-1].seq

        user = "lane-S0001-L01"
        window = min(100, _receive_maximum(broker, user))
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bare", protocol=mqtt.MQTTv5)
        client.username_pw_set(user, broker.users[user])
        client.max_inflight_messages_set(window)
        acked = threading.Event()
        count = [0]

        def on_publish(client, userdata, mid, reason_code, properties):
            count[0] += 1
            if count[0] == len(rows):
                acked.set()

        client.on_publish = on_publish
        t0 = time.perf_counter()
        client.connect(broker.host, broker.port)
        client.loop_start()
        for row in rows:
            client.publish(f"lanes/S0001/L01/{row.topic}", row.payload, qos=1)
        assert acked.wait(120)
        bare_s = time.perf_counter() - t0
        client.disconnect()
        client.loop_stop()
    finally:
        broker.kill()
        journal.close()
    return {"uplink events/s": n / drain_s, "bare paho events/s": n / bare_s, "uplink / bare": bare_s / drain_s}


def _receive_maximum(broker, user: str) -> int:
    """The broker's Receive Maximum (65,535 when its CONNACK sets none)."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(user, broker.users[user])
    got = []
    client.on_connect = lambda c, userdata, flags, reason, props: got.append(getattr(props, "ReceiveMaximum", 65_535))
    client.connect(broker.host, broker.port)
    while not got:
        client.loop(0.1)
    client.disconnect()
    return got[0]


def run_once(sizes, drain_only: bool = False) -> dict[tuple[str, str], float]:
    with tempfile.TemporaryDirectory() as tmp:
        if drain_only:
            results = {f"uplink drain of {sizes[5]:,} queued events (MQTT 5, QoS 1)": bench_drain(sizes[5], Path(tmp))}
            return {(name, k): v for name, metrics in results.items() for k, v in metrics.items()}
        results = {
            "classify": bench_classify(sizes[0]),
            "scanner decoding": bench_decoders(sizes[3]),
            "journal (WAL, synchronous=FULL)": bench_journal(sizes[1], Path(tmp) / "j"),
            "charge via till + sandbox (latency 0)": bench_charge(sizes[2], Path(tmp) / "c"),
            **bench_platforms(sizes[4], Path(tmp)),
            f"uplink drain of {sizes[5]:,} queued events (MQTT 5, QoS 1)": bench_drain(sizes[5], Path(tmp)),
        }
    return {(name, k): v for name, metrics in results.items() for k, v in metrics.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one run")
    ap.add_argument("--repeat", type=int, default=3, help="runs; the table shows median, min and max")
    ap.add_argument("--drain", action="store_true", help="only the uplink's drain against a bare publisher")
    args = ap.parse_args(argv)
    sizes = (200, 5, 5, 20, 3, 200) if args.smoke else (200_000, 500, 300, 20_000, 500, 10_000)
    runs = [run_once(sizes, args.drain) for _ in range(1 if args.smoke else args.repeat)]
    print(f"| benchmark | metric | median of {len(runs)} | min | max |\n|---|---|---|---|---|")
    for key in runs[0]:
        values = sorted(r[key] for r in runs)
        print(f"| {key[0]} | {key[1]} | {statistics.median(values):,.2f} | {values[0]:,.2f} | {values[-1]:,.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

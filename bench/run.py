"""Benchmarks: classification and scanner decoding speed, journal commit latency (fsync), end-to-end
charge latency, and each payment platform adapter's pay round trip against its simulator.

    python bench/run.py            # full run, prints a Markdown table (recorded in bench/RESULTS.md)
    python bench/run.py --smoke    # tiny sizes; the test suite runs this so the script cannot rot
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
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


def run_once(sizes) -> dict[tuple[str, str], float]:
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "classify": bench_classify(sizes[0]),
            "scanner decoding": bench_decoders(sizes[3]),
            "journal (WAL, synchronous=FULL)": bench_journal(sizes[1], Path(tmp) / "j"),
            "charge via till + sandbox (latency 0)": bench_charge(sizes[2], Path(tmp) / "c"),
            **bench_platforms(sizes[4], Path(tmp)),
        }
    return {(name, k): v for name, metrics in results.items() for k, v in metrics.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one run")
    ap.add_argument("--repeat", type=int, default=3, help="runs; the table shows median, min and max")
    args = ap.parse_args(argv)
    sizes = (200, 5, 5, 20, 3) if args.smoke else (200_000, 500, 300, 20_000, 500)
    runs = [run_once(sizes) for _ in range(1 if args.smoke else args.repeat)]
    print(f"| benchmark | metric | median of {len(runs)} | min | max |\n|---|---|---|---|---|")
    for key in runs[0]:
        values = sorted(r[key] for r in runs)
        print(f"| {key[0]} | {key[1]} | {statistics.median(values):,.2f} | {values[0]:,.2f} | {values[-1]:,.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

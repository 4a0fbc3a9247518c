"""Benchmarks: classification speed, journal commit latency (fsync), end-to-end charge latency.

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    sizes = (200, 5, 5) if args.smoke else (200_000, 500, 300)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "classify": bench_classify(sizes[0]),
            "journal (WAL, synchronous=FULL)": bench_journal(sizes[1], Path(tmp) / "j"),
            "charge via till + sandbox (latency 0)": bench_charge(sizes[2], Path(tmp) / "c"),
        }
    print("| benchmark | metric | value |\n|---|---|---|")
    for name, metrics in results.items():
        for k, v in metrics.items():
            print(f"| {name} | {k} | {v:,.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

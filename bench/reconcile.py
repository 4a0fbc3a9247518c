"""Benchmark: `appliance hq reconcile` of one busy day, per platform with a bill (WeChat Pay v3, WeChat
Pay v2, Alipay), through the real adapter against its loopback simulator.

The simulator's ledger takes `payments` payments of one Beijing day (every 20th refunded), and head
office's database (SQLite) holds the events a lane sends for each (pending, paid; cancel_requested,
refunded). Measured, per platform: the bill call (apply or query, download, gunzip or unzip, hash,
parse, summary check), the matching (head office's payments loaded, every line matched), storing the
result (bill lines, differences, the summary, one transaction); then the same day again as a
technician runs it, `appliance hq reconcile --date D --platform P` in its own process: its wall time
and its peak RSS (the bench process itself holds the simulator's books as well).

Target (bench/RESULTS.md): a day of 100,000 payments reconciled by the command, fetch to stored,
within 60 s per platform on the development VM, with zero differences; its peak RSS under 512 MB.

    python bench/reconcile.py                 # 100,000 payments per platform
    python bench/reconcile.py --payments 5000
    python bench/reconcile.py --smoke         # tiny: the test suite runs this so the script cannot rot
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from appliance.config import ProviderConfig  # noqa: E402
from appliance.hq import reconcile  # noqa: E402
from appliance.hq.reconcile import rfc3339_at  # noqa: E402
from appliance.hq.store import Store, event_row  # noqa: E402
from appliance.money import format_amount  # noqa: E402
from appliance.payments import make_provider, providers  # noqa: E402
from appliance.payments.bills import day_start  # noqa: E402
from appliance.schema import build  # noqa: E402
from appliance.simulators.alipay import AlipaySimulator  # noqa: E402
from appliance.simulators.ledger import Ledger  # noqa: E402
from appliance.simulators.wechat_v2 import WechatV2Simulator  # noqa: E402
from appliance.simulators.wechat_v3 import WechatV3Simulator  # noqa: E402
from reconcile_kit import DAY, Clock  # noqa: E402

TARGET_S = 60.0
TARGET_RSS_MB = 512
PLATFORMS = {"wechat_v3": (WechatV3Simulator, "13"), "wechat_v2": (WechatV2Simulator, "13"),
             "alipay": (AlipaySimulator, "28")}


def fill(name: str, ledger: Ledger, store: Store, payments: int, prefix: str) -> None:
    """`payments` payments in the ledger (every 20th refunded) and their lane events at head office."""
    clock = ledger.clock
    rows, seq = [], 0
    for i in range(payments):
        clock.t = day_start(DAY) + 3600 + i * (20 * 3600 / payments)  # 01:00 to 21:00 Beijing
        no = f"S0001_L01_{uuid.uuid4().hex[:20]}"
        fen = 100 + (i * 37) % 50_000
        trade, _ = ledger.pay(no, f"{prefix}{i:014d}00", fen)
        assert trade.paid
        states = ["pending", "paid"]
        if i % 20 == 0:
            ledger.refund(no, f"{no}R", fen)
            states += ["cancel_requested", "refunded"]
        for state in states:
            seq += 1
            kind = "refund" if state == "refunded" else "cancel" if state == "cancel_requested" else "pay"
            msg = {"kind": "txn", "event_id": uuid.uuid4().hex, "seq": seq, "store_id": "S0001", "terminal_id": "L01",
                   "txn_id": i + 1, "out_trade_no": no, "state": state, "payment_type": "wechat", "platform": name,
                   "funding_source": None, "amount_fen": fen, "amount": format_amount(fen), "txn_kind": kind,
                   "business_date": DAY.isoformat(), "at": rfc3339_at(clock.t)}
            rows.append(event_row(msg, rfc3339_at(clock.t)))
    with store.atomic():
        store.add_events(rows)


#: The command in a child process that reports its own peak RSS (KB) on its last stderr line: VmHWM of
#: its memory map (getrusage's ru_maxrss would count this process's RSS at the fork, kept across exec).
RUN_AND_MEASURE = ("import re, sys; from appliance.cli import main; rc = main(sys.argv[1:]); "
                   "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
                   "print('maxrss', hwm, file=sys.stderr); sys.exit(rc)")


def command(sim, name: str, url: str, tmp: Path) -> tuple[float, float, int]:
    """`appliance hq reconcile` of DAY for `name` in its own process: (wall s, peak RSS MB, differences)."""
    cfg = tmp / "hq.toml"
    cfg.write_text(f"[providers.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                                                     sim.provider_options().items()))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUN_AND_MEASURE, "hq", "reconcile", "--config", str(cfg), "--db", url,
                        "--date", DAY.isoformat(), "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"appliance hq reconcile exited {r.returncode}: {r.stderr[-2000:]}")
    (result,) = json.loads(r.stdout)["results"]
    rss_kb = int(r.stderr.strip().splitlines()[-1].split()[1])
    return took, rss_kb / 1024, len(result["differences"])


def one(name: str, payments: int, tmp: Path) -> dict:
    cls, prefix = PLATFORMS[name]
    ledger = Ledger(clock=Clock(day_start(DAY) + 3600))
    sim = cls(tmp / name / "keys", ledger).start()
    store = Store(f"sqlite:///{tmp / name / 'hq.sqlite'}")
    try:
        fill(name, ledger, store, payments, prefix)
        raw = dict(sim.provider_options())
        kind = raw.pop("kind")
        options = build(providers.get(kind, "kind").options, raw, f"providers.{name}", tmp)
        provider = make_provider(name, ProviderConfig(kind, options), tmp)
        ledger.clock.t = day_start(DAY) + 86_400 + 10 * 3600
        t0 = time.perf_counter()
        bill = provider.bill(DAY)
        t1 = time.perf_counter()
        orders = reconcile.load_orders(store, DAY, {x.out_trade_no for x in bill.lines})
        diffs, matched = reconcile.match(DAY, name, kind, bill.lines, orders,
                                         reconcile.elsewhere(store, DAY, name, orders))
        t2 = time.perf_counter()
        result = reconcile.Result(DAY, name, kind, "bill", reconcile.DayState.FETCHED, diffs, matched, lines=bill.lines,
                                  stated=bill.totals, fee_fen=bill.totals.fee_fen)
        reconcile.save(store, result, ledger.clock.t)
        t3 = time.perf_counter()
        provider.close()
        cli_s, cli_rss_mb, cli_diffs = command(sim, name, store.url, tmp / name)
        return {"platform": name, "lines": len(bill.lines), "differences": len(diffs) + cli_diffs,
                "fetch_s": t1 - t0, "match_s": t2 - t1, "store_s": t3 - t2, "total_s": t3 - t0, "cli_s": cli_s,
                "cli_rss_mb": cli_rss_mb}
    finally:
        store.close()
        sim.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--payments", type=int, default=100_000)
    ap.add_argument("--smoke", action="store_true", help="200 payments per platform, targets not enforced")
    args = ap.parse_args()
    payments = 200 if args.smoke else args.payments
    missed = []
    print("| platform | payments | bill lines | differences | fetch + parse s | match s | store s | total s | "
          "lines/s | command s | command peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in PLATFORMS:
            r = one(name, payments, Path(tmp))
            print(f"| {name} | {payments} | {r['lines']} | {r['differences']} | {r['fetch_s']:.2f} | "
                  f"{r['match_s']:.2f} | {r['store_s']:.2f} | {r['total_s']:.2f} | {r['lines'] / r['total_s']:,.0f} | "
                  f"{r['cli_s']:.2f} | {r['cli_rss_mb']:.0f} |")
            if r["differences"] or (not args.smoke and (r["cli_s"] > TARGET_S or r["cli_rss_mb"] > TARGET_RSS_MB)):
                missed.append(name)
    print(f"targets: the command within {TARGET_S:.0f} s and {TARGET_RSS_MB} MB per platform, no differences; "
          f"this process's peak RSS (simulators included): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if missed:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

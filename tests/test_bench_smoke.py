"""Benchmarks are not tests; this only runs bench/run.py, bench/lane.py, bench/idle.py, bench/ingest.py and
bench/reconcile.py at smoke size so they cannot rot."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT


def test_bench_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| classify | classifications/s |" in r.stdout and "charge p50 ms" in r.stdout
    assert "uplink drain of 200 queued events" in r.stdout and "| uplink / bare |" in r.stdout


def test_lane_bench_smoke():
    """bench/lane.py at smoke size: every figure printed with its ceiling from the same run (targets not enforced)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "lane.py"), "--smoke"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    figures = [line.split(" | ")[0] for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert figures[:4] == ["| figure", "| journal payments/s (open + paid)", "| scan -> paid p50 ms",
                           "| scan -> paid p99 ms"], r.stdout
    assert "| pwrite64 per payment" in figures or "| syscalls per payment" in figures, r.stdout


@pytest.mark.integration
def test_ingest_bench_smoke():
    """bench/ingest.py at smoke size: a real mosquitto, `appliance hq ingest` processes, SQLite and PostgreSQL."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "ingest.py"), "--smoke"], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("| sqlite", "| postgresql"))]
    assert [row.split(" | ")[0] for row in rows] == ["| sqlite, 1 process", "| sqlite, 2 processes",
                                                      "| postgresql, 1 process", "| postgresql, 2 processes"]
    shares = [float(row.rsplit("|", 2)[1].strip(" %")) for row in rows]  # one process's largest share
    assert shares[0] == shares[2] == 100 and shares[1] < 100 and shares[3] < 100, rows


@pytest.mark.integration
def test_idle_bench_smoke():
    """bench/idle.py at smoke size (2 s idle, 200 payments): every figure is printed, and the lane
    without an uplink sleeps (its wakeups are timers, so a loaded machine does not change them)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "idle.py"), "--smoke"], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode in (0, 1), r.stderr
    figures = [line.split(":")[0] for line in r.stdout.splitlines()]
    for figure in ("exec -> READY=1", "idle wakeups, mqtt disabled", "idle CPU, mqtt disabled",
                   "watchdog, mqtt disabled", "idle wakeups, mqtt enabled, real mosquitto",
                   "RSS after 200 payments", "RSS growth over the last 100"):
        assert figure in figures, r.stdout
    wakeups = float(re.search(r"idle wakeups, mqtt disabled: ([0-9.]+) /s", r.stdout).group(1))
    assert wakeups <= 1.0, r.stdout


def test_reconcile_bench_smoke():
    """bench/reconcile.py at smoke size: each platform's day of payments through its real adapter reconciles
    to zero differences, every figure printed."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "reconcile.py"), "--smoke"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith(("| wechat", "| alipay"))]
    assert [(row[0], row[2], row[3]) for row in rows] == [("| wechat_v3", "210", "0"), ("| wechat_v2", "210", "0"),
                                                          ("| alipay", "210", "0")], r.stdout
    assert "| command peak RSS MB |" in r.stdout and r.stdout.rstrip().splitlines()[-1].startswith("targets:")

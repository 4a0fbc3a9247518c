"""Benchmarks are not tests; this only runs bench/run.py, bench/lane.py and bench/ingest.py at smoke size so they
cannot rot."""

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

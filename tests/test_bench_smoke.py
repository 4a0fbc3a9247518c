"""Benchmarks are not tests; this only runs bench/run.py at smoke size so it cannot rot."""

import subprocess
import sys

from conftest import ROOT


def test_bench_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| classify | classifications/s |" in r.stdout and "charge p50 ms" in r.stdout

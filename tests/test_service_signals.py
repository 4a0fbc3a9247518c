"""The running service honours a stop signal whichever of its threads the kernel delivers it to."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

import pytest

from conftest import appliance_cmd, lane_dict, subprocess_env, write_config


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """Send `sig` to one thread of another process (what the kernel may choose for a kill(pid))."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "tgkill"):
        pytest.skip("this C library has no tgkill() (glibc >= 2.30)")
    if libc.tgkill(pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_caught_by_a_worker_thread_stops_the_service(tmp_path, sig):
    conf = write_config(tmp_path / "a.toml", lane_dict(tmp_path / "state", scanner={"kind": "stdin"},
                                                       indicator={"kind": "log"}))
    proc = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.monotonic() + 20
        workers: list[int] = []
        while len(workers) < 3 and time.monotonic() < deadline:  # scanner, resolver and till threads
            time.sleep(0.05)
            workers = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        assert len(workers) >= 3, "the service did not start its threads"
        t0 = time.monotonic()
        _tgkill(proc.pid, workers[-1], sig)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 3.0
    assert "stopped" in err and "indicator: off" in err

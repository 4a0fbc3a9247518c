"""`appliance run` under a notify socket of its own, as systemd runs it (Type=notify, WatchdogSec=).

The service is a real process; the test is systemd's side (tests/notify.py). It checks what the
unit relies on: READY=1 only once the config, the journal, the indicator and the scanner are up
(a serial scanner on a pty: its port is open when READY arrives; a missing one is reported and
the lane still starts); WATCHDOG=1 at about half of WATCHDOG_USEC while idle and while a payment
is slow, never a gap longer than the watchdog interval (systemd's kill criterion); STOPPING=1 on
SIGTERM, then exit 0. The watchdog here is 1 s, so each test runs a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from appliance import service, simulators
from appliance.config import from_dict
from appliance.control import SOCKET_NAME
from appliance.journal import Journal, State
from appliance.scan.serial import SerialScanner
from appliance.simulators.ledger import Ledger
from conftest import WECHAT_SLOW, appliance_cmd, lane_dict, subprocess_env, wait_for, write_config
from notify import NotifySocket

#: systemd's WatchdogSec= for these tests; the lane pings every half of it.
WATCHDOG_S = 1.0


def _start(conf: Path, notify: NotifySocket, tmp_path: Path) -> subprocess.Popen:
    """`appliance run` with its output in files (tmp_path/stderr): nothing blocks on a full pipe."""
    with open(tmp_path / "stdout", "wb") as out, open(tmp_path / "stderr", "wb") as err:
        return subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.PIPE,
                                stdout=out, stderr=err, env=subprocess_env(**notify.env(WATCHDOG_S)))


def _stop(proc: subprocess.Popen, tmp_path: Path) -> tuple[float, int, str]:
    """SIGTERM, as `systemctl stop`: (when it was sent, the exit code, stderr)."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()
    return sent, rc, (tmp_path / "stderr").read_text(errors="replace")


def _open_files(pid: int) -> set[str]:
    """What the process has open, as /proc/PID/fd shows it."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return found


def _gaps(times: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in zip(times, times[1:])]


def _assert_pinged(notify: NotifySocket, start: float, end: float) -> None:
    """WATCHDOG=1 all through [start, end]: no gap, edges included, longer than the watchdog interval."""
    pings = [t for t in notify.times("WATCHDOG=1") if start < t <= end]
    gaps = _gaps([start, *pings, end])
    assert len(pings) >= (end - start) / WATCHDOG_S and max(gaps) <= WATCHDOG_S, (
        f"{len(pings)} pings in {end - start:.2f}s, gaps {gaps}")


def test_ready_with_the_scanner_port_open_pings_while_idle_stopping_on_sigterm(tmp_path):
    master, slave = os.openpty()  # the scan gun's serial port: the service opens the slave by name
    port = os.ttyname(slave)
    state = tmp_path / "state"
    conf = write_config(tmp_path / "a.toml", lane_dict(state, scanner={"kind": "serial", "device": port},
                                                       indicator={"kind": "log"}))
    with NotifySocket(tmp_path / "notify") as notify:
        proc = _start(conf, notify, tmp_path)
        try:
            ready = notify.wait_for("READY=1", proc)
            opened = _open_files(proc.pid)
            assert port in opened, f"READY before the scanner's port {port} was open: {sorted(opened)}"
            assert str(state / "journal.sqlite") in opened
            time.sleep(3 * WATCHDOG_S)  # idle
            idle_end = time.monotonic()
            os.write(master, b"HELLO\r")  # the port is read: a scan that is no code
        finally:
            sent, rc, err = _stop(proc, tmp_path)
            os.close(master)
            os.close(slave)
        stopping = notify.wait_for("STOPPING=1", timeout=1)
    assert rc == 0, err
    assert "Reading serial scanner" in err and "indicator: ready" in err
    _assert_pinged(notify, ready, idle_end)
    assert sent <= stopping and [m for _, m in notify.messages].count("READY=1") == 1


def test_ready_waits_for_the_scanners_first_open(tmp_path, monkeypatch):
    """In process, with the scanner's port held shut: everything else is up (the control socket
    listens), READY is not sent; once the port opens, READY follows with the port open."""
    master, slave = os.openpty()
    cfg = from_dict(lane_dict(tmp_path / "state", scanner={"kind": "serial", "device": os.ttyname(slave)}))
    scanner = SerialScanner(cfg.scanner)
    gate = threading.Event()
    real_open = scanner._link.open

    def slow_open() -> None:  # a port slow to open, otherwise the real one
        gate.wait(30)
        real_open()

    scanner._link.open = slow_open
    stop = threading.Event()
    with NotifySocket(tmp_path / "notify") as notify:
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
        runner = threading.Thread(target=service.run, args=(cfg,), kwargs={"stop": stop, "scanner": scanner})
        runner.start()
        try:
            assert wait_for(lambda: (tmp_path / "state" / SOCKET_NAME).exists())
            time.sleep(0.5)
            assert notify.times("READY=1") == [] and not scanner.is_connected
            gate.set()
            notify.wait_for("READY=1", timeout=10)
            assert scanner.is_connected
        finally:
            gate.set()
            stop.set()
            runner.join(timeout=15)
            os.close(master)
            os.close(slave)
    assert not runner.is_alive()


def test_ready_with_the_scanner_missing_reported_once(tmp_path):
    """A scanner that is not plugged in does not fail the start (systemd would restart the lane in a
    loop, and charges by command and the resolver would stop too): READY comes once its absence is
    reported, the lane shows the fault and looks for it quietly."""
    missing = tmp_path / "no-scanner"
    doc = lane_dict(tmp_path / "state", indicator={"kind": "log"}, scanner={"kind": "serial", "device": str(missing)})
    # a platform with its default timeouts: one call may take 12 s, more than this watchdog allows
    doc["providers"]["wx"] = simulators.simulator_class("wechat_v3")(tmp_path / "keys").provider_options()
    conf = write_config(tmp_path / "a.toml", doc)
    with NotifySocket(tmp_path / "notify") as notify:
        proc = _start(conf, notify, tmp_path)
        try:
            ready = notify.wait_for("READY=1", proc)
            time.sleep(2.5 * WATCHDOG_S)  # the scanner is retried every second meanwhile
            end = time.monotonic()
        finally:
            _, rc, err = _stop(proc, tmp_path)
    assert rc == 0, err
    assert err.count("Scanner port unavailable") == 1 and str(missing) in err
    assert "indicator: fault" in err
    assert "providers.wx: one call may take 12 s, longer than half the watchdog interval (0.5 s)" in err
    _assert_pinged(notify, ready, end)


def test_pings_while_a_payment_is_slow(tmp_path):
    """The platform answers after 2 s, twice the watchdog interval: the adapter gives up within
    half the interval (its call limit), the till pinged right before the call, and the resolver
    finishes the payment by query while the lane keeps pinging."""
    ledger = Ledger(slow_s=2.0)
    with simulators.simulator_class("wechat_v3")(tmp_path / "keys", ledger) as sim:
        doc = lane_dict(tmp_path / "state", scanner={"kind": "stdin"}, indicator={"kind": "log"})
        doc["providers"]["wx"] = sim.provider_options() | {
            "connect_timeout_s": 0.1, "read_timeout_s": 0.2,  # call limit 0.5 s: half the watchdog interval
            "first_query_after_s": 0.1, "query_every_s": 0.2}
        doc["routing"]["wechat"] = "wx"
        conf = write_config(tmp_path / "a.toml", doc)
        journal = Journal(tmp_path / "state", "S0001", "L01", readonly=False)
        with NotifySocket(tmp_path / "notify") as notify:
            proc = _start(conf, notify, tmp_path)
            try:
                notify.wait_for("READY=1", proc)
                fed = time.monotonic()
                proc.stdin.write(f"ORD:W1:1.00\n{WECHAT_SLOW}\n".encode())
                proc.stdin.flush()
                assert wait_for(lambda: any(t.state is State.PAID for t in journal.recent()), timeout=20)
                time.sleep(max(0.0, fed + ledger.slow_s - time.monotonic()))  # until the late answer went out
                end = time.monotonic()
            finally:
                _, rc, err = _stop(proc, tmp_path)
        [txn] = journal.recent()
        events = [e["state"] for e in journal.events(txn.txn_id)]
        journal.close()
    assert rc == 0, err
    assert events == ["pending", "unknown", "paid"] and ledger.charges(txn.out_trade_no) == 1, events
    assert "longer than half the watchdog interval" not in err
    _assert_pinged(notify, fed, end)

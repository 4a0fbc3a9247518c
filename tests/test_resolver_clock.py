"""Clock jumps: a wall-clock step of +-1 h during a payment changes nothing but the timestamps.

Each scenario runs a real lane (journal, sandbox platform, till, resolver) on virtual time: a
monotonic clock the test advances in 1/8 s steps, and a wall clock that follows it plus a step
`offset` applied at a chosen moment. The journal stamps with that wall clock, the InFlight ages
payments with the monotonic one. A scenario is run with no jump, +1 h and -1 h; the payment's state
history, and the monotonic instant of every state change, must be the same in all three.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from appliance.config import from_dict
from appliance.errors import ProviderUnavailable
from appliance.indicator import NullIndicator
from appliance.inflight import InFlight
from appliance.journal import OPEN_STATES, Journal
from appliance.payments import PayRequest, Router
from appliance.payments.sandbox import SandboxProvider
from appliance.resolver import Resolver
from appliance.service import make_classifier
from appliance.till import OfflinePolicy, Till
from conftest import (ALL_TYPES, WECHAT_PAID, WECHAT_PASSWORD_OK, WECHAT_SYSTEMERROR, appliance_cmd, lane_dict,
                      subprocess_env, write_config)

HOUR = 3600.0
STEP_S = 0.125  # the resolver's pace in virtual seconds (exact in binary: no rounding drift)
# Virtual-time policy: first query at 1 s, then every 1 s, reverse from 5 s; stale pending at 2 s;
# a deferred payment must be forwarded within 10 s.
POLICY = {"first_query_after_s": 1.0, "query_every_s": 1.0, "reverse_after_s": 5.0}
STALE_PENDING_S = 2.0
FORWARD_WITHIN_S = 10.0


class Clocks:
    """Virtual time: `monotonic()` advances only by `advance`; `wall()` is it plus a base and the
    current step `offset` (what NTP or `date -s` would do to CLOCK_REALTIME)."""

    def __init__(self) -> None:
        self.mono = 500.0
        self.offset = 0.0
        self._base = 1_750_000_000.0 - self.mono

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self._base + self.mono + self.offset

    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.wall(), timezone.utc)


class Outage(SandboxProvider):
    """The sandbox, unreachable (nothing sent: ProviderUnavailable) while `down()` is true."""

    down = staticmethod(lambda: False)

    def _gate(self) -> None:
        if self.down():
            raise ProviderUnavailable("sandbox: connection refused (scripted outage)")

    def pay(self, req: PayRequest):
        self._gate()
        return super().pay(req)

    def reverse(self, out_trade_no: str):
        self._gate()
        return super().reverse(out_trade_no)

    def refund(self, out_trade_no: str, amount_fen: int, total_fen: int, out_refund_no: str):
        self._gate()
        return super().refund(out_trade_no, amount_fen, total_fen, out_refund_no)

    def query_refund(self, out_trade_no: str, out_refund_no: str):
        self._gate()
        return super().query_refund(out_trade_no, out_refund_no)


class VirtualLane:
    """A lane wired as service.build does, but every clock injected from `Clocks`."""

    def __init__(self, tmp_path, clocks: Clocks) -> None:
        cfg = from_dict(lane_dict(tmp_path / "state", till={"stale_pending_s": STALE_PENDING_S},
                                  providers={"sandbox": {"kind": "sandbox", **POLICY}},
                                  offline={"enabled": True, "forward_within_s": FORWARD_WITHIN_S}))
        t = cfg.terminal
        self.clocks = clocks
        self.journal = Journal(t.state_dir, t.store_id, t.terminal_id, clock=clocks.utc)
        self.sandbox = Outage("sandbox", cfg.providers["sandbox"].options, t.state_dir)
        self.in_flight = InFlight(clock=clocks.monotonic, wall=clocks.wall)
        router = Router({"sandbox": self.sandbox}, {k: "sandbox" for k in ALL_TYPES})
        self.till = Till(journal=self.journal, router=router, classifier=make_classifier(cfg),
                         indicator=NullIndicator(), store_id=t.store_id, terminal_id=t.terminal_id,
                         offline=OfflinePolicy(True, 1000_00, 10, 10_000_00), in_flight=self.in_flight,
                         clock=clocks.monotonic)
        self.resolver = Resolver(self.journal, router, store_id=t.store_id, terminal_id=t.terminal_id,
                                 stale_pending_s=STALE_PENDING_S, forward_within_s=FORWARD_WITHIN_S,
                                 in_flight=self.in_flight)

    def run(self, txn_id: int, *, until_s: float, jump_at_s: float | None, jump_s: float) -> list[tuple]:
        """Step the resolver every STEP_S virtual seconds for `until_s` seconds (or until the
        payment is final), stepping the wall clock by `jump_s` at `jump_at_s`. Returns the
        payment's history as (state, virtual seconds since the run started) pairs."""
        t0 = self.clocks.mono
        seen = self.journal.get(txn_id).state
        history = [(str(seen), 0.0)]
        for i in range(1, round(until_s / STEP_S) + 1):
            self.clocks.mono = t0 + i * STEP_S
            if jump_at_s is not None and abs(self.clocks.mono - t0 - jump_at_s) < STEP_S / 2:
                self.clocks.offset += jump_s
            self.resolver.step()
            txn = self.journal.get(txn_id)
            if txn.state is not seen:
                seen = txn.state
                history.append((str(seen), self.clocks.mono - t0))
            if seen not in OPEN_STATES:
                break
        return history

    def close(self) -> None:
        self.sandbox.close()
        self.journal.close()


def _userpaying(lane: VirtualLane) -> int:
    return lane.till.charge("A1", 100, WECHAT_PASSWORD_OK).txn.txn_id


def _systemerror(lane: VirtualLane) -> int:
    return lane.till.charge("A1", 100, WECHAT_SYSTEMERROR).txn.txn_id


def _deferred(back_at_s: float):
    def start(lane: VirtualLane) -> int:
        t0 = lane.clocks.mono
        lane.sandbox.down = lambda: lane.clocks.mono < t0 + back_at_s
        return lane.till.charge("A1", 100, WECHAT_PAID).txn.txn_id
    return start


def _cancel_retry(lane: VirtualLane) -> int:
    lane.till.charge("A1", 100, WECHAT_PAID)
    t0 = lane.clocks.mono
    lane.sandbox.down = lambda: lane.clocks.mono < t0 + 3.0
    return lane.till.cancel("A1").txn.txn_id


def _left_by_a_previous_process(lane: VirtualLane) -> int:
    """A pending intent the platform received, found in the journal (not opened by this process)."""
    txn = lane.journal.open_payment(order="A1", amount_fen=100, payment_type="wechat", platform="sandbox",
                                    code=WECHAT_SYSTEMERROR)
    lane.sandbox.pay(PayRequest(txn.out_trade_no, 100, WECHAT_SYSTEMERROR, "x", "S0001", "L01"))
    return txn.txn_id


# (scenario, start, expected history with no jump, moment of the jump in virtual seconds)
SCENARIOS = [
    # (a) the customer confirms a password: the 2nd query (at 2 s) answers paid; the jump comes
    # before the 1st query. A +1 h wall step must not make it look 1 h old and reversed.
    ("userpaying", _userpaying, [("unknown", 0.0), ("paid", 2.0)], 0.5),
    # (b) every query stays unknown: reversed at reverse_after_s (5 s), not at once, not 1 h later
    ("systemerror", _systemerror, [("unknown", 0.0), ("reversed", 5.0)], 2.5),
    # (c) accepted offline; the platform is back at 3 s: forwarded (retries every 1 s) and paid
    ("deferred-forwarded", _deferred(3.0), [("deferred", 0.0), ("paid", 3.125)], 1.5),
    # (c) the platform stays down: declined unforwarded at forward_within_s (10 s)
    ("deferred-expired", _deferred(HOUR * 3), [("deferred", 0.0), ("declined", 10.125)], 4.0),
    # (d) the cancel cannot reach the platform until 3 s: retried every 1 s, then cancelled
    ("cancel-retry", _cancel_retry, [("cancel_requested", 0.0), ("cancelled", 3.0)], 1.5),
    # a payment this process did not open: aged once from its wall-clock age, then monotonic
    # (pending until stale_pending_s, then queried until reverse_after_s)
    ("previous-process", _left_by_a_previous_process, [("pending", 0.0), ("unknown", 2.0), ("reversed", 5.125)],
     1.0),
]


def _run(path, start, jump_at_s: float, jump_s: float) -> tuple[list, list, int]:
    """(history, the payment's journaled states, charges kept by the platform) of one run."""
    lane = VirtualLane(path, Clocks())
    try:
        txn_id = start(lane)
        history = lane.run(txn_id, until_s=15.0, jump_at_s=jump_at_s, jump_s=jump_s)
        events = lane.journal.events(txn_id)
        # the timestamps do move with the wall clock
        last = datetime.fromisoformat(events[-1]["at"].replace("Z", "+00:00")).timestamp()
        assert last == pytest.approx(lane.clocks.wall(), abs=0.01)
        charges = sum(lane.sandbox.charges(c) for c in (WECHAT_PAID, WECHAT_PASSWORD_OK, WECHAT_SYSTEMERROR))
        return history, [e["state"] for e in events], charges
    finally:
        lane.close()


@pytest.mark.parametrize("jump_s", [+HOUR, -HOUR], ids=["plus-1h", "minus-1h"])
@pytest.mark.parametrize("name,start,expected,jump_at_s", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_a_wall_clock_step_changes_nothing_but_timestamps(tmp_path, name, start, expected, jump_at_s, jump_s):
    base = _run(tmp_path / "steady", start, jump_at_s, 0.0)
    assert base[0] == expected
    assert _run(tmp_path / "stepped", start, jump_at_s, jump_s) == base


@pytest.mark.parametrize("before_first_sight_s,ends", [
    (-HOUR, (2.125, 5.25)),  # created "in the future": aged 0 at first sight (0.125 s), not -1 h
    (0.0, (2.0, 5.125)),
])
def test_a_payment_from_before_a_backward_step_is_aged_from_zero(tmp_path, before_first_sight_s, ends):
    """The wall clock went back after a previous process opened the payment (NTP after a reboot
    without RTC): at first sight its wall-clock age is negative and counts as 0."""
    lane = VirtualLane(tmp_path, Clocks())
    try:
        txn_id = _left_by_a_previous_process(lane)
        lane.clocks.offset += before_first_sight_s
        history = lane.run(txn_id, until_s=15.0, jump_at_s=None, jump_s=0.0)
        assert history == [("pending", 0.0), ("unknown", ends[0]), ("reversed", ends[1])]
    finally:
        lane.close()


def test_a_payment_from_a_previous_process_keeps_its_wall_clock_age(tmp_path):
    """Its age at first sight is taken from the wall clock: one that waited 4 s (a restart) has
    1 s of querying left before the reverse, not 5."""
    lane = VirtualLane(tmp_path, Clocks())
    try:
        txn_id = _left_by_a_previous_process(lane)
        lane.clocks.mono += 4.0  # the previous process died; this one starts 4 s later
        history = lane.run(txn_id, until_s=15.0, jump_at_s=None, jump_s=0.0)
        assert history == [("pending", 0.0), ("unknown", 0.125), ("reversed", 1.25)]
    finally:
        lane.close()


def test_the_timeline_forgets_final_payments(tmp_path):
    lane = VirtualLane(tmp_path, Clocks())
    try:
        for i in range(20):
            lane.till.charge(f"A{i}", 100, f"1345678901234{i:03d}00")
        ids = [lane.till.charge(f"B{i}", 100, f"1345678901234{i:03d}94").txn.txn_id for i in range(3)]
        lane.resolver.step()
        assert lane.in_flight.tracked() == 3  # the three unknown ones; the 20 paid ones are forgotten
        lane.run(ids[-1], until_s=15.0, jump_at_s=None, jump_s=0.0)
        lane.resolver.step()
        assert lane.in_flight.tracked() == 0
    finally:
        lane.close()


def test_retain_keeps_a_payment_opened_after_the_journal_was_read():
    f = InFlight(clock=lambda: 10.0, wall=lambda: 0.0)
    mark = f.mark()  # the resolver takes its mark, reads the open payments (none) ...
    f.opened(7)  # ... and the till opens payment 7 before the resolver retains
    f.retain(set(), mark)
    assert f.tracked() == 1
    f.retain(set(), f.mark())  # the next pass did not find 7 open: it ended
    assert f.tracked() == 0


# --- the real service process, its wall clock stepped by libfaketime ---------------------------

FAKETIME_LIBS = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
# Debian 12's libfaketime 0.9.10 turns time.sleep() into EINVAL when monotonic time is not faked
# (https://github.com/wolfcw/libfaketime/issues/426). The child then sleeps with select(), which
# libfaketime leaves alone; where a fixed libfaketime is installed the probe passes and no shim is used.
SLEEP_SHIM = "import select, time\ntime.sleep = lambda s: select.select([], [], [], s) and None\n"


def _faketime_env(tmp_path, spec: Path) -> dict:
    if not FAKETIME_LIBS:
        pytest.skip("libfaketime not installed (Debian package faketime; `make apt-deps` installs it)")
    spec.write_text("+0\n")
    env = subprocess_env(LD_PRELOAD=FAKETIME_LIBS[0], FAKETIME_TIMESTAMP_FILE=str(spec), FAKETIME_NO_CACHE="1",
                         FAKETIME_DONT_FAKE_MONOTONIC="1")
    probe = subprocess.run([sys.executable, "-c", "import time; time.sleep(0)"], env=env, capture_output=True)
    if probe.returncode != 0:
        shim = tmp_path / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(SLEEP_SHIM)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
    return env


class Stderr:
    """The service's stderr lines, collected by a thread; `wait_for` a line containing a text."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=lambda: self.lines.extend(proc.stderr), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """After the process ended: the rest of its lines are read, the pipe is closed."""
        self._thread.join(timeout=5)
        self._proc.stderr.close()

    def wait_for(self, text: str, timeout: float = 20.0) -> float:
        """Monotonic time at which a line containing `text` was seen. Fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.lines)):
                return time.monotonic()
            time.sleep(0.02)
        pytest.fail(f"no {text!r} in the service's log within {timeout}s:\n{''.join(self.lines)}")


def test_the_running_service_rides_out_real_wall_clock_steps(tmp_path):
    """`appliance run` under libfaketime: its CLOCK_REALTIME steps +1 h while a customer types a
    password, then -1 h while a SYSTEMERROR payment is being queried; CLOCK_MONOTONIC is real."""
    spec = tmp_path / "faketime"
    env = _faketime_env(tmp_path, spec)
    doc = lane_dict(tmp_path / "state", scanner={"kind": "stdin"}, indicator={"kind": "log"},
                    providers={"sandbox": {"kind": "sandbox", "first_query_after_s": 1.0, "query_every_s": 0.5,
                                           "reverse_after_s": 2.0}})
    conf = write_config(tmp_path / "a.toml", doc)
    proc = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    log = Stderr(proc)
    try:
        proc.stdin.write(f"ORD:A1:1.00\n{WECHAT_PASSWORD_OK}\n")
        proc.stdin.flush()
        log.wait_for("txn 1: pending -> unknown")
        spec.write_text("+3600\n")  # before the first query: the payment must not look an hour old
        log.wait_for("txn 1: unknown -> paid")
        time.sleep(0.1)  # the lane shows the result, then is ready for the next order
        proc.stdin.write(f"ORD:A2:1.00\n{WECHAT_SYSTEMERROR}\n")
        proc.stdin.flush()
        opened = log.wait_for("txn 2: pending -> unknown")
        spec.write_text("+0\n")  # back an hour, mid-querying: the reverse must still come at 2 s
        reversed_at = log.wait_for("txn 2: unknown -> reversed")
        assert 1.5 < reversed_at - opened < 15.0  # reverse_after_s is 2 s (the old code: about 1 h)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
            stopped = True
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stopped = False
        proc.stdin.close()
        log.close()
    assert stopped, f"the service did not stop within 10 s of SIGTERM:\n{''.join(log.lines)}"
    journal = Journal(tmp_path / "state", "S0001", "L01")
    try:
        assert [e["state"] for e in journal.events(1)] == ["pending", "unknown", "paid"]
        assert [e["state"] for e in journal.events(2)] == ["pending", "unknown", "reversed"]
        stamps = [e["at"] for e in journal.events() if e["kind"] == "txn"]  # not the lane's started/stopped
        hour_ahead = [datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() - time.time() > 3000
                      for s in stamps]
        assert hour_ahead == [False, False, True, True, True, False]  # only the timestamps moved
    finally:
        journal.close()

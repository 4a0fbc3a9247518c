"""The kill harness: the real `appliance run`, fed scans through its scanner, SIGKILLed again and again.

Each kill point is one SIGKILL of a real service process in the middle of its work:

  * at a named crash point (`appliance/failpoints.py`): just before or after any journal commit,
    or just after the platform charged, answered a query, reversed, refunded or answered a refund
    query; the N-th point the process passes is chosen by a seeded random generator, so a run is
    reproducible;
  * or at a random moment (a seeded delay), wherever the process happens to be.

Kills land in payments (every sandbox outcome: paid, declined, expired code, the customer's
password, a system error, a lost answer, an unreachable platform, a refund first only accepted),
in cancels (reverses, refunds and the polling of a refund still processing), and in the
resolver's work, including the recovery right after a restart (some restarts are armed too).

After every kill the service is started again, unarmed, until every payment is final, and the
journal is checked against the platform's own ledger (the sandbox's SQLite ledger):
  * nothing lost: every trade the platform has is in the journal;
  * nobody charged twice: no code and no order has more than one successful trade;
  * agreement: each final journal state matches what the platform did.

`KILL_POINTS` (default 200) and `KILL_SEED` set the size and the seed; `make kill-nightly` runs a
larger one. The figures are printed at the end (pytest -s) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.journal import Journal
from appliance.payments.sandbox import SandboxOptions, SandboxProvider
from conftest import appliance_cmd, lane_dict, subprocess_env, write_config
from ledger_check import check_against_ledger
from notify import NotifySocket

pytestmark = pytest.mark.integration

KILL_POINTS = int(os.environ.get("KILL_POINTS", "200"))
SEED = int(os.environ.get("KILL_SEED", "20261129"))
CHAINS = 4  # independent lanes (state dirs) killed side by side

#: Sandbox outcomes by the code's last two digits (appliance/payments/sandbox.py).
OUTCOMES = {"paid": "07", "declined": "90", "expired": "91", "password_ok": "92", "password_giveup": "93",
            "systemerror": "94", "unreachable": "95", "lost_answer": "96", "refund_processing": "98"}
WEIGHTS = {"paid": 8, "declined": 1, "expired": 1, "password_ok": 2, "password_giveup": 1, "systemerror": 1,
           "unreachable": 1, "lost_answer": 2, "refund_processing": 1}

@dataclass
class Chain:
    """One lane's run of kills and restarts on its own state dir."""

    number: int
    state_dir: Path
    conf: Path
    rng: random.Random
    codes: int = 0
    orders: int = 0
    kills: Counter = field(default_factory=Counter)  # where each kill struck
    checks: int = 0
    paid_orders: list = field(default_factory=list)

    def code(self, outcome: str) -> str:
        self.codes += 1
        return f"13{self.number:02d}{self.codes:012d}{OUTCOMES[outcome]}"

    def order(self) -> str:
        self.orders += 1
        return f"K{self.number}x{self.orders}"


def _start(chain: Chain, crash_at: int | None) -> subprocess.Popen:
    """Start the service and wait until it tells systemd's notify socket READY=1 (or dies on the
    way, at a crash point of its recovery): the work is fed to a running lane, however long a
    loaded machine takes to start Python, so the kills land in the work and not in the start-up."""
    env = {"APPLIANCE_CRASH_TRACE": str(chain.state_dir.parent / "crash-trace")}
    if crash_at:
        env["APPLIANCE_CRASH_AT"] = str(crash_at)
    with NotifySocket(chain.state_dir.parent / f"notify-{chain.number}") as notify:
        proc = subprocess.Popen(appliance_cmd() + ["run", "--config", str(chain.conf)], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=subprocess_env(**notify.env(), **env))
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline and not notify.times("READY=1"):
            time.sleep(0.02)
    return proc


def _feed(proc: subprocess.Popen, *scans: str) -> None:
    try:
        proc.stdin.write("".join(s + "\n" for s in scans).encode())
        proc.stdin.flush()
    except (BrokenPipeError, ValueError):
        pass  # it died at a crash point: that is the test


def _wait(predicate, proc: subprocess.Popen | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    return predicate()


def _scenario(chain: Chain) -> list[tuple[str, ...]]:
    """One to three cashier actions: pay an order with a random outcome, or cancel a paid one."""
    steps = []
    for _ in range(chain.rng.randint(1, 3)):
        if chain.paid_orders and chain.rng.random() < 0.25:
            order, amount = chain.paid_orders.pop(chain.rng.randrange(len(chain.paid_orders)))
            steps.append(("CMD:CANCEL", f"ORD:{order}:{amount}"))
        else:
            outcome = chain.rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
            order, amount = chain.order(), f"{chain.rng.randint(1, 99999) / 100:.2f}"
            steps.append((f"ORD:{order}:{amount}", chain.code(outcome)))
            if outcome in ("paid", "refund_processing"):
                chain.paid_orders.append((order, amount))
    return steps


def _play(steps, proc: subprocess.Popen, journal: Journal) -> None:
    for scans in steps:
        _feed(proc, *scans)
        # let the lane take the next scans (an unresolved payment makes the till ignore them)
        _wait(lambda: not journal.open_txns(), proc, 1.5)


#: Crash points a cashier action passes at least: the journal's open and its first transition
#: (before and after each commit) and the platform's answer.
HITS_PER_STEP = 5
#: Crash points every start passes before READY=1: the commit of the lane event `started`.
STARTUP_HITS = 2


def _kill_once(chain: Chain, journal: Journal, *, recovery: bool) -> str:
    """Start the service armed, give it work, and SIGKILL it; returns where the kill struck."""
    trace = chain.state_dir.parent / "crash-trace"
    trace.unlink(missing_ok=True)
    steps = [] if recovery else _scenario(chain)
    by_timer = chain.rng.random() < 0.25
    crash_at = None if by_timer else chain.rng.randint(1, 4 if recovery else HITS_PER_STEP * len(steps))
    if crash_at and not recovery:
        crash_at += STARTUP_HITS  # in the work, not in the lane event of the start
    proc = _start(chain, crash_at)
    try:
        if by_timer:
            timer = threading.Timer(chain.rng.uniform(0.05, 0.8), proc.kill)
            timer.start()
        _play(steps, proc, journal)
        died = _wait(lambda: proc.poll() is not None, None, 3.0 if recovery else 1.0)
        if by_timer:
            timer.join()
        if not died:
            proc.kill()  # its work ran out before the chosen point: a kill while idle
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:  # scans still buffered for a process that died at a crash point
            pass
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    if trace.exists():
        return trace.read_text().strip()
    return "random moment" if by_timer else "idle, after the work"


def _restart_until_final(chain: Chain, journal: Journal) -> None:
    proc = _start(chain, None)
    try:
        assert _wait(lambda: not journal.open_txns(), proc, 20), (
            f"chain {chain.number}: still open after restart: {journal.open_txns()}")
    finally:
        proc.kill()
        proc.stdin.close()
        proc.wait(10)


def _run_chain(chain: Chain, kills: int, errors: list) -> None:
    try:
        Journal(chain.state_dir, "S0001", "L01").close()  # the lane's journal, as its first start makes it
        journal = Journal(chain.state_dir, "S0001", "L01", readonly=True)
        ledger = SandboxProvider("sandbox", SandboxOptions(), chain.state_dir)
        while sum(chain.kills.values()) < kills:
            chain.kills[_kill_once(chain, journal, recovery=False)] += 1
            if chain.rng.random() < 0.25 and sum(chain.kills.values()) < kills:  # kill the recovery too
                chain.kills[_kill_once(chain, journal, recovery=True)] += 1
            _restart_until_final(chain, journal)
            check_against_ledger(journal, ledger)
            chain.checks += 1
        journal.close()
        ledger.close()
    except BaseException as e:  # reported by the test thread
        errors.append(e)


def test_kill_harness(tmp_path):
    t0 = time.monotonic()
    chains = []
    for n in range(CHAINS):
        root = tmp_path / f"lane{n}"
        root.mkdir()
        doc = lane_dict(root / "state", scanner={"kind": "stdin"}, indicator={"kind": "log"},
                        till={"stale_pending_s": 0.3}, logging={"level": "WARNING"},
                        offline={"enabled": True, "forward_within_s": 1.0})
        # cancels of payments older than 5 s are refunds; unknown payments are reversed well before, even after
        # a restart on a loaded machine
        doc["providers"]["sandbox"].update({"query_every_s": 0.05, "reverse_after_s": 0.3, "reverse_window_s": 5.0})
        chains.append(Chain(n, root / "state", write_config(root / "a.toml", doc), random.Random(SEED * 31 + n)))
    per_chain = -(-KILL_POINTS // CHAINS)
    errors: list = []
    threads = [threading.Thread(target=_run_chain, args=(c, per_chain, errors)) for c in chains]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    kills = sum((c.kills for c in chains), Counter())
    payments, outcomes = 0, Counter()
    for c in chains:
        j = Journal(c.state_dir, "S0001", "L01", readonly=True)
        txns = j.recent(limit=1_000_000)
        j.close()
        payments += len(txns)
        outcomes.update(str(t.state) for t in txns)
    print(f"\nkill harness: seed {SEED}, {sum(kills.values())} SIGKILLs over {CHAINS} lanes in "
          f"{time.monotonic() - t0:.0f} s; {payments} payments checked against the ledger after "
          f"{sum(c.checks for c in chains)} restarts; double charges 0, lost 0")
    print("  final states: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print("  kills by point: " + ", ".join(f"{k} {v}" for k, v in kills.most_common()))
    assert sum(kills.values()) >= KILL_POINTS
    named = sum(v for k, v in kills.items() if k.startswith(("journal.", "platform.")))
    assert named >= KILL_POINTS * 2 // 5  # a quarter are random moments; most others land inside the work

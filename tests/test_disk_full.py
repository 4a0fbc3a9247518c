"""The disk fills at every step of a payment, a cancel and the resolver's work (a real tmpfs).

For each scenario the crash points it passes (`appliance/failpoints.py`: both sides of every
journal commit, each platform answer) are counted once; then the scenario is played again and
again on a fresh state dir, the disk filled at the first, the second, ... point. At each:

  * nothing is charged without a journal record, and nobody twice (the sandbox ledger says);
  * the cashier and the command get a right answer: a refusal saying "disk full" when nothing was
    sent, "unknown" (exit 4) saying "disk full" when the platform may have charged, or the real
    end when the write that failed came after it; the fault signal when the journal failed;
  * once there is room again, the resolver finishes every payment, and the journal agrees with
    the platform.
"""

from __future__ import annotations

import time

import pytest

from appliance import failpoints, service
from appliance.config import from_dict
from appliance.indicator import Signal
from appliance.scan import Scan
from conftest import Recorder, SmallDisk, lane_dict, tmpfs
from ledger_check import check_against_ledger

# Payment codes by sandbox outcome (appliance/payments/sandbox.py), made unique per case.
SCENARIOS = {
    "paid": [("ORD:{o}:1.00", "13{n:014d}07")],
    "password then paid": [("ORD:{o}:1.00", "13{n:014d}92")],
    "system error, reversed": [("ORD:{o}:1.00", "13{n:014d}94")],
    "answer lost, queried": [("ORD:{o}:1.00", "13{n:014d}96")],
    "paid, then cancelled": [("ORD:{o}:1.00", "13{n:014d}08"), ("CMD:CANCEL", "ORD:{o}:1.00")],
}


def _lane(state_dir):
    doc = lane_dict(state_dir, till={"stale_pending_s": 0.1}, terminal={"min_free_mb": 0})  # SQLite's own ENOSPC, not the reserve
    doc["providers"]["sandbox"].update({"query_every_s": 0.02, "reverse_after_s": 0.2})
    lane = service.build(from_dict(doc), indicator=Recorder())
    lane.resolver.journal_retry_s = 0.05
    lane.router.providers["sandbox"].charges("0")  # the platform's ledger exists before the disk fills
    return lane


def _play(lane, steps, case: int) -> list:
    results = []
    for scans in steps:
        for text in scans:
            r = lane.till.handle_scan(Scan(text.format(o=f"D{case}", n=case), "test"))
            if r is not None:
                results.append(r)
        _settle(lane, timeout=0.4)  # the resolver's work, as its thread would do it
    return results


def _settle(lane, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while lane.journal.open_txns() and time.monotonic() < deadline:
        try:
            lane.resolver.step()
        except Exception:  # noqa: BLE001 - as Resolver.run does: keep going
            pass
        lane.till.drain()
        time.sleep(0.01)


def _count_points(tmp_path, steps) -> int:
    seen = []
    failpoints.set_hook(seen.append)
    try:
        lane = _lane(tmp_path / "count")
        _play(lane, steps, 0)
        lane.close()
    finally:
        failpoints.set_hook(None)
    return len(seen)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_disk_full_at_every_step(tmp_path, scenario):
    steps = SCENARIOS[scenario]
    points = _count_points(tmp_path, steps)
    assert points >= 5
    print(f"{scenario}: {points} points")
    for k in range(1, points + 1):
        with tmpfs(tmp_path / f"case{k}", "1m") as mnt:  # a disk of its own for each case
            _fill_at(SmallDisk(mnt), steps, scenario, k)


def _fill_at(small_disk, steps, scenario: str, k: int) -> None:
    state = small_disk.path / "state"
    lane = _lane(state)
    hits = []

    def fill_at_k(name, k=k, hits=hits):
        hits.append(name)
        if len(hits) == k:
            small_disk.fill()

    failpoints.set_hook(fill_at_k)
    try:
        results = _play(lane, steps, k)
    finally:
        failpoints.set_hook(None)
    where = f"{scenario}: disk filled at point {k} ({hits[k - 1] if len(hits) >= k else '?'})"
    for r in results:
        assert r.exit_code in (0, 3, 4, 5), where
        if "disk full" in r.reason:
            assert r.exit_code in (4, 5), where
            assert r.exit_code == 5 or r.txn is not None, where  # unknown is always a journaled payment
    if any("disk full" in r.reason for r in results):
        assert Signal.FAULT in lane.till.indicator.shown or lane.till.indicator.current is Signal.WORKING, where
    small_disk.free()
    _settle(lane, timeout=10)
    ledger = lane.router.providers["sandbox"]
    check_against_ledger(lane.journal, ledger)
    lane.close()

"""What the till does when its journal fails under it: lost (deleted, replaced) or the disk full."""

import os
import json
import time

import pytest

from appliance import service
from appliance.config import from_dict
from appliance.indicator import Signal
from appliance.journal import State
from appliance.payments import Provider
from appliance.scan import Scan
from conftest import WECHAT_PAID, WECHAT_PAID_2, Recorder, lane_dict


class DuringPay(Provider):
    """A Provider that delegates to another and runs `hook()` once the platform has charged, before
    the answer reaches the till: the moment a journal failure costs the most."""

    def __init__(self, inner, hook):
        super().__init__(inner.name, inner.policy)
        self.inner, self.hook = inner, hook

    def pay(self, req):
        out = self.inner.pay(req)
        self.hook()
        return out

    def query(self, out_trade_no):
        return self.inner.query(out_trade_no)

    def reverse(self, out_trade_no):
        return self.inner.reverse(out_trade_no)

    def refund(self, out_trade_no, amount_fen, total_fen, out_refund_no):
        return self.inner.refund(out_trade_no, amount_fen, total_fen, out_refund_no)

    def query_refund(self, out_trade_no, out_refund_no):
        return self.inner.query_refund(out_trade_no, out_refund_no)


def _lane(state_dir, hook=None):
    lane = service.build(from_dict(lane_dict(state_dir, terminal={"min_free_mb": 0})), indicator=Recorder())  # SQLite's own ENOSPC, not the reserve
    sandbox = lane.router.providers["sandbox"]
    sandbox.charges("0")  # the platform's ledger exists before any disk is filled
    if hook is not None:
        lane.router.providers["sandbox"] = DuringPay(sandbox, hook)
    return lane, sandbox


def _pay(lane, order, code):
    lane.till.handle_scan(Scan(f"ORD:{order}:1.00", "test"))
    return lane.till.handle_scan(Scan(code, "test"))


@pytest.mark.parametrize("damage", ["unlink", "replace"])
def test_a_lost_journal_stops_payments_and_shows_a_fault_that_stays(tmp_path, damage):
    lane, sandbox = _lane(tmp_path / "state")
    assert _pay(lane, "A1", WECHAT_PAID).txn.state is State.PAID
    if damage == "unlink":
        lane.journal.path.unlink()
    else:
        copy = lane.journal.path.with_name("copy")
        copy.write_bytes(lane.journal.path.read_bytes())
        copy.rename(lane.journal.path)
    r = _pay(lane, "A2", WECHAT_PAID_2)
    assert r.state == "refused" and "no more payments" in r.reason and r.exit_code == 5
    assert sandbox.charges(WECHAT_PAID_2) == 0  # never sent to the platform
    assert lane.till.indicator.current is Signal.FAULT
    lane.till.post_fault(None)  # the scanner coming back does not clear a journal fault
    lane.till.drain()
    assert lane.till.indicator.current is Signal.FAULT
    lane.close()


def test_disk_full_before_a_payment_refuses_it_with_a_fault(small_disk):
    lane, sandbox = _lane(small_disk.path / "state")
    small_disk.fill()
    r = _pay(lane, "A1", WECHAT_PAID)
    assert r.state == "refused" and "disk full" in r.reason
    assert sandbox.charges(WECHAT_PAID) == 0
    assert Signal.FAULT in lane.till.indicator.shown
    assert lane.till.health()["faults"] == {"journal": "disk full"}
    small_disk.free()
    assert _pay(lane, "A2", WECHAT_PAID_2).txn.state is State.PAID  # room again: the lane takes payments
    assert lane.till.health()["faults"] == {}
    # the fault could not be journaled (the disk was full: best effort, no error), its end was
    assert [json.loads(r.payload)["event"] for r in lane.journal.claim() if r.kind == "lane"] == ["fault_cleared"]
    lane.close()


def test_a_state_dir_near_full_refuses_new_payments_with_a_fault_and_lets_taken_ones_end(tmp_path):
    lane, sandbox = _lane(tmp_path / "state")
    assert _pay(lane, "A1", WECHAT_PAID).txn.state is State.PAID
    st = os.statvfs(tmp_path)
    lane.journal.min_free_bytes = st.f_bavail * st.f_frsize + 2**30  # as `[terminal] min_free_mb` above what is free
    r = _pay(lane, "A2", WECHAT_PAID_2)
    assert r.state == "refused" and "nearly full" in r.reason and sandbox.charges(WECHAT_PAID_2) == 0
    assert lane.till.indicator.current is Signal.FAULT
    assert lane.till.cancel("A1").txn.state is State.CANCELLED  # what was taken still ends
    lane.close()


def test_disk_full_between_pending_and_the_answer_is_unknown_then_resolved(small_disk):
    lane, sandbox = _lane(small_disk.path / "state", hook=small_disk.fill)
    r = _pay(lane, "A1", WECHAT_PAID)
    assert (r.state, r.exit_code) == ("unknown", 4) and "disk full" in r.reason
    assert sandbox.charges(WECHAT_PAID) == 1  # the customer was charged...
    assert lane.journal.get(r.txn.txn_id).state is State.PENDING  # ...and the journal knows it may be
    assert lane.till.indicator.current is Signal.WORKING  # the cashier waits while the resolver works
    small_disk.free()
    deadline = time.monotonic() + 10
    while lane.journal.get(r.txn.txn_id).state is not State.PAID and time.monotonic() < deadline:
        lane.resolver.step()
        time.sleep(0.05)
    assert lane.journal.get(r.txn.txn_id).state is State.PAID  # queried, never charged again
    assert sandbox.charges(WECHAT_PAID) == 1
    lane.till.drain()  # the resolver's news reaches the till: the payment ends, the disk fault clears
    assert lane.till.indicator.current is Signal.PAID
    lane.close()


def test_an_idle_lane_shows_a_lost_journal_within_a_second(tmp_path):
    lane, _ = _lane(tmp_path / "state")
    lane.till.tick()
    assert lane.till.indicator.current is not Signal.FAULT
    lane.journal.path.unlink()
    deadline = time.monotonic() + 3
    while lane.till.indicator.current is not Signal.FAULT and time.monotonic() < deadline:
        lane.till.tick()
        time.sleep(0.05)
    assert lane.till.indicator.current is Signal.FAULT
    lane.close()

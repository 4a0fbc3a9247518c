"""The lane state machine, driven scan by scan with a fake clock (no threads); at the end, its run
loop in a thread on the real clock."""

import threading
import time

import pytest

from appliance.filewatch import FileWatch
from appliance.indicator import Signal
from appliance.journal import State
from appliance.scan import Scan
from appliance.till import ArmCommand, OfflinePolicy, Till
from appliance.wakeup import Stop
from conftest import (ALIPAY_NOTENOUGH, WECHAT_EXPIRED, WECHAT_PAID, WECHAT_PAID_2, WECHAT_PASSWORD_OK,
                      WECHAT_SYSTEMERROR, WECHAT_UNREACHABLE, Recorder, journal_snapshot, wait_for)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def till(lane, clock):
    ind = Recorder()
    t = Till(journal=lane.journal, router=lane.router, classifier=lane.till.classifier, indicator=ind,
             store_id="S0001", terminal_id="L01", order_timeout_s=60, cancel_timeout_s=30,
             duplicate_window_s=10, result_hold_s=3, max_amount_fen=50_000_00, clock=clock,
             in_flight=lane.resolver.in_flight)
    lane.resolver.on_change = t.post_resolved
    return t


def scan(till, text):
    return till.handle_scan(Scan(text, "test"))


def test_order_then_code_pays(till):
    scan(till, "ORD:A1:12.34")
    assert till.indicator.current is Signal.AWAITING_CODE
    r = scan(till, WECHAT_PAID)
    assert r.txn.state is State.PAID and r.exit_code == 0
    assert till.indicator.shown[-2:] == [Signal.WORKING, Signal.PAID]
    assert (r.txn.order, r.txn.amount_fen, r.txn.payment_type, r.txn.platform) == ("A1", 1234, "wechat", "sandbox")


def test_declined_then_new_code_for_same_order(till):
    scan(till, "ORD:A1:12.34")
    assert scan(till, ALIPAY_NOTENOUGH).txn.state is State.DECLINED
    assert till.indicator.current is Signal.DECLINED
    scan(till, "ORD:A1:12.34")
    assert scan(till, WECHAT_PAID).txn.state is State.PAID


def test_result_shows_for_hold_then_ready(till, clock):
    scan(till, "ORD:A1:1.00")
    scan(till, WECHAT_PAID)
    clock.t += 2.9
    till.tick()
    assert till.indicator.current is Signal.PAID
    clock.t += 0.2
    till.tick()
    assert till.indicator.current is Signal.READY


def test_code_without_order_is_refused(till, lane):
    before = journal_snapshot(lane.journal)
    assert scan(till, WECHAT_PAID) is None
    assert till.indicator.current is Signal.UNKNOWN_CODE
    assert journal_snapshot(lane.journal) == before


def test_order_times_out_back_to_ready(till, clock, lane):
    scan(till, "ORD:A1:1.00")
    clock.t += 60.1
    till.tick()
    assert till.indicator.current is Signal.READY
    assert scan(till, WECHAT_PAID) is None  # the order is gone
    assert lane.journal.recent() == []


def test_same_code_twice_in_window_charges_once(till, lane):
    scan(till, "ORD:A1:1.00")
    assert scan(till, WECHAT_PAID).txn.state is State.PAID
    scan(till, "ORD:A2:1.00")
    assert scan(till, WECHAT_PAID) is None  # scanner stutter: ignored
    assert len(lane.journal.recent()) == 1
    assert lane.router.by_name("sandbox").charges(WECHAT_PAID) == 1


def test_the_duplicate_window_forgets_each_code_on_time_whatever_the_pace(till, clock, lane):
    scan(till, "ORD:A1:1.00")
    assert scan(till, WECHAT_PAID).txn.state is State.PAID
    clock.t += 6
    scan(till, "ORD:A2:1.00")
    assert scan(till, WECHAT_PAID_2).txn.state is State.PAID
    clock.t += 5  # the first code left the window (11 s), the second is still in it (5 s)
    scan(till, "ORD:A3:1.00")
    assert scan(till, WECHAT_PAID_2) is None  # a stutter: ignored, the order still waits
    r = scan(till, WECHAT_PAID)  # no stutter: the journal refuses the used code
    assert r.txn is None and "already used" in r.reason
    clock.t += 5
    r = scan(till, WECHAT_PAID_2)  # its window passed too
    assert r.txn is None and "already used" in r.reason
    assert len(lane.journal.recent()) == 2


def test_a_till_that_defers_checkpoints_makes_them_after_a_result(till, lane):
    from appliance.journal import CHECKPOINT_EVERY_COMMITS
    lane.journal.defer_checkpoints()  # as run() does in the till's thread
    size = lane.journal.path.stat().st_size
    for n in range(CHECKPOINT_EVERY_COMMITS // 2):  # two commits each
        scan(till, f"ORD:A{n}:1.00")
        assert scan(till, f"1345678901234{n:03d}00").txn.state is State.PAID
    assert lane.journal.path.stat().st_size > size  # checkpointed after the 20th's signal


def test_an_order_taken_between_its_ticket_and_the_code_is_refused_in_the_journal(till, lane):
    scan(till, "ORD:A1:1.00")  # checked free at the ticket
    other = lane.journal.open_payment(order="A1", amount_fen=100, payment_type="wechat", platform="sandbox",
                                      code=WECHAT_PAID_2)  # another process (a CLI charge) takes it meanwhile
    r = scan(till, WECHAT_PAID)
    assert r.txn is None and f"has a payment being resolved (txn {other.txn_id})" in r.reason
    assert lane.router.by_name("sandbox").charges(WECHAT_PAID) == 0 and len(lane.journal.recent()) == 1


def test_used_code_after_window_is_refused_and_order_keeps_waiting(till, clock, lane):
    scan(till, "ORD:A1:1.00")
    scan(till, WECHAT_PAID)
    clock.t += 11
    scan(till, "ORD:A2:1.00")
    r = scan(till, WECHAT_PAID)
    assert r.txn is None and "already used" in r.reason and r.exit_code == 5
    assert till.indicator.current is Signal.UNKNOWN_CODE
    assert scan(till, WECHAT_PAID_2).txn.state is State.PAID  # a fresh code pays the waiting order
    assert lane.router.by_name("sandbox").charges(WECHAT_PAID) == 1


def test_paid_order_cannot_be_charged_again(till):
    scan(till, "ORD:A1:1.00")
    scan(till, WECHAT_PAID)
    assert scan(till, "ORD:A1:1.00") is None
    assert till.indicator.current is Signal.UNKNOWN_CODE
    r = till.charge("A1", 100, WECHAT_PAID_2)
    assert r.exit_code == 5 and "already paid" in r.reason


def test_amount_over_lane_limit_is_refused(till, lane):
    scan(till, "ORD:A1:50000.01")
    assert till.indicator.current is Signal.UNKNOWN_CODE
    r = till.charge("A1", 50_000_01, WECHAT_PAID)
    assert r.exit_code == 5 and "limit" in r.reason
    assert lane.journal.recent() == []


def test_payment_type_without_platform_is_refused_clearly(lane, till):
    till.router._routing.pop("bestpay")
    r = till.charge("A1", 100, "511234567890123456")
    assert r.exit_code == 5 and r.reason == "no payment platform is configured for bestpay codes"


def test_unknown_keeps_lane_working_until_resolved(till, lane, clock):
    scan(till, "ORD:A1:1.00")
    r = scan(till, WECHAT_PASSWORD_OK)
    assert r.txn.state is State.UNKNOWN and r.exit_code == 4
    assert till.indicator.current is Signal.WORKING
    assert scan(till, "ORD:A2:1.00") is None  # the lane is busy with the customer's password
    import time
    while lane.journal.get(r.txn.txn_id).state is not State.PAID:
        lane.resolver.step()
        time.sleep(0.02)
    till.drain()
    assert till.indicator.current is Signal.PAID


def test_unresolved_for_too_long_frees_the_lane_with_a_fault(till, clock):
    scan(till, "ORD:A1:1.00")
    scan(till, WECHAT_SYSTEMERROR)
    clock.t += 0.3 + 15 + 0.1
    till.tick()
    assert till.indicator.current is Signal.FAULT
    clock.t += 3.1
    till.tick()
    assert till.indicator.current is Signal.READY


def test_cancel_card_then_order_cancels(till, lane):
    scan(till, "ORD:A1:1.00")
    paid = scan(till, WECHAT_PAID).txn
    scan(till, "CMD:CANCEL")
    assert till.indicator.current is Signal.AWAITING_CANCEL
    r = scan(till, "ORD:A1:1.00")
    assert r.txn.txn_id == paid.txn_id and r.txn.state is State.CANCELLED
    assert till.indicator.current is Signal.CANCELLED
    assert lane.router.by_name("sandbox").charges(WECHAT_PAID) == 0
    assert [e["state"] for e in lane.journal.events(paid.txn_id)] == ["pending", "paid", "cancel_requested", "cancelled"]


def test_cancel_of_unknown_order_changes_nothing(till, lane):
    scan(till, "ORD:A1:1.00")
    scan(till, WECHAT_PAID)
    before = journal_snapshot(lane.journal)
    scan(till, "CMD:CANCEL")
    assert scan(till, "ORD:B9:1.00").exit_code == 5
    assert till.indicator.current is Signal.UNKNOWN_CODE
    r = till.cancel("B9")
    assert r.exit_code == 5 and "no paid payment" in r.reason
    assert till.cancel("bad order!").exit_code == 5
    assert journal_snapshot(lane.journal) == before


def test_cancel_waits_then_times_out(till, clock):
    scan(till, "CMD:CANCEL")
    assert scan(till, WECHAT_PAID) is None
    assert till.indicator.current is Signal.UNKNOWN_CODE
    clock.t += 30.1
    till.tick()
    assert till.indicator.current is Signal.READY


def test_cancel_outside_reverse_window_refunds(till, lane):
    lane.router.by_name("sandbox").options = type(lane.router.by_name("sandbox").options)(reverse_window_s=1e-6)
    scan(till, "ORD:A1:1.00")
    scan(till, WECHAT_PAID)
    beats = []
    till._heartbeat = lambda: beats.append(1)  # as while run() runs under systemd
    r = till.cancel("A1")  # one platform call in the till's thread: the reverse, refused (too old)
    assert r.txn.state is State.CANCEL_REQUESTED and "refunding" in r.txn.retry_note and beats == [1]
    changed = lane.resolver.step()  # the resolver refunds at once
    assert [t.state for t in changed] == [State.REFUNDED]


@pytest.mark.parametrize("text", [
    "", "1" * 10_000, "1345678901\x0023456789", "１３４５６７８９０１２３４５６７８９", "134567890",
    "ORD:A1:-1.00", "ORD:A1:0.00", "ORD:A1:1.005", "ORD:A1:1e9", "ORD::1.00", "CMD:CANCELX", "\x1b[2J",
])
def test_bad_scans_signal_and_change_nothing(till, lane, text):
    scan(till, "ORD:A1:1.00")
    before = journal_snapshot(lane.journal)
    assert scan(till, text) is None
    assert till.indicator.current is Signal.UNKNOWN_CODE
    assert journal_snapshot(lane.journal) == before
    assert scan(till, WECHAT_PAID).txn.state is State.PAID  # the order survived the bad scan


def test_defective_scan_from_adapter(till, lane):
    before = journal_snapshot(lane.journal)
    assert till.handle_scan(Scan("", "evdev", defect="kernel dropped input events")) is None
    assert till.indicator.current is Signal.UNKNOWN_CODE
    assert journal_snapshot(lane.journal) == before


@pytest.mark.parametrize("order,amount,code,why", [
    ("A1", 100, "12345", "not a payment code"),
    ("A1", 100, "ORD:A1:1.00", "not a payment code"),
    ("A 1", 100, WECHAT_PAID, "order"),
    ("", 100, WECHAT_PAID, "order"),
    ("A" * 33, 100, WECHAT_PAID, "order"),
])
def test_charge_bad_input_refused_without_journal_change(till, lane, order, amount, code, why):
    before = journal_snapshot(lane.journal)
    r = till.charge(order, amount, code)
    assert r.exit_code == 5 and why in r.reason and r.txn is None
    assert journal_snapshot(lane.journal) == before


def test_expired_code_declines(till):
    r = till.charge("A1", 100, WECHAT_EXPIRED)
    assert r.txn.state is State.DECLINED and "AUTHCODEEXPIRE" in r.reason and r.exit_code == 3


def test_unreachable_platform_declines_without_offline(till, lane):
    r = till.charge("A1", 100, WECHAT_UNREACHABLE)
    assert r.txn.state is State.DECLINED and "offline acceptance is disabled" in r.reason


def test_unreachable_platform_defers_within_offline_limits(till, lane):
    till.offline = OfflinePolicy(enabled=True, max_amount_fen=200_00, max_count=2, max_total_fen=300_00)
    r = till.charge("A1", 100_00, WECHAT_UNREACHABLE)
    assert r.txn.state is State.DEFERRED and r.signal is Signal.OFFLINE_QUEUED and r.exit_code == 4
    assert till.charge("A2", 250_00, "134567890123450195").txn.state is State.DECLINED  # above per-payment limit
    assert till.charge("A3", 150_00, "134567890123450295").txn.state is State.DEFERRED
    assert till.charge("A4", 1_00, "134567890123450395").txn.state is State.DECLINED  # count limit
    assert till.cancel("A1").txn.state is State.CANCELLED
    assert lane.journal.get(r.txn.txn_id).auth_code is None


def test_scanner_fault_shows_until_cleared(till):
    till.post_fault("scanner unplugged")
    till.drain()
    assert till.indicator.current is Signal.FAULT
    till.post_fault(None)
    till.drain()
    assert till.indicator.current is Signal.READY


def test_a_failing_event_does_not_stop_the_lane(lane):
    import threading
    import time

    ind = Recorder()
    till = Till(journal=lane.journal, router=lane.router, classifier=lane.till.classifier, indicator=ind,
                store_id="S0001", terminal_id="L01", result_hold_s=0.05)
    real = till.classifier.classify
    calls = []

    def flaky(text):
        calls.append(text)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return real(text)

    till.classifier.classify = flaky
    stop = Stop()
    t = threading.Thread(target=till.run, args=(stop,))
    t.start()
    try:
        till.post_scan(Scan("ORD:A1:1.00", "test"))
        till.post_scan(Scan("ORD:A1:1.00", "test"))
        deadline = time.monotonic() + 5
        while ind.current is not Signal.AWAITING_CODE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(timeout=5)
    assert Signal.FAULT in ind.shown and len(calls) == 2


def test_code_refused_for_no_order_can_be_rescanned_at_once(till):
    assert scan(till, WECHAT_PAID) is None  # scanned before the order ticket
    assert till.indicator.current is Signal.UNKNOWN_CODE
    scan(till, "ORD:A1:1.00")
    assert scan(till, WECHAT_PAID).txn.state is State.PAID  # not mistaken for a stutter


def test_custom_order_pattern_with_an_unusable_order_id_is_refused(lane):
    from appliance.classify import Classifier, load_rules

    ind = Recorder()
    t = Till(journal=lane.journal, router=lane.router, indicator=ind, store_id="S0001", terminal_id="L01",
             classifier=Classifier(load_rules(None), r"O(?P<order>.{1,40})/(?P<amount>[0-9]+\.[0-9]{2})", {}))
    assert t.handle_scan(Scan("OA B/1.00", "test")) is None
    assert ind.current is Signal.UNKNOWN_CODE and lane.journal.recent() == []


def test_cancel_refused_after_resolving_shows_declined_not_paid(till, lane):
    import time
    from appliance.errors import ProviderUnavailable
    from appliance.payments import Outcome, Status

    sandbox = lane.router.by_name("sandbox")
    scan(till, "ORD:A1:1.00")
    scan(till, WECHAT_PAID)

    def down(no):
        raise ProviderUnavailable("connection refused")

    sandbox.reverse = down
    scan(till, "CMD:CANCEL")
    r = scan(till, "ORD:A1:1.00")
    assert r.txn.state is State.CANCEL_REQUESTED and till.indicator.current is Signal.WORKING
    sandbox.reverse = lambda no: Outcome(Status.DECLINED, "REVERSE_EXPIRE")
    sandbox.refund = lambda no, fen, total, rno: Outcome(Status.DECLINED, "TRADE_HAS_FINISHED")
    deadline = time.monotonic() + 5
    while lane.journal.get(r.txn.txn_id).state is State.CANCEL_REQUESTED:
        assert time.monotonic() < deadline
        lane.resolver.step()
        time.sleep(0.02)
    till.drain()
    assert till.indicator.current is Signal.DECLINED


# --- the register's charge command (ArmCommand) and health() ----------------------------------

def arm(till, order="A1", amount_fen=12_34):
    future = till.post_command(ArmCommand(order, amount_fen))
    till.drain()
    return future.result(timeout=0)


def test_arm_makes_an_idle_lane_wait_for_the_code_as_an_order_ticket_does(till, lane):
    before = journal_snapshot(lane.journal)
    r = arm(till)
    assert (r.state, r.txn, r.exit_code, r.signal) == ("awaiting_code", None, 0, Signal.AWAITING_CODE)
    assert r.as_dict() == {"txn_id": None, "out_trade_no": None, "order": "A1", "payment_type": None,
                           "platform": None, "amount": "12.34", "state": "awaiting_code", "reason": ""}
    assert till.indicator.current is Signal.AWAITING_CODE and till.health()["lane"] == "awaiting_code"
    assert journal_snapshot(lane.journal) == before  # nothing journaled until the code comes
    paid = scan(till, WECHAT_PAID).txn
    assert (paid.order, paid.amount_fen, paid.state) == ("A1", 12_34, State.PAID)


def test_an_armed_order_times_out_like_a_ticket(till, clock, lane):
    arm(till)
    clock.t += 60.1
    till.tick()
    assert till.indicator.current is Signal.READY and till.health()["lane"] == "ready"
    assert scan(till, WECHAT_PAID) is None and lane.journal.recent() == []


@pytest.mark.parametrize("busy,lane_state,why", [
    (["ORD:B1:1.00"], "awaiting_code", "mid order"),
    (["CMD:CANCEL"], "awaiting_cancel", "order ticket of a cancel"),
    (["ORD:B1:1.00", WECHAT_SYSTEMERROR], "resolving", "being resolved"),
])
def test_arm_is_refused_on_a_busy_lane_which_it_leaves_alone(till, lane, busy, lane_state, why):
    for text in busy:
        scan(till, text)
    before, shown = journal_snapshot(lane.journal), list(till.indicator.shown)
    r = arm(till)
    assert (r.state, r.txn, r.exit_code) == ("refused", None, 5) and why in r.reason
    assert r.as_dict()["order"] == "A1" and r.as_dict()["amount"] == "12.34"
    assert till.health()["lane"] == lane_state and till.indicator.shown == shown
    assert journal_snapshot(lane.journal) == before


@pytest.mark.parametrize("order,amount_fen,why", [
    ("A 1", 100, "must be 1-32 letters"),
    ("A" * 33, 100, "must be 1-32 letters"),
    ("A1", 50_000_01, "exceeds this lane's limit"),
    ("PAID1", 100, "already paid"),
])
def test_arm_is_refused_when_a_ticket_check_fails(till, lane, order, amount_fen, why):
    scan(till, "ORD:PAID1:1.00")
    scan(till, WECHAT_PAID)
    before = journal_snapshot(lane.journal)
    r = arm(till, order, amount_fen)
    assert (r.state, r.exit_code) == ("refused", 5) and why in r.reason
    assert till.health()["lane"] == "ready" and till.indicator.current is Signal.UNKNOWN_CODE
    assert journal_snapshot(lane.journal) == before


def test_health_is_a_copy_of_the_lane_state_and_its_faults(till):
    assert till.health() == {"lane": "ready", "faults": {}}
    till.post_fault("scanner unplugged: /dev/input/event3")
    till.drain()
    health = till.health()
    assert health == {"lane": "ready", "faults": {"scanner": "scanner unplugged: /dev/input/event3"}}
    health["faults"].clear()
    assert till.health()["faults"] == {"scanner": "scanner unplugged: /dev/input/event3"}
    till.post_fault(None)
    till.drain()
    assert till.health() == {"lane": "ready", "faults": {}} and till.indicator.current is Signal.READY


def test_a_fault_reason_never_holds_a_payment_code(till, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    till.post_fault(f"scanner read failed: /dev/ttyACM0 (bad frame {WECHAT_PAID}\x1b[2J)" + "x" * 500)
    till.drain()
    reason = till.health()["faults"]["scanner"]
    assert WECHAT_PAID not in reason and "1345**********6700" in reason
    assert reason.isprintable() and len(reason) < 260
    assert all(WECHAT_PAID not in r.getMessage() for r in caplog.records)


def lane_events(journal):
    """The lane events queued in the outbox, each checked against its published schema."""
    from appliance import schemas

    rows = [r for r in journal.claim(limit=10_000) if r.kind == "lane"]
    return [(d["event"], d["detail"]) for d in (schemas.check("lane", r.payload) for r in rows)]


def test_each_fault_raised_or_cleared_is_one_lane_event_for_head_office(till, lane):
    till.post_fault("scanner unplugged: /dev/input/event3")
    till.post_fault("scanner unplugged: /dev/input/event3")  # the same fault again: no news
    till.post_fault(f"scanner read failed: {WECHAT_PAID}")
    till.post_fault(None)
    till.post_fault(None)
    till.drain()
    assert lane_events(lane.journal) == [
        ("fault", {"source": "scanner", "reason": "scanner unplugged: /dev/input/event3"}),
        ("fault", {"source": "scanner", "reason": "scanner read failed: 1345**********6700"}),
        ("fault_cleared", {"source": "scanner", "reason": "scanner read failed: 1345**********6700"})]


def test_health_hooks_hear_of_every_lane_state_and_fault_change_once(till):
    """What a status publisher is told instead of polling health()."""
    seen = []
    till.on_health_change(lambda: seen.append(till.health()))
    scan(till, "ORD:A1:1.00")
    scan(till, "ORD:A2:2.00")  # a new order, the same lane state: nothing to tell
    till.post_fault("scanner unplugged")
    till.drain()
    assert [h["lane"] for h in seen] == ["awaiting_code", "awaiting_code"]
    assert seen[0]["faults"] == {} and set(seen[1]["faults"]) == {"scanner"}


# --- the run loop, on the real clock -------------------------------------------------------------


def _run_till(lane, **kw):
    stop = Stop()
    t = threading.Thread(target=lane.till.run, args=(stop,), kwargs=kw, daemon=True)
    t.start()
    return stop, t


def _counting_ticks(lane) -> list[float]:
    ticks: list[float] = []
    real_tick = lane.till.tick
    lane.till.tick = lambda: (ticks.append(time.monotonic()), real_tick())
    return ticks


def test_the_idle_loop_sleeps_and_an_order_timeout_still_fires_on_time(lane):
    """The loop sleeps until something is due: idle (its journal watched, as the service has it),
    it does not tick; an order ticket's timeout fires when due (not a poll later), and the lane
    shows ready again."""
    ticks = _counting_ticks(lane)
    lane.till.order_timeout_s = 0.5
    stop, t = _run_till(lane, journal_watched=True)
    try:
        assert wait_for(lambda: ticks, every_s=0.005)
        time.sleep(1.0)
        assert len(ticks) == 1, "the idle till woke up with nothing due"
        lane.till.post_scan(Scan("ORD:A1:1.00", "test"))
        assert wait_for(lambda: lane.indicator.current is Signal.AWAITING_CODE, every_s=0.005)
        armed = time.monotonic()
        assert wait_for(lambda: lane.indicator.current is Signal.READY, every_s=0.005)
        assert 0.5 - 0.05 <= time.monotonic() - armed < 0.5 + 1.0
        assert len(ticks) <= 5, ticks  # the start, the scan, the timeout (and a late wake or two)
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


def test_the_watchdog_is_pinged_on_time_by_a_sleeping_loop(lane):
    beats = []
    stop, t = _run_till(lane, heartbeat=lambda: beats.append(time.monotonic()), heartbeat_every_s=0.2)
    try:
        assert wait_for(lambda: len(beats) >= 6, every_s=0.005)
    finally:
        stop.set()
        t.join(5)
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert all(0.2 - 0.02 <= g < 0.2 + 1.0 for g in gaps), gaps


def test_a_stop_wakes_the_sleeping_loop_at_once(lane):
    stop, t = _run_till(lane)
    time.sleep(0.2)
    t0 = time.monotonic()
    stop.set()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 1.0


def test_a_watched_idle_lane_shows_a_lost_journal_at_once_without_a_timer(lane):
    """As in the service: the journal's FileWatch posts a check; the lane shows FAULT at once,
    although its own timer for the check would wait JOURNAL_WATCHED_CHECK_S."""
    ticks = _counting_ticks(lane)
    watch = FileWatch(lane.journal.path, lane.till.post_journal_check)
    assert watch.start()
    stop, t = _run_till(lane, journal_watched=True)
    try:
        assert wait_for(lambda: lane.indicator.current is Signal.READY, every_s=0.005)
        time.sleep(0.3)
        lane.journal.path.unlink()
        lost = time.monotonic()
        assert wait_for(lambda: lane.indicator.current is Signal.FAULT, every_s=0.005)
        assert time.monotonic() - lost < 1.0 + 2.0  # within a second, and a loaded machine's margin
        assert len(ticks) <= 4, ticks
    finally:
        stop.set()
        watch.close()
        t.join(5)

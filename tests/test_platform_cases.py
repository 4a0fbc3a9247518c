"""Every uncertain answer driven to an end, for every adapter kind, through the real till and resolver.

Each case runs the lane (till, journal, resolver, router) against the kind's simulator over
loopback HTTP. Requests are signed, answers are verified, and the simulator keeps the books
(appliance/simulators/ledger.py). Its code table chooses the scenario: a code ending 90 is
declined for balance, 94 is a system error after the money was taken, and so on. The assertions
hold the lane's journal against the platform's ledger: what the lane believes, and how often the
customer was charged.

A kind is tested here as soon as its simulator exists (`appliance.simulators.available()`).
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
import tomllib

import pytest

from appliance import service, simulators
from appliance.config import from_dict
from appliance.indicator import make_indicator
from appliance.journal import OPEN_STATES, State
from appliance.payments import PayRequest, Status
from appliance.simulators.ledger import Ledger
from conftest import ALL_TYPES, appliance_cmd, lane_dict, resolve, subprocess_env, write_config

pytestmark = pytest.mark.integration

KINDS = simulators.available()

#: Fast resolution and short time limits, so that a case takes a second, not the official minute.
FAST = {"first_query_after_s": 0.0, "query_every_s": 0.05, "reverse_after_s": 0.4, "retry_every_s": 0.05,
        "connect_timeout_s": 0.5, "read_timeout_s": 0.5, "backup_base_urls": []}
#: How late a slow answer (a code ending 97) comes: beyond the read timeout above.
SLOW_S = 1.5


def code(kind: str, tail: str, serial: int = 0) -> str:
    """A payment code in the format of the kind's wallet (Alipay's for alipay, else WeChat's) with
    the scenario `tail` (the simulator's table)."""
    prefix = "28" if kind == "alipay" else "13"
    return f"{prefix}{serial:014d}{tail}"


class Lane:
    """A lane on one state directory, against one simulator; `restart()` is a service restart."""

    def __init__(self, sim: simulators.Simulator, state_dir):
        providers = {"p": {**sim.provider_options(), **FAST}}
        self.cfg = from_dict(lane_dict(state_dir, providers=providers, routing={t: "p" for t in ALL_TYPES}))
        self.sim = sim
        self.ledger: Ledger = sim.ledger
        self.call_limit_s = self.cfg.providers["p"].options.call_limit_s  # the adapter's stated limit
        self._build()

    def _build(self):
        self.lane = service.build(self.cfg, indicator=make_indicator(self.cfg.indicator))
        self.till, self.journal, self.resolver = self.lane.till, self.lane.journal, self.lane.resolver
        self.provider = self.lane.router.by_name("p")

    def restart(self):
        self.lane.close()
        self._build()

    def resolve(self, txn_id: int):
        return resolve(self, txn_id)

    def trade(self, txn):
        return self.ledger.trades[txn.out_trade_no]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def lane(kind, tmp_path):
    sim = simulators.simulator_class(kind)(tmp_path / "keys", Ledger(slow_s=SLOW_S)).start()
    lane = Lane(sim, tmp_path / "state")
    yield lane
    lane.lane.close()
    sim.stop()


def test_paid_at_once_carries_the_platform_id_and_funding_source(lane, kind):
    r = lane.till.charge("A1", 1234, code(kind, "00"))
    assert r.txn.state is State.PAID, r.reason
    trade = lane.trade(r.txn)
    assert trade.amount_fen == 1234 and trade.charges == 1
    assert r.txn.platform_txn_id and r.txn.funding_source


@pytest.mark.parametrize("tail", ["90", "91", "82"], ids=["insufficient-balance", "expired-code", "invalid-code"])
def test_each_decline_reason_reaches_the_cashier_as_declined(lane, kind, tail):
    r = lane.till.charge("A1", 1234, code(kind, tail))
    assert r.txn.state is State.DECLINED, r.reason
    assert r.reason and lane.trade(r.txn).charges == 0


def test_user_paying_is_polled_until_paid(lane, kind):
    r = lane.till.charge("A1", 1234, code(kind, "92"))
    assert r.txn.state is State.UNKNOWN, r.reason
    assert lane.resolve(r.txn.txn_id).state is State.PAID
    assert lane.trade(r.txn).charges == 1


def test_user_paying_that_never_finishes_is_reversed(lane, kind):
    c = code(kind, "93")
    r = lane.till.charge("A1", 1234, c)
    assert r.txn.state is State.UNKNOWN, r.reason
    assert lane.resolve(r.txn.txn_id).state is State.REVERSED
    assert lane.trade(r.txn).state == "CLOSED" and lane.ledger.kept(c) == 0


@pytest.mark.parametrize("tail", ["94", "96", "97"], ids=["system-error", "connection-dropped", "slower-than-read"])
def test_money_taken_without_a_clear_answer_is_found_by_query_and_charged_once(lane, kind, tail):
    c = code(kind, tail)
    t0 = time.monotonic()
    r = lane.till.charge("A1", 1234, c)
    took = time.monotonic() - t0
    assert r.txn.state is State.UNKNOWN, r.reason
    assert took < lane.call_limit_s + 0.5  # the cashier is answered within the stated limit
    assert lane.resolve(r.txn.txn_id).state is State.PAID
    assert lane.trade(r.txn).charges == 1 and lane.ledger.kept(c) == 1


def test_an_answer_whose_signature_does_not_verify_is_never_trusted(lane, kind, caplog):
    caplog.set_level(logging.ERROR)
    r = lane.till.charge("A1", 1234, code(kind, "80"))
    assert r.txn.state is State.UNKNOWN, r.reason  # the forged answer said paid: not believed
    assert lane.resolve(r.txn.txn_id).state is State.PAID  # the signed query decides
    security = [rec for rec in caplog.records if "SECURITY" in rec.getMessage()]
    assert len(security) == 1, [rec.getMessage() for rec in security]
    assert r.txn.out_trade_no in security[0].getMessage()


def test_a_reverse_that_must_be_retried_is_retried_across_a_restart(lane, kind):
    c = code(kind, "81")
    r = lane.till.charge("A1", 1234, c)
    assert r.txn.state is State.UNKNOWN, r.reason
    deadline = time.monotonic() + 10
    while lane.trade(r.txn).reverses < 1 and time.monotonic() < deadline:
        lane.resolver.step()
        time.sleep(0.02)
    assert lane.trade(r.txn).reverses == 1  # asked to retry: the payment stays open
    assert lane.journal.get(r.txn.txn_id).state is State.UNKNOWN
    lane.restart()
    assert lane.resolve(r.txn.txn_id).state is State.REVERSED
    assert lane.trade(r.txn).reverses == 3 and lane.ledger.kept(c) == 0


def test_a_retry_of_the_same_attempt_never_charges_twice(lane, kind):
    req = PayRequest("S0001_L01_R1", 1234, code(kind, "00"), "Order R1", "S0001", "L01")
    first = lane.provider.pay(req)
    again = lane.provider.pay(req)
    assert first.status is Status.PAID
    assert again.status in (Status.PAID, Status.UNKNOWN)  # what happened, or "query it"
    assert lane.provider.query(req.out_trade_no).status is Status.PAID
    assert lane.ledger.charges(req.out_trade_no) == 1


def test_a_payment_code_is_single_use(lane, kind):
    c = code(kind, "00")
    first = lane.provider.pay(PayRequest("S0001_L01_U1", 1234, c, "Order U1", "S0001", "L01"))
    second = lane.provider.pay(PayRequest("S0001_L01_U2", 1234, c, "Order U2", "S0001", "L01"))
    assert first.status is Status.PAID
    assert second.status is Status.DECLINED
    assert lane.ledger.kept(c) == 1


def test_an_unreachable_platform_charges_nothing_and_the_cashier_hears_at_once(lane, kind):
    lane.sim.stop()
    t0 = time.monotonic()
    r = lane.till.charge("A1", 1234, code(kind, "00"))
    assert r.txn.state is State.DECLINED and "unreachable" in r.reason
    assert time.monotonic() - t0 < lane.call_limit_s
    lane.sim.start()
    assert not lane.ledger.trades


def test_the_platform_unreachable_through_resolution_is_finished_once_it_is_back(lane, kind):
    c = code(kind, "96")
    r = lane.till.charge("A1", 1234, c)
    assert r.txn.state is State.UNKNOWN, r.reason
    lane.sim.stop()
    deadline = time.monotonic() + 1.0  # past reverse_after_s: queries and reverses all fail
    while time.monotonic() < deadline:
        lane.resolver.step()
        time.sleep(0.02)
    assert lane.journal.get(r.txn.txn_id).state is State.UNKNOWN
    lane.sim.start()
    assert lane.resolve(r.txn.txn_id).state is State.PAID
    assert lane.trade(r.txn).charges == 1 and lane.ledger.kept(c) == 1


def test_cancel_inside_the_reverse_window_gives_the_money_back(lane, kind):
    c = code(kind, "00")
    assert lane.till.charge("A1", 1234, c).txn.state is State.PAID
    r = lane.till.cancel("A1")
    end = r.txn if r.txn.state not in OPEN_STATES else lane.resolve(r.txn.txn_id)
    assert end.state in (State.CANCELLED, State.REFUNDED), r.reason
    assert lane.ledger.kept(c) == 0


@pytest.mark.parametrize("tail", ["00", "98"], ids=["refund-at-once", "refund-processing-first"])
def test_cancel_outside_the_reverse_window_refunds(lane, kind, tail):
    c = code(kind, tail)
    lane.ledger.reverse_window_s = 0.0  # every paid trade is too old to reverse
    paid = lane.till.charge("A1", 1234, c).txn
    assert paid.state is State.PAID
    time.sleep(0.01)
    r = lane.till.cancel("A1")
    assert r.txn.state in (State.CANCEL_REQUESTED, State.REFUNDED), r.reason
    assert lane.resolve(r.txn.txn_id).state is State.REFUNDED
    assert lane.ledger.kept(c) == 0
    refunds = [f for f in lane.ledger.refunds.values() if f.out_trade_no == paid.out_trade_no]
    assert len(refunds) == 1 and refunds[0].amount_fen == 1234 and refunds[0].state == "SUCCESS"
    if tail == "98":
        assert refunds[0].queries >= 2  # processing first: the resolver asked until it succeeded


def test_appliance_simulate_serves_a_table_that_a_lane_pays_through(kind, tmp_path):
    """The technician's bench: `appliance simulate KIND` prints the [providers] table; a lane
    configured with it passes check-config and charges over real HTTP, as separate processes."""
    sim = subprocess.Popen(appliance_cmd() + ["simulate", kind, "--port", "0", "--keys", str(tmp_path / "keys")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        lines = []
        while (line := sim.stdout.readline()) not in ("\n", ""):  # an empty line ends the table; "" is EOF
            lines.append(line)
        table = tomllib.loads("".join(lines))["providers"][kind]
        doc = lane_dict(tmp_path / "state", providers={kind: table}, routing={t: kind for t in ALL_TYPES})
        config = write_config(tmp_path / "appliance.toml", doc)
        check = subprocess.run(appliance_cmd() + ["check-config", "--config", str(config)], capture_output=True,
                               text=True, env=subprocess_env(), timeout=60)
        assert check.returncode == 0, check.stderr
        charge = subprocess.run(appliance_cmd() + ["charge", "--config", str(config), "--order", "A1",
                                                   "--amount", "12.34", "--code", code(kind, "00"), "--json"],
                                capture_output=True, text=True, env=subprocess_env(), timeout=60)
        assert charge.returncode == 0, charge.stdout + charge.stderr
        assert json.loads(charge.stdout)["state"] == "paid"
    finally:
        sim.send_signal(signal.SIGTERM)
        _, err = sim.communicate(timeout=10)  # reads and closes the pipes (an open one is a ResourceWarning)
        assert sim.returncode == 0, err

"""Reconciliation end to end through the real adapters: WeChat Pay v3, WeChat Pay v2 and Alipay against
their loopback simulators, each serving the bill of a day from its ledger, and head office's
database filled with the events a lane sends for the same payments (tests/reconcile_kit.py).

A day of payments, refunds, reversals and a declined payment reconciles to zero differences; each
kind of difference is caught with its order number; not-yet, no-bill and damaged bills behave as
docs/hq.md says; the fees equal the bill's own summary; `appliance hq reconcile` does all three
platforms of a day in one run and stores the result."""

from __future__ import annotations

import json
import subprocess

import pytest

from appliance.hq import reconcile
from appliance.hq.reconcile import DayState
from appliance.hq.store import Store
from appliance.payments.bills import day_start
from appliance.simulators.alipay import AlipaySimulator
from appliance.simulators.ledger import Ledger
from appliance.simulators.wechat_v2 import WechatV2Simulator
from appliance.simulators.wechat_v3 import WechatV3Simulator
from conftest import appliance_cmd, subprocess_env
from reconcile_kit import DAY, NEXT_MORNING, Clock, Shop, adapter

#: kind -> (the simulator, the first two digits of its payment codes)
PLATFORMS = {"wechat_v3": (WechatV3Simulator, "13"), "wechat_v2": (WechatV2Simulator, "13"),
             "alipay": (AlipaySimulator, "28")}


@pytest.fixture(params=PLATFORMS, ids=PLATFORMS)
def platform(request, tmp_path):
    """(simulator, adapter, shop, store, clock) for one platform, its ledger on a clock at noon of DAY."""
    cls, prefix = PLATFORMS[request.param]
    clock = Clock()
    sim = cls(tmp_path / "keys", Ledger(clock=clock, slow_s=1.0)).start()
    provider = adapter(sim, "pf", tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'hq.sqlite'}")
    yield sim, provider, Shop(provider, store, clock, code_prefix=prefix), store, clock
    provider.close()
    store.close()
    sim.stop()


def a_day(shop: Shop) -> dict[str, str]:
    """A day at one lane: paid, refunded, refunded slowly (processing first), cancelled by a reversal,
    charged with the answer lost then reversed, given up at the password then reversed, declined."""
    day = {"paid": shop.pay(fen=1234)}
    day["refunded"] = shop.pay(fen=2000)
    shop.cancel(day["refunded"], refund=True)
    day["refunded_slowly"] = shop.pay("98", fen=300)
    shop.cancel(day["refunded_slowly"], refund=True)
    day["cancelled"] = shop.pay(fen=500)
    shop.cancel(day["cancelled"])
    day["lost_then_reversed"] = shop.pay("96", fen=700)
    shop.reverse_unknown(day["lost_then_reversed"])
    day["gave_up_then_reversed"] = shop.pay("93", fen=800)
    shop.reverse_unknown(day["gave_up_then_reversed"])
    day["declined"] = shop.pay("90", fen=900)
    assert shop.states[day["declined"]] == "declined" and shop.states[day["lost_then_reversed"]] == "reversed"
    return day


def test_a_day_reconciles_to_zero_differences_and_the_fees_add_up(platform):
    sim, provider, shop, store, clock = platform
    a_day(shop)
    clock.t = NEXT_MORNING
    r = reconcile.reconcile(store, provider, DAY)
    assert (r.state, r.method, r.differences) == (DayState.FETCHED, "bill", [])
    assert r.matched == {"payments": 5, "paid_fen": 1234 + 2000 + 300 + 500 + 700,
                         "returns": 4, "returned_fen": 2000 + 300 + 500 + 700}
    assert len(r.lines) == 9  # 5 payments, 2 refunds, 2 reversals that gave money back
    # the bill's own summary states the fees; they equal the lines' sum, and the ledger's rate
    fee = sim.ledger.fee_fen
    expected = sum(fee(f) for f in (1234, 2000, 300, 500, 700)) - sum(fee(f) for f in (2000, 300, 500, 700))
    assert r.stated.fee_fen == r.fee_fen and abs(r.fee_fen) == expected
    assert reconcile.save(store, r, NEXT_MORNING)
    (row,) = reconcile.stored(store, DAY)
    assert (row["state"], row["differences"], row["summary"]["fee_fen"]) == ("fetched", [], r.fee_fen)


def test_each_kind_of_difference_is_caught_with_its_order_number(platform):
    sim, provider, shop, store, clock = platform
    day = a_day(shop)
    stranger = shop.pay(fen=4200, record=False)  # money taken, head office never told
    moves = sim.ledger.movements
    moves.remove(next(m for m in moves if m.out_trade_no == day["paid"]))  # the bill misses an order
    next(m for m in moves if m.out_trade_no == day["cancelled"] and m.kind == "payment").amount_fen = 499
    moves.remove(next(m for m in moves if m.out_trade_no == day["refunded"] and m.kind == "refund"))
    clock.t = NEXT_MORNING
    r = reconcile.reconcile(store, provider, DAY)
    assert r.state is DayState.FETCHED
    found = {(str(d.kind), d.out_trade_no, d.movement) for d in r.differences}
    assert found == {("not_on_bill", day["paid"], "payment"),  # a bill missing an order
                     ("amount", day["cancelled"], "payment"),  # an amount that differs
                     ("not_at_hq", stranger, "payment"),  # a line head office never saw
                     ("not_on_bill", day["refunded"], "refund")}  # head office has it, the bill lacks it
    amount = next(d for d in r.differences if str(d.kind) == "amount")
    assert (amount.hq_amount_fen, amount.bill_amount_fen, amount.store_id, amount.terminal_id) == \
        (500, 499, "S0001", "L01")
    assert reconcile.exit_code([r]) == reconcile.EXIT_DIFFERENCES


def test_paid_here_refunded_there_is_a_state_difference(platform):
    sim, provider, shop, store, clock = platform
    paid = shop.pay(fen=1500)
    sim.ledger.refund(paid, "portal-1", 1500)  # refunded in the merchant portal, not by a lane
    clock.t = NEXT_MORNING
    r = reconcile.reconcile(store, provider, DAY)
    assert [(str(d.kind), d.out_trade_no, d.hq_state) for d in r.differences] == [("state", paid, "paid")]


def test_the_next_morning_before_the_bill_is_made_it_is_not_yet_and_tried_again(platform):
    sim, provider, shop, store, clock = platform
    shop.pay()
    clock.t = day_start(DAY) + 86_400 + 8 * 3600  # 08:00 Beijing: not generated yet
    (r,) = reconcile.run_day(store, {"pf": provider}, DAY, now=clock.t, retry_every_s=1800, retry_for_days=3)
    assert (r.state, r.differences) == (DayState.NOT_YET, [])
    assert r.next_try_at == day_start(DAY) + 86_400 + 10 * 3600  # not before 10:00
    assert reconcile.exit_code([r]) == reconcile.EXIT_LATER
    assert reconcile.due(store, ["pf"], clock.t, 1) == []  # yesterday only: tried, not due again yet
    assert reconcile.due(store, ["pf"], r.next_try_at, 1) == [(DAY, "pf")]


def test_a_bill_whose_summary_disagrees_with_its_lines_is_an_error_naming_platform_and_day(platform):
    sim, provider, shop, store, clock = platform
    shop.pay()
    sim.bill_fault = "summary"
    clock.t = NEXT_MORNING
    r = reconcile.reconcile(store, provider, DAY)
    assert (r.state, r.differences, r.lines) == (DayState.ERROR, [], ())
    assert r.error.startswith("platform pf: bill of 2026-11-20: ") and "summary" in r.error


def test_a_quiet_day(platform):
    """WeChat says there is no bill (no transactions); Alipay cannot tell that from a late bill."""
    sim, provider, shop, store, clock = platform
    clock.t = NEXT_MORNING
    r = reconcile.reconcile(store, provider, DAY)
    expected = DayState.NOT_YET if provider.kind == "alipay" else DayState.NO_TRANSACTIONS
    assert (r.state, r.differences) == (expected, [])


def test_a_wechat_v3_download_whose_hash_differs_is_an_error_never_an_empty_match(tmp_path):
    clock = Clock()
    with WechatV3Simulator(tmp_path / "keys", Ledger(clock=clock)) as sim:
        provider = adapter(sim, "wx", tmp_path)
        store = Store(f"sqlite:///{tmp_path / 'hq.sqlite'}")
        try:
            shop = Shop(provider, store, clock)
            shop.pay()
            sim.bill_fault = "hash"
            clock.t = NEXT_MORNING
            r = reconcile.reconcile(store, provider, DAY)
            assert (r.state, r.lines, r.differences) == (DayState.ERROR, (), [])
            assert r.error.startswith("platform wx: bill of 2026-11-20: ") and "SHA-1" in r.error
            reconcile.save(store, r, NEXT_MORNING)
            sim.bill_fault = None  # the next try gets a good download: the day is reconciled
            r = reconcile.reconcile(store, provider, DAY)
            assert (r.state, r.differences) == (DayState.FETCHED, [])
        finally:
            provider.close()
            store.close()


def test_the_command_reconciles_every_platform_of_a_day_and_stores_it(tmp_path):
    clock = Clock()
    sims = {name: cls(tmp_path / name, Ledger(clock=clock)).start() for name, (cls, _) in PLATFORMS.items()}
    db = f"sqlite:///{tmp_path / 'hq.sqlite'}"
    store = Store(db)
    try:
        paid = {}
        for name, sim in sims.items():
            provider = adapter(sim, name, tmp_path)
            try:
                paid[name] = a_day(Shop(provider, store, clock, code_prefix=PLATFORMS[name][1]))
            finally:
                provider.close()
        sims["alipay"].ledger.movements.pop(0)  # one difference, on one platform
        clock.t = NEXT_MORNING
        cfg = tmp_path / "hq.toml"
        cfg.write_text("".join(f"[providers.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                                                                  sim.provider_options().items())
                               for name, sim in sims.items()))
        r = subprocess.run([*appliance_cmd(), "hq", "reconcile", "--config", str(cfg), "--db", db, "--date",
                            DAY.isoformat(), "--json"], capture_output=True, text=True, env=subprocess_env(),
                           timeout=120)
        assert r.returncode == reconcile.EXIT_DIFFERENCES, r.stderr
        doc = json.loads(r.stdout)
        states = {x["platform"]: (x["state"], [(d["kind"], d["out_trade_no"]) for d in x["differences"]])
                  for x in doc["results"]}
        assert states == {"alipay": ("fetched", [("not_on_bill", paid["alipay"]["paid"])]),
                          "wechat_v2": ("fetched", []), "wechat_v3": ("fetched", [])}
        assert doc["fees"]["total_fen"] == sum(x["fee_fen"] for x in doc["results"])
        assert [(x["platform"], x["state"]) for x in reconcile.stored(store, DAY)] == \
            [("alipay", "fetched"), ("wechat_v2", "fetched"), ("wechat_v3", "fetched")]
    finally:
        store.close()
        for sim in sims.values():
            sim.stop()

"""Reconciliation at the end of the real pipeline: an `appliance run` lane (stdin scanner) takes payments
through the WeChat Pay v2 and Alipay simulators, its journal's events travel through a real mosquitto to
`appliance hq ingest`, and head office's reconciliation of the day, through the same real adapters and
the bills the simulators write from their ledgers, finds every payment and no difference.

The lane pays on the real clock; for the bill, the simulators' ledgers are moved to 10:00 Beijing the
next day (a day's bill exists only then), and `reconcile` is given that time as its own."""

import signal
import subprocess

import pytest

from appliance.hq import reconcile
from appliance.hq.reconcile import DayState
from appliance.hq.store import Store
from appliance.payments.bills import beijing_day, day_start
from appliance.simulators.alipay import AlipaySimulator
from appliance.simulators.ledger import Ledger
from appliance.simulators.wechat_v2 import WechatV2Simulator
from conftest import appliance_cmd, lane_dict, subprocess_env, write_config
from reconcile_kit import FAST, adapter
from test_hq_browser import Ingest
from test_hq_end_to_end import _journal, _settled, _wait

pytestmark = pytest.mark.integration

LANE = ("S001", "01")
#: The cashier's day: (scans, what the lane journals). Codes: 13... WeChat, 28... Alipay; the last two
#: digits pick the simulators' outcome (00 paid, 90 declined).
ACTIONS = [(("ORD:R1:12.50", "130000000000000100"), "paid"),
           (("ORD:R2:3.00", "280000000000000290"), "declined"),
           (("ORD:R3:8.00", "280000000000000300"), "paid"),
           (("ORD:R4:7.00", "130000000000000400"), "paid"),
           (("CMD:CANCEL", "ORD:R4:7.00"), "cancelled")]


def test_a_lanes_day_through_the_broker_reconciles_with_both_platforms_bills(tmp_path, broker):
    sims = {"wx": WechatV2Simulator(tmp_path / "wx", Ledger()).start(),
            "ali": AlipaySimulator(tmp_path / "ali", Ledger()).start()}
    db = f"sqlite:///{tmp_path / 'hq.sqlite'}"
    hq = Ingest(broker, db)  # ready once subscribed: a share group without a session drops messages
    state = tmp_path / "lane" / "state"
    lane = None
    try:
        doc = lane_dict(state, terminal={"store_id": LANE[0], "terminal_id": LANE[1]}, scanner={"kind": "stdin"},
                        indicator={"kind": "log"}, mqtt=broker.mqtt_config(*LANE),
                        providers={name: {**sim.provider_options(), **FAST} for name, sim in sims.items()},
                        routing={"wechat": "wx", "alipay": "ali"})
        conf = write_config(tmp_path / "lane.toml", doc)
        with open(tmp_path / "lane.log", "wb") as err:
            lane = subprocess.Popen(appliance_cmd() + ["run", "--config", str(conf)], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=err, env=subprocess_env())
        for k, (scans, _) in enumerate(ACTIONS, start=1):
            lane.stdin.write("".join(t + "\n" for t in scans).encode())
            lane.stdin.flush()
            _wait(lambda: _settled(state, *LANE, k), 30, f"action {k}",  # noqa: B023 (called at once)
                  lambda: (tmp_path / "lane.log").read_text()[-2000:])
        j = _journal(state, *LANE)
        journaled = {t.order: t.state for t in j.recent()}
        last_seq = j.outbox_state().last_seq
        j.close()
        assert journaled == {"R1": "paid", "R2": "declined", "R3": "paid", "R4": "cancelled"}

        def stored() -> int:
            s = Store(db, create=False)
            try:
                return s.Event.select().where(s.Event.store_id == LANE[0]).count()
            finally:
                s.close()
        _wait(lambda: stored() >= last_seq, 30, "every event at head office", lambda: (stored(), last_seq))
        lane.send_signal(signal.SIGTERM)
        assert lane.wait(15) == 0

        moved = [m.at for sim in sims.values() for m in sim.ledger.movements]
        day = beijing_day(min(moved))
        assert {beijing_day(t) for t in moved} == {day}, "the day crossed midnight in Beijing: run again"
        morning = day_start(day) + 86_400 + 10 * 3600
        store = Store(db)
        adapters = {}
        try:
            for name, sim in sims.items():
                sim.ledger.clock = lambda: morning
                adapters[name] = adapter(sim, name, tmp_path)
            results = {r.platform: r for r in reconcile.run_day(store, adapters, day, now=morning, retry_every_s=1800,
                                                                 retry_for_days=3)}
        finally:
            for p in adapters.values():
                p.close()
            store.close()
        wx, ali = results["wx"], results["ali"]
        assert (wx.state, wx.differences, ali.state, ali.differences) == (DayState.FETCHED, [], DayState.FETCHED, [])
        assert wx.matched == {"payments": 2, "paid_fen": 1250 + 700, "returns": 1, "returned_fen": 700}
        assert ali.matched == {"payments": 1, "paid_fen": 800, "returns": 0, "returned_fen": 0}
        assert wx.stated.fee_fen == wx.fee_fen and ali.stated.fee_fen == ali.fee_fen
    finally:
        if lane is not None:
            lane.kill()
            lane.stdin.close()
            lane.wait(15)
        hq.stop()
        for sim in sims.values():
            sim.stop()

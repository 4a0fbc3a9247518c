"""The uplink (appliance/uplink/): the port's parts (backoff, outage logging), the `none` adapter,
and the service's wiring."""

from __future__ import annotations

import logging
import random

from conftest import lane_dict

from appliance.config import from_dict
from appliance.uplink import Backoff, Outage, make_uplink


# --- pure parts -------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_doubling_to_the_ceiling_and_resets():
    b = Backoff(1.0, 60.0, random.Random(7))
    for n in range(12):
        delay = b.next()
        assert 1.0 <= delay <= min(60.0, 2.0 ** n)
    assert {Backoff(1.0, 60.0, random.Random(s)).next() for s in range(5)} == {1.0}  # the first is min_s
    b.reset()
    assert b.next() == 1.0
    late = [b.next() for _ in range(40)][-20:]
    assert max(late) <= 60.0 and len(set(late)) == 20  # jittered, never the same second twice


def test_outage_logs_its_start_once_and_its_end_once(caplog):
    now = [100.0]
    o = Outage(logging.getLogger("test.outage"), "uplink", lambda: now[0])
    with caplog.at_level(logging.DEBUG, "test.outage"):
        assert o.begin("refused") and not o.begin("refused again") and not o.begin("timeout")
        now[0] += 12.5
        assert o.end("backlog 3") and not o.end()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert lines == [("WARNING", "uplink down: refused"), ("INFO", "uplink back after 12.5 s; backlog 3")]
    assert o.reason == "timeout" and not o.active


def test_none_uplink_sends_nothing_and_reports_the_backlog(tmp_path, lane_journal):
    for i in range(3):
        lane_journal.lane_event("fault", {"source": "test", "reason": f"#{i}"})
    u = make_uplink(from_dict(lane_dict(tmp_path / "state")), lane_journal)
    u.start()
    u.sync_now()
    state = u.state()
    u.close()
    assert state == {"kind": "none", "connected": False, "connected_since": None, "last_error": None,
                     "backlog": 3, "oldest_queued_seq": 1, "oldest_queued_at": state["oldest_queued_at"],
                     "last_seq": 3, "last_ack_seq": None, "last_ack_at": None}

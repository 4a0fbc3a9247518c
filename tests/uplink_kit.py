"""What the uplink's tests share: the test lane's ids and topics, head office's subscriber, and
quick ways to fill a real journal's outbox. The fixtures (`lane_broker`, `lane_journal`, `uplinks`)
are in conftest.py."""

from __future__ import annotations

import json

from broker import HQ, Peer
from conftest import lane_dict, wait_for

from appliance.config import from_dict
from appliance.journal import Journal, State

STORE, TERMINAL = "S0001", "L01"  # conftest.lane_dict's lane
BASE = f"lanes/{STORE}/{TERMINAL}"
#: Fast reconnects for tests (the smallest delays the config allows).
FAST = {"reconnect_min_s": 0.1, "reconnect_max_s": 1.0}


def lane_mqtt(broker, **mqtt) -> dict:
    """The lane's `[mqtt]` section for `broker`, reconnecting fast, with `mqtt` on top."""
    return broker.mqtt_config(STORE, TERMINAL) | FAST | mqtt


def lane_cfg(tmp_path, broker, **mqtt):
    return from_dict(lane_dict(tmp_path / "state", mqtt=lane_mqtt(broker, **mqtt)))


def hq_peer(broker, client_id: str = "hq-test", subscribe: bool = True, **options) -> Peer:
    """Head office's subscriber to every topic of the lane, on a persistent session (connecting
    again with the same client id resumes it, subscription and queued messages included)."""
    peer = Peer(broker, HQ, client_id=client_id, clean_start=False, session_expiry_s=600, **options)
    assert peer.connect() == 0, peer.connack
    if subscribe:
        peer.subscribe(f"{BASE}/#")
    return peer


def payments(journal: Journal, n: int, *, start: int = 0) -> None:
    """n payments, each opened (pending) and paid: 2n txn events."""
    for i in range(start, start + n):
        txn = journal.open_payment(order=f"O{i}", amount_fen=100 + i, payment_type="wechat", platform="sandbox",
                                   code=f"1345678901{i:08d}")
        journal.transition(txn.txn_id, State.PAID, funding_source="BALANCE")


def lane_events(journal: Journal, n: int) -> None:
    for i in range(n):
        journal.lane_event("fault", {"source": "test", "reason": f"#{i}"})


def seqs_of(messages, suffix: str = "txn") -> list[int]:
    """The seq of each message on `B/<suffix>`, in the order they arrived."""
    return [json.loads(m.payload)["seq"] for m in messages if m.topic == f"{BASE}/{suffix}"]


def event_ids(messages) -> set[str]:
    return {json.loads(m.payload)["event_id"] for m in messages
            if m.topic.rsplit("/", 1)[-1] in ("txn", "event", "daily") and b'"event_id"' in m.payload}


def drained(journal: Journal, timeout: float = 20.0) -> bool:
    return wait_for(lambda: journal.outbox_state().backlog == 0, timeout)


def check_all(messages) -> list[dict]:
    """Each message parsed and valid against its kind's schema (appliance/schemas, by topic): what
    head office's ingest would accept. Raises BadMessage naming what is wrong."""
    from appliance.schemas import TOPIC_KINDS, check

    def checked(m) -> dict:
        *_, level, name = m.topic.split("/")
        if name == "reply":
            return check("reply", m.payload)
        if level == "cmd":  # head office's own request, seen by a subscriber to the lane's `#`
            return check("command", m.payload, command=name)
        return check(TOPIC_KINDS[name], m.payload)

    return [checked(m) for m in messages]

"""The test broker (tests/broker.py): a real mosquitto with one user per lane, and what its ACL
lets each user do, proved with paho-mqtt 2.x clients."""

import os
import socket
import stat

import pytest
from broker import HQ, NOT_AUTHORIZED, Peer, acl_text, lane_user
from conftest import wait_for
from paho.mqtt.enums import MQTTProtocolVersion

pytestmark = pytest.mark.integration

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
LANE1, LANE2 = lane_user("S001", "01"), lane_user("S001", "02")


@pytest.fixture
def peers(broker):
    """`peers(user, **options)` connects a Peer to the test's broker; all are closed at teardown."""
    made = []

    def connect(user, password=None, **options):
        peer = Peer(broker, user, password, **options)
        made.append(peer)
        assert peer.connect() == 0, f"{user} refused: {peer.connack}"
        return peer

    yield connect
    for peer in made:
        peer.close()


def publish_alone(broker, user, topic, protocol=V5):
    """Publish one QoS 1 message on a connection of its own and return the PUBACK's reason code.
    mosquitto 2.0 acks a denied publish (with "Not authorized" under MQTT v5) and then drops the
    connection; the message goes nowhere."""
    peer = Peer(broker, user, protocol=protocol)
    try:
        peer.connect()
        return peer.publish(topic, b'{"request_id":"x"}')
    finally:
        peer.close()


def assert_next_is(hq, peers, topic):
    """Publish on `topic` as its lane and check that it is the next message `hq` gets: whatever the
    broker had forwarded before would have reached `hq` first."""
    peers(lane_user(*topic.split("/")[1:3])).publish(topic, b"after")
    assert [m.topic for m in hq.received(1)] == [topic]


def test_ok__fixture_broker_has_a_user_per_lane_and_hq_with_secret_files(broker, peers):
    assert broker.running and broker.port not in (None, 1883)
    assert set(broker.users) == {"lane-S001-01", "lane-S001-02", "lane-S001-03", HQ}
    for user, password in broker.users.items():
        path = broker.password_file(user)
        assert path.read_text().strip() == password
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        peers(user)
    assert stat.S_IMODE((broker.root / "passwd").stat().st_mode) == 0o600
    assert "New client connected" in broker.log_text()
    section = broker.mqtt_config("S001", "02")
    assert (section["port"], section["username"], section["topic_prefix"]) == (broker.port, LANE2, "lanes")


@pytest.mark.parametrize("protocol", [V5, V311])
@pytest.mark.parametrize("user,password", [(LANE1, "wrong"), (None, None), ("nobody", "x")],
                         ids=["wrong-password", "anonymous", "unknown-user"])
def test_fail__bad_credentials_are_refused(broker, protocol, user, password):
    peer = Peer(broker, user, password, protocol=protocol)
    try:
        reason = peer.connect()
        assert reason.is_failure and reason.getName() == "Not authorized"  # v5: 135, v3.1.1: 5
        assert not peer.client.is_connected()
    finally:
        peer.close()


@pytest.mark.parametrize("topic", [
    "lanes/S001/01/cmd/charge",         # its own command request
    "lanes/S001/02/cmd/charge",         # another lane's
    "lanes/S001/02/txn",                # another lane's events, spoofed
    "lanes/S001/02/status",
    "lanes/S001/01/cmd/charge/reply/x",  # anything else
    "lanes/S001/01",
])
def test_fail__a_lane_cannot_publish_commands_or_as_another_lane(broker, peers, topic):
    hq = peers(HQ)
    assert hq.subscribe("lanes/#")[0] == 1
    assert publish_alone(broker, LANE1, topic) == NOT_AUTHORIZED
    assert_next_is(hq, peers, "lanes/S001/01/txn")


def test_fail__with_mqtt_3_1_1_a_denied_publish_looks_acknowledged_but_goes_nowhere(broker, peers):
    """The hazard for an uplink on 3.1.1: a PUBACK without a reason code cannot say "denied"."""
    hq = peers(HQ)
    hq.subscribe("lanes/#")
    assert publish_alone(broker, LANE1, "lanes/S001/02/cmd/charge", protocol=V311) == 0
    assert_next_is(hq, peers, "lanes/S001/01/txn")


def test_ok__a_lane_writes_its_topics_and_hq_reads_them(broker, peers):
    hq = peers(HQ)
    hq.subscribe("lanes/#")
    lane = peers(LANE1)
    topics = [f"lanes/S001/01/{t}" for t in ("txn", "event", "daily", "status", "cmd/ping/reply")]
    for topic in topics:
        assert lane.publish(topic, b"{}").is_failure is False  # 0, or 16 "No matching subscribers"
    assert [m.topic for m in hq.received(len(topics))] == topics


def test_fail__a_lane_cannot_read_another_lanes_topics(broker, peers):
    spy = peers(LANE2)
    # mosquitto 2.0's acl_file grants every SUBSCRIBE and filters each message at delivery.
    assert spy.subscribe("lanes/#")[0] == 1
    assert spy.subscribe("$share/spies/lanes/S001/01/#")[0] == 1
    lane1, hq = peers(LANE1), peers(HQ)
    lane1.subscribe("lanes/S001/01/cmd/+")
    lane1.publish("lanes/S001/01/status", b"retained", retain=True)
    lane1.publish("lanes/S001/01/txn", b"txn")
    assert hq.publish("lanes/S001/01/cmd/ping", b'{"request_id":"1"}') == 0
    assert [m.payload for m in lane1.received(1)] == [b'{"request_id":"1"}']
    # The spy's own command request arrives after whatever hq sent before it.
    assert hq.publish("lanes/S001/02/cmd/ping", b'{"request_id":"2"}') == 0
    assert [m.topic for m in spy.received(1)] == ["lanes/S001/02/cmd/ping"]
    # A retained message is filtered the same way when a subscription is made.
    late = peers(LANE2)
    late.subscribe("lanes/S001/01/status")
    late.subscribe("lanes/S001/02/cmd/+")
    hq.publish("lanes/S001/02/cmd/ping", b'{"request_id":"3"}')
    assert [m.topic for m in late.received(1)] == ["lanes/S001/02/cmd/ping"]
    assert [m.topic for m in spy.received(2)] == ["lanes/S001/02/cmd/ping", "lanes/S001/02/cmd/ping"]


def test_fail__hq_cannot_publish_as_a_lane(broker, peers):
    hq = peers(HQ)
    hq.subscribe("lanes/#")
    for topic in ("lanes/S001/01/txn", "lanes/S001/01/cmd/ping/reply", "lanes/S001/01/status"):
        assert publish_alone(broker, HQ, topic) == NOT_AUTHORIZED
    assert_next_is(hq, peers, "lanes/S001/01/event")


def test_ok__hq_shared_subscription_splits_a_lanes_events_once(broker, peers):
    ingest = [peers(HQ), peers(HQ)]
    for peer in ingest:
        assert peer.subscribe("$share/hq/lanes/+/+/txn")[0] == 1
    lane = peers(LANE1)
    for i in range(20):
        lane.publish("lanes/S001/01/txn", str(i).encode())

    def got():
        return sorted(int(m.payload) for peer in ingest for m in peer.messages)

    assert wait_for(lambda: len(got()) >= 20, timeout=10)
    assert got() == list(range(20))
    assert all(peer.messages for peer in ingest)  # mosquitto's default: round robin


def test_ok__stop_and_start_on_the_same_port_keeps_retained_messages_and_sessions(broker, peers):
    port = broker.port
    session = dict(client_id="hq-ingest-1", clean_start=False, session_expiry_s=600)
    hq = Peer(broker, HQ, **session)
    hq.connect()
    hq.subscribe("lanes/+/+/txn")
    hq.close()
    lane = Peer(broker, LANE1)
    lane.connect()
    lane.publish("lanes/S001/01/status", b'{"state":"online"}', retain=True)
    lane.publish("lanes/S001/01/txn", b"queued while hq was away")
    lane.close()

    broker.stop()
    assert not broker.running
    with pytest.raises(OSError):
        socket.create_connection((broker.host, port), timeout=1).close()
    broker.start()
    assert broker.port == port

    back = peers(HQ, **session)
    assert [m.payload for m in back.received(1)] == [b"queued while hq was away"]
    watcher = peers(HQ)
    watcher.subscribe("lanes/S001/01/status")
    [status] = watcher.received(1)
    assert (status.payload, status.retain) == (b'{"state":"online"}', True)
    assert broker.log_text().count("mosquitto version") >= 2


def test_fail__mosquitto_2_0_forgets_shared_subscriptions_across_a_restart(broker, peers):
    """The session survives, its shared subscription does not: head office subscribes again on
    every connect, session present or not."""
    session = dict(client_id="hq-ingest-1", clean_start=False, session_expiry_s=600)
    hq = Peer(broker, HQ, **session)
    hq.connect()
    hq.subscribe("$share/hq/lanes/+/+/txn")
    hq.close()
    broker.stop()
    broker.start()
    back = peers(HQ, **session)
    lane = peers(LANE1)
    lane.publish("lanes/S001/01/txn", b"lost to the group")
    probe = peers(HQ)
    probe.subscribe("lanes/S001/01/txn")
    lane.publish("lanes/S001/01/txn", b"fence")
    probe.received(1)
    back.subscribe("$share/hq/lanes/+/+/txn")
    lane.publish("lanes/S001/01/txn", b"after subscribing again")
    assert [m.payload for m in back.received(1)] == [b"after subscribing again"]


def test_ok__kill_then_start_on_the_same_port(broker, peers):
    pid = broker.proc.pid
    broker.kill()
    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    port = broker.port
    broker.start()
    assert broker.port == port and broker.proc.pid != pid
    peers(LANE1).publish("lanes/S001/01/txn", b"{}")


@pytest.mark.parametrize("broker", [{"prefix": "chain/cn", "lanes": [("S9", "T1")]}], indirect=True)
def test_ok__prefix_and_lanes_are_fixture_parameters(broker, peers):
    assert set(broker.users) == {"lane-S9-T1", HQ}
    assert "topic read chain/cn/S9/T1/cmd/+" in (broker.root / "acl").read_text()
    hq = peers(HQ)
    hq.subscribe("chain/cn/#")
    lane = peers("lane-S9-T1")
    lane.publish("chain/cn/S9/T1/txn", b"{}")
    assert [m.topic for m in hq.received(1)] == ["chain/cn/S9/T1/txn"]


def test_ok__acl_text_grants_each_lane_only_its_own_topics():
    text = acl_text("lanes", [("S001", "01")])
    assert text.splitlines()[2:] == [
        "user lane-S001-01",
        "topic write lanes/S001/01/txn",
        "topic write lanes/S001/01/event",
        "topic write lanes/S001/01/daily",
        "topic write lanes/S001/01/status",
        "topic write lanes/S001/01/cmd/+/reply",
        "topic read lanes/S001/01/cmd/+",
        "",
        "user hq",
        "topic read lanes/#",
        "topic write lanes/+/+/cmd/+",
    ]

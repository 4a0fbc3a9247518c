"""`appliance hq ingest`: every lane's txn, event, daily and status messages into head office's
database, through a shared subscription, each message acknowledged only once it is committed.

Delivery contract (docs/mqtt.md):

* Subscribes `$share/{group}/{prefix}/+/+/{txn,event,daily,status}` at QoS 1 over MQTT v5, with a
  persistent session (clean_start false, `session_expiry_s`) under a client id that must be one
  per process and stable across its restarts: the broker keeps the session's unacknowledged
  messages for that id and splits the group's messages among the processes of the group.
* Hazards of persistent sessions in a share group (mosquitto 2.0, seen in bench/ingest.py): a
  stopped member's session stays in the group, and the broker keeps queueing that member's share
  for it until it comes back under its client id or its session expires; a process retired for
  good must therefore not leave its session behind with messages in it. And a session keeps its
  subscriptions: a process restarted with another `group` under the same client id is in both
  groups. The default client id (`hq-{host name}-{group}`) changes with the group.
* Manual acknowledgement: paho's network thread only queues a message; the writer (the thread
  that calls `run`) stores a batch of them in one transaction and sends each PUBACK after the
  commit. A process killed before its commit leaves its messages unacknowledged, and the broker
  delivers them again (to this client id's session when it comes back). Nothing is acknowledged
  that was not stored, so delivery is at least once and `event_id` makes the rows exactly once.
* A message that fails its schema, whose topic ids disagree with its payload, or that the
  database refuses on its own, goes to the `reject` table with the reason and is acknowledged;
  it never stops the consumer.
* The database unreachable or locked: the batch is rolled back and retried with backoff (0.5 s
  doubling to 30 s), never acknowledged meanwhile; `receive_maximum` bounds what the broker sends
  in the meantime. The outage is logged once, and its end once; likewise the broker's.
* SIGTERM/SIGINT (`stop`): the batch in hand is committed and acknowledged, then a clean
  disconnect keeps the session for the next start.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from appliance import schemas
from appliance.errors import BadMessage, ConfigError
from appliance.hq.config import HqConfig
from appliance.hq.store import Store, StoreError, StoreUnavailable, event_row
from appliance.journal import rfc3339, utc_now

log = logging.getLogger(__name__)

#: Backoff while the database is unavailable: first wait, ceiling (seconds).
DB_RETRY_MIN_S, DB_RETRY_MAX_S = 0.5, 30.0
#: How long the writer waits for more messages before committing what it has (seconds).
BATCH_WAIT_S = 0.05


def subscriptions(prefix: str, group: str) -> list[str]:
    """The shared-subscription filters of one ingest group."""
    return [f"$share/{group}/{prefix}/+/+/{suffix}" for suffix in schemas.TOPIC_KINDS]


@dataclass(frozen=True)
class Message:
    """One received message: what the writer needs, decoupled from paho's object."""

    topic: str
    payload: bytes
    mid: int
    qos: int


class Router:
    """Stores one message: checks it, then writes its rows through `store` (inside the caller's
    transaction). Raises StoreError/StoreUnavailable from the store; anything wrong with the
    message itself becomes a reject row instead."""

    def __init__(self, store: Store, prefix: str, clock: Callable = utc_now):
        self.store = store
        self.prefix = prefix.split("/")
        self.clock = clock

    def write(self, m: Message, events: list[dict]) -> str:
        """Returns what was done: the payload kind, or "reject". A txn, lane or day_close event is
        appended to `events` (as a store.event_row) for the caller to store with its batch."""
        now = rfc3339(self.clock())
        try:
            kind, store_id, terminal_id = self._topic(m.topic)
            msg = schemas.check(kind, m.payload)
            if (msg["store_id"], msg["terminal_id"]) != (store_id, terminal_id):
                raise BadMessage(f"$.store_id/terminal_id: {msg['store_id']}/{msg['terminal_id']} "
                                 f"published on the topic of {store_id}/{terminal_id}"[:schemas.REASON_CHARS])
        except BadMessage as e:
            self.store.add_reject(m.topic, e.reason, m.payload, now)
            return "reject"
        if kind in ("txn", "lane"):
            events.append(event_row(msg, now, text=m.payload.decode()))
        elif kind == "status":
            self.store.set_status(msg, now)
        else:
            self.store.set_daily(msg, now)
            if "event_id" in msg:  # a day's close: an outbox row, in the lane's seq series
                events.append(event_row(msg, now, kind="day_close", text=m.payload.decode()))
        return kind

    def _topic(self, topic: str) -> tuple[str, str, str]:
        levels = topic.split("/")
        n = len(self.prefix)
        if len(levels) != n + 3 or levels[:n] != self.prefix or levels[n + 2] not in schemas.TOPIC_KINDS:
            raise BadMessage(f"topic: not {'/'.join(self.prefix)}/<store>/<terminal>/<kind>")
        return schemas.TOPIC_KINDS[levels[n + 2]], levels[n], levels[n + 1]


class Ingest:
    """One ingest process: an MQTT client feeding a writer. `run(stop)` blocks until `stop` is set."""

    def __init__(self, cfg: HqConfig, store: Store, clock: Callable = utc_now):
        self.cfg = cfg
        self.store = store
        self.router = Router(store, cfg.topic_prefix, clock)
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.client = self._client()
        self.counts = {"txn": 0, "lane": 0, "daily": 0, "status": 0, "reject": 0}
        #: Set while connected with the group's subscriptions granted (cleared on a disconnect).
        self.subscribed = threading.Event()
        self._db_down_since: float | None = None
        self._broker_lost = False
        self._stopping = False

    # --- MQTT (paho's network thread) ---------------------------------------------------------

    def _client(self) -> mqtt.Client:
        cfg = self.cfg
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.effective_client_id(),
                        protocol=mqtt.MQTTv5, manual_ack=True)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password_file.read() if cfg.password_file else None)
        if cfg.tls:
            try:
                c.tls_set(ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                          certfile=str(cfg.cert_file) if cfg.cert_file else None,
                          keyfile=str(cfg.key_file.path) if cfg.key_file else None)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                raise ConfigError("hq.ca_file", f"TLS setup failed: {e}") from None
        c.reconnect_delay_set(max(1, round(cfg.reconnect_min_s)), max(1, round(cfg.reconnect_max_s)))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        return c

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if not self._broker_lost:
                log.error("broker %s:%s refused the connection: %s", self.cfg.host, self.cfg.port, reason_code)
                self._broker_lost = True
            return
        opts = SubscribeOptions(qos=1)
        client.subscribe([(f, opts) for f in subscriptions(self.cfg.topic_prefix, self.cfg.group)])
        level = logging.WARNING if self._broker_lost else logging.INFO
        log.log(level, "connected to broker %s:%s as %s (session %s), group %s",
                self.cfg.host, self.cfg.port, self.cfg.effective_client_id(),
                "resumed" if flags.session_present else "new", self.cfg.group)
        self._broker_lost = False

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("the broker refused the subscriptions: %s", ", ".join(refused))
            return
        log.info("subscribed: %s", ", ".join(subscriptions(self.cfg.topic_prefix, self.cfg.group)))
        self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.subscribed.clear()
        if not self._broker_lost and not self._stopping:
            log.warning("lost the broker %s:%s (%s); reconnecting", self.cfg.host, self.cfg.port, reason_code)
            self._broker_lost = True

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self.inbox.put(Message(msg.topic, msg.payload, msg.mid, msg.qos))

    # --- the writer (the caller's thread) -----------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Connect, then store and acknowledge messages until `stop` is set."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        props.ReceiveMaximum = self.cfg.receive_maximum
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive_s, clean_start=False,
                                  properties=props)
        self.client.loop_start()
        try:
            while not stop.is_set():
                batch = self._take(stop)
                if batch:
                    self._commit(batch, stop)
        finally:
            self._stopping = True
            self.client.disconnect()
            self.client.loop_stop()
            self.store.close()
            log.info("ingest stopped: %s", ", ".join(f"{k} {v}" for k, v in self.counts.items()))

    def _take(self, stop: threading.Event) -> list[Message]:
        try:
            batch = [self.inbox.get(timeout=0.2)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + BATCH_WAIT_S
        while len(batch) < self.cfg.batch_size:
            try:
                batch.append(self.inbox.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _commit(self, batch: list[Message], stop: threading.Event) -> None:
        """Store the batch in one transaction and acknowledge it; on a refused batch, message by
        message. Retries while the database is unavailable; gives up (unacknowledged, so the
        broker redelivers) only when `stop` is set meanwhile."""
        delay = DB_RETRY_MIN_S
        while True:
            try:
                try:
                    kinds = self._write(batch)
                except StoreError as e:
                    if isinstance(e, StoreUnavailable):
                        raise
                    log.warning("a batch of %d was refused (%s); storing its messages one by one", len(batch), e)
                    kinds = [self._write_alone(m) for m in batch]
            except StoreUnavailable as e:
                if self._db_down_since is None:
                    log.error("%s; retrying, nothing is acknowledged meanwhile", e)
                    self._db_down_since = time.monotonic()
                self.store.close()
                if stop.wait(delay):
                    return
                delay = min(delay * 2, DB_RETRY_MAX_S)
                continue
            break
        if self._db_down_since is not None:
            log.warning("database available again after %.0f s", time.monotonic() - self._db_down_since)
            self._db_down_since = None
        for m, kind in zip(batch, kinds):
            self.counts[kind] += 1
            self.client.ack(m.mid, m.qos)

    def _write(self, batch: list[Message]) -> list[str]:
        with self.store.guard(), self.store.atomic():
            events: list[dict] = []
            kinds = [self.router.write(m, events) for m in batch]
            self.store.add_events(events)
            return kinds

    def _write_alone(self, m: Message) -> str:
        try:
            return self._write([m])[0]
        except StoreUnavailable:
            raise
        except StoreError as e:
            log.error("the database refused a message on %s: %s", m.topic, e)
            with self.store.guard(), self.store.atomic():
                self.store.add_reject(m.topic, f"database refused: {e}", m.payload, rfc3339(utc_now()))
            return "reject"


def run(cfg: HqConfig, stop: threading.Event | None = None) -> int:
    """`appliance hq ingest`: until SIGTERM/SIGINT (or `stop`). Returns the exit code."""
    import signal

    from appliance.hq.store import redacted

    stop = stop or threading.Event()
    store = Store(cfg.db or None)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("ingest into %s from %s:%s, topics %s", redacted(store.url), cfg.host, cfg.port,
             ", ".join(subscriptions(cfg.topic_prefix, cfg.group)))
    Ingest(cfg, store).run(stop)
    return 0

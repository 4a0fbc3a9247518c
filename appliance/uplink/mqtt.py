"""`[mqtt] enabled = true`: the outbox to head office over MQTT (paho-mqtt 2.x), v5 or 3.1.1, QoS 1.

Topics under B = `{topic_prefix}/{store_id}/{terminal_id}` (docs/mqtt.md): each outbox row on
`B/<row.topic>` (txn, event, daily; daily rows retained); `B/status`, retained (`online`, `stopped`;
the Last Will `offline`); commands in on `B/cmd/+`, replies out on `B/cmd/<name>/reply`.

Threads:
  * `uplink`: connects (jittered backoff), drains the outbox, acks it, publishes the status and
    the running daily totals, closes business days, prunes sent rows. Only it touches the outbox.
  * paho's network thread, one per connection (`loop_start`): reads and writes the socket and runs
    the callbacks, which only record, queue and wake `uplink` (never the journal, never a command).
  * `uplink-commands`: runs head office's commands one at a time and publishes their replies.

One paho client per connection. When a connection ends, its client goes with its unacked publishes
and its mid -> seq map, and the next connection claims again from the oldest queued row. So paho's
own resend of in-flight messages (which needs the old client) never happens and no row is booked
twice or forgotten; the rows in flight at the loss simply go out again (duplicates on the wire are
allowed: head office de-duplicates by event_id; loss is not).

The drain: rows are claimed in seq order and handed to paho, which keeps at most `max_inflight`
publishes (QoS 1; and never more than the broker's Receive Maximum) unacknowledged on the wire and
sends the next as each PUBACK comes. PUBACKs are queued by paho's thread; the uplink thread acks
them in batches, one journal commit per batch. A row is marked sent only
after its PUBACK. A v5 PUBACK with a failure reason code (135, not authorised) is no success: the
row stays queued, the outage is logged once, and the drain pauses (backoff) and starts again from
the oldest queued row. MQTT 3.1.1 has no such code: a 3.1.1 broker that drops a publish its ACL
refuses still acknowledges it, and that row counts as sent (use v5, or get the ACL right).

Hazards: the client id must be unique at the broker (a second client with it throws the first
off, and the two then take turns); `online` is retained, so subscribers trust it until the Last
Will replaces it, 1.5 x keepalive_s after the lane went silent; a command reply is published once,
on the connection of the moment: if there is none, it is lost (the requester times out and asks
again). Commands arrive at least once (QoS 1, persistent session): a redelivered one runs again.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import queue
import socket
import ssl
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import appliance
from appliance.errors import ConfigError, JournalError, UplinkError
from appliance.journal import rfc3339, utc_now
from appliance.uplink import Backoff, Outage, Uplink, uplinks

log = logging.getLogger(__name__)

#: TCP connect and TLS handshake, each (paho's connect_timeout).
CONNECT_TIMEOUT_S = 5.0
#: A connection whose CONNACK has not come by then is given up.
CONNACK_TIMEOUT_S = 10.0
#: How often the business date is checked for a day to close: a day is closed within this long
#: after its cutoff. An idle uplink sleeps until its next timer (this, the status, a reconnect,
#: the prune) or until woken: by a journal commit (new outbox rows), the lane's health changing,
#: a PUBACK, a command, a stop (issue 10: no polling).
DAY_CHECK_EVERY_S = 60.0
#: How often sent rows older than `prune_after_days` are deleted.
PRUNE_EVERY_S = 3600.0
#: Rows handed to paho and not yet acknowledged, at least (twice the window if that is more);
#: claimed from the journal half of it at a time, one commit each.
CLAIM_BATCH = 1000
#: While rows flow, acknowledged rows are marked sent in one commit per this many, or per
#: ACK_EVERY_S, whichever comes first; at once when nothing else is to be done.
ACK_BATCH = 1000
ACK_EVERY_S = 0.1
#: Commands waiting for the lane; more are answered "busy" at once.
COMMAND_QUEUE = 32
#: After a journal failure, the uplink thread waits this long before trying again.
JOURNAL_RETRY_S = 1.0


class _Client(mqtt.Client):
    """paho's client, whose network thread (`loop_start`) sleeps up to `idle_wake_s` in select()
    when nothing comes or goes, instead of paho's 1 s (issue 10: an idle lane sleeps). A publish
    from another thread still wakes it at once (paho's socket pair); the keepalive PINGREQ goes
    out at most `idle_wake_s` late, which a quarter of keepalive_s keeps well inside the broker's
    1.5 x keepalive_s. paho 2.x starts that thread on `_thread_main`: should a later paho rename
    it, this override is simply unused and the thread wakes every second again."""

    idle_wake_s = 1.0

    def _thread_main(self) -> None:
        try:
            self.loop_forever(timeout=self.idle_wake_s, retry_first_connection=True)
        finally:
            self._thread = None


def dumps(doc: dict) -> str:
    """A payload as the contract writes them: compact JSON, keys sorted, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class _Connection:
    """One paho client, from connect to loss. The callbacks (paho's thread) only set `ready`/`lost`
    and append to `acks`; everything else belongs to the uplink thread."""

    def __init__(self, client: mqtt.Client, now: float, connected_since: str):
        self.client = client
        self.deadline = now + CONNACK_TIMEOUT_S
        self.connected_since = connected_since
        self.ready = False  # CONNACK with success
        self.announced = False
        self.lost: str | None = None  # why it ended
        self.wake_every = 1  # PUBACKs that wake the uplink thread at once (a quarter of the depth)
        self.resize: int | None = None  # the broker's Receive Maximum, when below the window
        self.acks: collections.deque = collections.deque()  # (mid, ReasonCode), appended by paho's thread
        self.inflight: dict[int, object] = {}  # mid -> OutboxRow handed to paho, PUBACK awaited
        self.cursor = 0  # the last seq handed to paho on this connection
        self.depth = CLAIM_BATCH  # rows handed to paho and not yet acknowledged, at most
        self.drained = False  # the last claim found nothing and nothing is in flight
        self.others: dict[int, str] = {}  # mid -> what (status, daily totals) for the log
        self.shown: dict | None = None  # the health view the last status showed
        self.status_due = 0.0
        self.daily_key: tuple | None = None
        self.stopped_mid: int | None = None

    @property
    def up(self) -> bool:
        return self.ready and self.lost is None


@uplinks.register("mqtt")
class MqttUplink(Uplink):
    """The mqtt adapter (see the module docstring). `commands(name, payload) -> reply dict` runs on
    the `uplink-commands` thread; `health() -> {"lane", "faults"}` is read from the uplink thread;
    `platforms` are the provider names the status reports on. `clock` gives the wall time of the
    payloads, `monotonic` the timers, `rng` the backoff's jitter (tests)."""

    kind = "mqtt"

    def __init__(self, cfg, journal, *, commands=None, health=None, platforms=(), clock=utc_now,
                 monotonic=time.monotonic, rng=None):
        super().__init__(journal)
        m, t = cfg.mqtt, cfg.terminal
        self._m = m
        self._ids = {"store_id": t.store_id, "terminal_id": t.terminal_id}
        self.base = f"{m.topic_prefix}/{t.store_id}/{t.terminal_id}"
        self.client_id = m.client_id or f"lane-{t.store_id}-{t.terminal_id}"
        self._commands = commands or self._no_commands
        self._health = health
        self._platforms = tuple(platforms)
        self._clock, self._mono = clock, monotonic
        self._backoff = Backoff(m.reconnect_min_s, m.reconnect_max_s, rng)
        self._outage = Outage(log, f"uplink to head office ({m.host}:{m.port})", monotonic)
        self._journal_trouble = Outage(log, "uplink's use of the journal", monotonic)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._conn: _Connection | None = None
        self._password: str | None = None
        self._tls: ssl.SSLContext | None = None
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._command_queue: queue.Queue = queue.Queue(COMMAND_QUEUE)
        self._sync = False
        self._next_attempt = 0.0
        self._paused_until = 0.0
        self._rewind = False
        self._to_ack: list[int] = []  # acknowledged by the broker, not yet marked sent
        self._acks_since = 0.0  # when the oldest of them came
        self._refused_seqs: set[int] = set()  # rows the broker refused and has not taken since
        self._last_error: str | None = None
        self._drain_until = self._close_deadline = math.inf
        self._warned: set = set()
        self._today: str | None = None
        self._next_day_check = self._next_prune = self._next_daily = 0.0
        self._ever_connected = False
        self._health_dirty = True  # health() may have changed since the last status read it
        self._commits = 0  # journal commits seen (new rows, changed totals) ...
        self._daily_commits = -1  # ... as of the last daily totals read
        self._window = m.max_inflight  # lowered to the broker's Receive Maximum if it sets a smaller one

    # --- the port --------------------------------------------------------------------------

    def start(self) -> None:
        """Read the password and TLS files (ConfigError naming the key), then start the threads."""
        if self._thread is not None:
            return
        self._password = self._m.password_file.read() if self._m.password_file is not None else None
        self._tls = self._tls_context() if self._m.tls else None
        self._journal.on_commit(self._committed)
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._worker = threading.Thread(target=self._serve_commands, name="uplink-commands", daemon=True)
        self._thread.start()
        self._worker.start()

    def close(self, timeout_s: float = 3.0) -> None:
        """Send what can be sent within `timeout_s` (about 60% of it for the last rows, the rest for
        status `stopped` and its PUBACK), then DISCONNECT normally (so no Last Will) and stop."""
        if self._thread is None:
            return
        if not self._stop.is_set():
            now = self._mono()
            self._close_deadline = now + timeout_s
            self._drain_until = now + 0.6 * timeout_s
            self._stop.set()
            self._wake.set()
        self._thread.join(timeout_s + 1.0)
        try:
            self._command_queue.put_nowait(None)
        except queue.Full:
            pass
        if self._worker is not None:
            self._worker.join(0.5)

    def sync_now(self) -> None:
        self._sync = True
        self._wake.set()

    def health_changed(self) -> None:
        self._health_dirty = True
        self._wake.set()

    def _committed(self) -> None:
        """A journal commit: there may be rows to send or totals to republish. The uplink thread's
        own commits (claims, acks) are not counted: its pass goes on to the rows anyway, and a
        claim's commit would otherwise wake it again and again."""
        if threading.current_thread() is self._thread:
            return
        self._commits += 1
        self._wake.set()

    def _link_state(self) -> dict:
        conn = self._conn
        up = conn is not None and conn.up
        return {"connected": up, "connected_since": conn.connected_since if up else None,
                "last_error": self._last_error}

    # --- the uplink thread ---------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while True:
            now = self._mono()
            if self._stop.is_set():
                if not stopping and self._conn is not None:  # what was journaled at the stop goes out too
                    stopping, self._conn.drained = True, False
                elif self._closing_done(now):
                    break
            self._wake.clear()
            busy = False
            try:
                self._housekeeping(now)
            except JournalError as e:  # retried at its next time; the drain goes on meanwhile
                self._once(("housekeeping", str(e)), log.warning, "uplink cannot close days or prune: %s", e)
            try:
                busy = self._step(now)
                if self._to_ack and self._ack_due(now):
                    self._flush_acks()
            except JournalError as e:
                self._journal_trouble.begin(str(e), "events stay queued")
                self._stop.wait(JOURNAL_RETRY_S)
                continue
            except Exception as e:  # a bug: the uplink must outlive it, and say so once
                self._once(("bug", type(e).__name__), log.exception, "uplink step failed: %s", e)
                self._stop.wait(JOURNAL_RETRY_S)
                continue
            if not self._to_ack:
                self._journal_trouble.end()
            if not busy:
                self._wake.wait(self._sleep_s(self._mono()))
        self._finish()

    def _sleep_s(self, now: float) -> float:
        """How long the uplink thread may sleep unless woken: until its next timer is due."""
        conn = self._conn
        if self._to_ack or (conn is not None and conn.inflight):
            return ACK_EVERY_S
        due = min(self._next_day_check, self._next_prune)
        if self._stop.is_set():
            due = min(due, self._drain_until)
        if conn is None:
            due = min(due, self._next_attempt)
        elif not conn.ready:
            due = min(due, conn.deadline)
        else:
            due = min(due, conn.status_due)
            if self._paused_until > now:
                due = min(due, self._paused_until)
            if self._commits != self._daily_commits:
                due = min(due, self._next_daily)
        return min(max(0.0, due - now), 3600.0)

    def _ack_due(self, now: float) -> bool:
        """Mark the acknowledged rows sent now? When many wait, or the oldest waited ACK_EVERY_S, or
        no more PUBACKs are coming soon (nothing in flight, no connection)."""
        conn = self._conn
        return (len(self._to_ack) >= ACK_BATCH or now - self._acks_since >= ACK_EVERY_S
                or conn is None or not conn.up or not conn.inflight)

    def _closing_done(self, now: float) -> bool:
        conn = self._conn
        return (conn is None or not conn.up or now >= self._drain_until
                or (conn.drained and not self._to_ack))

    def _housekeeping(self, now: float) -> None:
        """Close past business days (at start: the days missed while off) and prune sent rows."""
        if now >= self._next_day_check:
            self._next_day_check = now + DAY_CHECK_EVERY_S
            today = self._journal.business_date_now()
            if today != self._today:
                closed = self._journal.close_days(today)
                if closed:
                    self._commits += 1  # today's running totals follow the close
                    log.info("business day(s) %s closed; their totals are queued for head office",
                             ", ".join(closed))
                self._today = today
        if now >= self._next_prune:
            self._next_prune = now + 60.0  # a failure is tried again in a minute
            pruned = self._journal.prune(self._m.prune_after_days)
            if pruned:
                log.info("pruned %d sent event(s) older than %g days from the journal", pruned,
                         self._m.prune_after_days)
            self._next_prune = now + PRUNE_EVERY_S

    def _step(self, now: float) -> bool:
        """One pass: connect or drop as due, else acks, rows, status, daily. True if it did work."""
        conn = self._conn
        if conn is None:
            if self._stop.is_set() or now < self._next_attempt:
                return False
            self._connect(now)
            return True
        if conn.lost is not None:
            self._drop(conn, conn.lost, now)
            return True
        if not conn.ready:
            if now >= conn.deadline:
                self._drop(conn, f"no CONNACK within {CONNACK_TIMEOUT_S:g} s", now)
                return True
            return False
        if conn.resize:
            # The broker takes fewer unacknowledged publishes (its Receive Maximum, 20 for mosquitto by
            # default) than the window, and paho's window is fixed once connected: disconnect cleanly
            # (no Last Will) and connect again at once with the broker's number. Once per process.
            log.info("the broker takes at most %d unacknowledged publishes (mqtt.max_inflight is %d): "
                     "reconnecting with that window", conn.resize, self._m.max_inflight)
            self._window, self._conn, self._next_attempt = conn.resize, None, now
            self._abandon(conn, 1.0)
            return True
        if not conn.announced:
            conn.announced = True
            self._ever_connected, first = True, not self._ever_connected
            if first and not self._outage.active:
                log.info("uplink connected to %s:%d (MQTT %s%s) as %s; topics under %s/", self._m.host, self._m.port,
                         self._m.protocol, ", TLS" if self._tls else "", self.client_id, self.base)
        took = self._take_acks(conn, now)
        sent = self._publish_rows(conn, now)
        if conn.drained:
            self._healthy()
            self._maybe_daily(conn, now)
        self._maybe_status(conn, now)
        return took or sent

    # --- connecting --------------------------------------------------------------------------

    def _connect(self, now: float) -> None:
        at = rfc3339(self._clock())
        client = self._new_client(at)
        conn = _Connection(client, now, at)
        conn.depth = max(2 * self._window, CLAIM_BATCH)
        conn.wake_every = max(1, conn.depth // 4)
        self._bind(conn)
        v5 = self._m.protocol == "5"
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._m.session_expiry_s
        try:
            try:
                client.connect(self._m.host, self._m.port, self._m.keepalive_s,
                               clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props)
            except (OSError, ValueError) as e:  # ssl.SSLError, timeouts and refusals are OSErrors
                _close_sockets_of(e)
                raise _connect_error(e, self._m.host, self._m.port) from None
        except UplinkError as e:
            sock = client.socket()
            if sock is not None:
                sock.close()
            self._failed(str(e), now)
            return
        self._conn = conn
        client.loop_start()

    def _new_client(self, at: str) -> mqtt.Client:
        v5 = self._m.protocol == "5"
        client = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=None if v5 else False,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, reconnect_on_failure=False)
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.idle_wake_s = self._m.keepalive_s / 4
        # At most this many publishes unacknowledged on the wire (rows, status, daily totals and
        # replies together); paho sends the next as each PUBACK comes.
        client.max_inflight_messages_set(self._window)
        client.will_set(f"{self.base}/status", dumps({"kind": "status", "version": 1, **self._ids,
                                                     "state": "offline", "at": at}), qos=1, retain=True)
        if self._m.username or self._password is not None:
            client.username_pw_set(self._m.username or None, self._password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        return client

    def _tls_context(self) -> ssl.SSLContext:
        """The broker's certificate checked against ca_file (or the system's CAs) and its host name."""
        m = self._m
        try:
            ctx = ssl.create_default_context(cafile=str(m.ca_file) if m.ca_file else None)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError("mqtt.ca_file", f"cannot load the CA certificates: {e}") from None
        if m.cert_file is not None:
            try:
                ctx.load_cert_chain(str(m.cert_file), str(m.key_file.path))
            except (ssl.SSLError, OSError) as e:
                raise ConfigError("mqtt.key_file", f"cannot load the client certificate and key: "
                                                   f"{getattr(e, 'reason', None) or e}") from None
        return ctx

    def _bind(self, conn: _Connection) -> None:
        """Callbacks on paho's thread. They must not raise (paho would end its thread) nor block."""
        def on_connect(client, userdata, flags, reason_code, properties):
            try:
                if reason_code.is_failure:
                    conn.lost = conn.lost or f"the broker refused the connection: {reason_code}"
                    return
                receive_maximum = getattr(properties, "ReceiveMaximum", None)
                if receive_maximum is not None and receive_maximum < self._window:
                    conn.resize = receive_maximum  # the uplink thread connects again with that window
                else:
                    client.subscribe(f"{self.base}/cmd/+", qos=1)
                conn.ready = True
            except Exception as e:  # never out of a paho callback: it would end paho's thread
                conn.lost = conn.lost or f"connection set-up failed: {type(e).__name__}: {e}"
            finally:
                self._wake.set()

        def on_disconnect(client, userdata, flags, reason_code, properties):
            conn.lost = conn.lost or f"connection lost ({reason_code})"
            self._wake.set()

        def on_publish(client, userdata, mid, reason_code, properties):
            conn.acks.append((mid, reason_code))
            # Wake the uplink thread for a quarter of the window at once (it publishes as many in one
            # pass), or when nothing else is in flight, or for a failure; else it comes within ACK_EVERY_S.
            if reason_code.is_failure or len(conn.acks) >= min(conn.wake_every, len(conn.inflight)):
                self._wake.set()

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            if any(rc.is_failure for rc in reason_codes):
                self._once(("subscribe",), log.warning, "the broker refused our subscription to %s/cmd/+ (%s): "
                           "head office's commands cannot reach this lane", self.base,
                           ", ".join(str(rc) for rc in reason_codes))

        def on_message(client, userdata, message):
            try:
                self._queue_command(message)
            except Exception as e:  # a malformed message must never end paho's thread
                self._once(("message", type(e).__name__), log.exception, "command message not handled: %s", e)

        conn.client.on_connect = on_connect
        conn.client.on_disconnect = on_disconnect
        conn.client.on_publish = on_publish
        conn.client.on_subscribe = on_subscribe
        conn.client.on_message = on_message

    def _failed(self, reason: str, now: float) -> None:
        """A connection failed or ended: log the outage once, wait a jittered delay."""
        self._last_error = reason
        self._outage.begin(reason, f"events stay queued ({self._backlog_text()}); retrying")
        self._next_attempt = now + self._backoff.next()

    def _drop(self, conn: _Connection, reason: str, now: float) -> None:
        self._conn = None
        self._abandon(conn, 0.0)
        self._failed(reason, now)

    def _abandon(self, conn: _Connection, wait_s: float, clean: bool = True) -> None:
        """End a connection and its paho thread. A live one is sent a DISCONNECT (no Last Will) when
        `clean`, and given `wait_s` to write it; after that the socket is shut, so this never hangs.
        Shut without a DISCONNECT, the broker publishes the Last Will."""
        if conn.lost is None and clean:
            conn.client.disconnect()
            deadline = self._mono() + wait_s
            while conn.lost is None and self._mono() < deadline:
                time.sleep(0.01)
        sock = conn.client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        conn.client.loop_stop()

    def _healthy(self) -> None:
        """Rows went through (or none waits): the outage, if any, is over, unless a row the broker
        refused is still queued (other rows getting through do not end that outage)."""
        if self._refused_seqs:
            return
        if self._outage.active:
            self._outage.end(self._backlog_text())
        self._backoff.reset()

    # --- draining ----------------------------------------------------------------------------

    def _take_acks(self, conn: _Connection, now: float) -> bool:
        """Book the PUBACKs paho queued: a success adds the row to the next ack batch; a failure
        leaves the row queued and pauses the drain."""
        took = False
        while conn.acks:
            mid, reason = conn.acks.popleft()
            row = conn.inflight.pop(mid, None)
            if row is None:
                what = conn.others.pop(mid, "a command reply")
                if reason.is_failure:
                    self._once(("refused", what, reason.value), log.warning, "the broker refused %s: %s", what, reason)
                continue
            took = True
            if reason.is_failure:
                self._refused(row, reason, now)
            else:
                if not self._to_ack:
                    self._acks_since = now
                self._to_ack.append(row.seq)
        return took

    def _flush_acks(self) -> bool:
        """Mark the acknowledged rows sent, in one commit. Kept for the next pass if it fails."""
        if not self._to_ack:
            return False
        self._journal.ack(self._to_ack)
        self._refused_seqs.difference_update(self._to_ack)
        self._to_ack = []
        self._healthy()
        return True

    def _refused(self, row, reason, now: float) -> None:
        txn = ""
        if row.kind == "txn":
            try:
                txn = f", txn {json.loads(row.payload)['txn_id']}"
            except (ValueError, KeyError, TypeError):
                pass
        why = f"the broker refused event seq {row.seq} ({row.kind}{txn}) on {self.base}/{row.topic}: {reason}"
        self._last_error = why
        self._refused_seqs.add(row.seq)
        self._outage.begin(why, "it stays queued; retrying")
        if not self._rewind:
            self._rewind = True
            self._paused_until = now + self._backoff.next()

    def _publish_rows(self, conn: _Connection, now: float) -> bool:
        """Hand queued rows to paho in seq order, up to `conn.depth` unacknowledged. paho keeps at
        most the window of them on the wire and sends the next one as each PUBACK comes, on its own
        thread, as a bare publisher does; this thread refills it half a depth at a time (one claim
        commit). True if it handed any."""
        if now < self._paused_until:
            return False
        if self._rewind:  # after a refusal: once nothing is in flight, from the oldest queued row again
            if conn.inflight:
                return False
            conn.cursor, self._rewind = 0, False
        # Stopping, paho gets no more than its window, so that status `stopped` is not queued behind
        # hundreds of rows.
        depth = self._window if self._stop.is_set() else conn.depth
        if len(conn.inflight) > depth // 2:
            return False
        rows = self._journal.claim(conn.cursor, depth - len(conn.inflight))
        handed = 0
        for row in rows:
            info = conn.client.publish(f"{self.base}/{row.topic}", row.payload, qos=1, retain=row.topic == "daily")
            if info.rc != mqtt.MQTT_ERR_SUCCESS:  # the connection is going: its loss is reported apart
                break
            conn.inflight[info.mid] = row
            conn.cursor = row.seq
            handed += 1
        conn.drained = not rows and not conn.inflight
        return handed > 0

    # --- status and daily totals ---------------------------------------------------------------

    def _health_view(self) -> dict:
        """The lane's part of the status: lane state, faults, scanner and platform health."""
        if self._health is None:
            return {}
        try:
            h = self._health()
        except Exception as e:  # the status goes out without the lane's part rather than not at all
            self._once(("health", type(e).__name__), log.exception, "the lane's health cannot be read: %s", e)
            return {}
        faults = {str(k): str(v) for k, v in (h.get("faults") or {}).items()}
        return {"lane": h.get("lane"), "faults": faults, "scanner": "fault" if "scanner" in faults else "ok",
                "platforms": {name: "fault" if _platform_fault(name, faults) else "ok" for name in self._platforms}}

    def _status(self, state: str, view: dict, conn: _Connection | None = None) -> dict:
        doc = {"kind": "status", "version": 1, **self._ids, "state": state, "at": rfc3339(self._clock()),
               "software_version": appliance.__version__, **view}
        try:
            o = self._journal.outbox_state()
            doc.update(backlog=o.backlog, last_ack_seq=o.last_ack_seq, last_ack_at=o.last_ack_at)
        except JournalError:
            pass  # the status still says who and how the lane is
        if conn is not None:
            doc["connected_since"] = conn.connected_since
        return doc

    def _maybe_status(self, conn: _Connection, now: float) -> None:
        """Publish `online` at connect, then every status_every_s whatever changed (head office
        tells a live lane by a recent `at`, docs/mqtt.md), and at once when the lane's state or
        faults change or on sync_now. The backlog and last ack it shows are as of then."""
        if self._health_dirty or conn.shown is None or now >= conn.status_due:
            self._health_dirty = False
            view = self._health_view()
        else:
            view = conn.shown
        if not (self._sync or conn.shown is None or view != conn.shown or now >= conn.status_due):
            return
        self._sync = False
        info = conn.client.publish(f"{self.base}/status", dumps(self._status("online", view, conn)), qos=1,
                                   retain=True)
        conn.others[info.mid] = "the status"
        conn.shown, conn.status_due = view, now + self._m.status_every_s

    def _maybe_daily(self, conn: _Connection, now: float) -> None:
        """With the backlog empty (head office has every txn the totals count), publish the running
        totals of today when they changed, at most every daily_every_s. A day without payments is
        not published (it would replace the retained close of the day before)."""
        if now < self._next_daily or self._today is None:
            return
        if self._commits == self._daily_commits and conn.daily_key is not None:
            return  # nothing journaled since: the totals are those shown
        self._next_daily = now + self._m.daily_every_s
        self._daily_commits = self._commits
        doc = self._journal.daily(self._today)
        if not doc.get("totals"):
            return
        key = (doc.get("business_date"), dumps({"totals": doc["totals"]}))
        if key != conn.daily_key:
            info = conn.client.publish(f"{self.base}/daily", dumps(doc), qos=1, retain=True)
            conn.others[info.mid] = "the daily totals"
            conn.daily_key = key

    # --- stopping ----------------------------------------------------------------------------

    def _finish(self) -> None:
        """After the drain: status `stopped` (retained) and its PUBACK, then a clean DISCONNECT. If
        the broker did not acknowledge `stopped` in time, the connection is dropped instead, so the
        broker publishes the Last Will (`offline`): the retained status never stays `online`."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        stopped = False
        if conn.up:
            try:
                self._take_acks(conn, self._mono())
                self._flush_acks()
                view = self._health_view()
            except JournalError as e:
                log.warning("uplink stopping without marking the last acknowledged events sent: %s "
                            "(they go out again at the next start)", e)
                view = {}
            info = conn.client.publish(f"{self.base}/status", dumps(self._status("stopped", view)), qos=1, retain=True)
            conn.stopped_mid = info.mid
            conn.others[info.mid] = "the status stopped"
            stopped = self._await_ack(conn, info.mid)
            try:
                self._take_acks(conn, self._mono())
                self._flush_acks()
            except JournalError:
                pass
            if not stopped:
                log.warning("uplink stopping: the broker did not acknowledge status stopped in time; "
                            "dropping the connection so that its Last Will says offline")
        self._abandon(conn, max(0.2, self._close_deadline - self._mono()) if stopped else 0.0, clean=stopped)
        log.info("uplink stopped (%s)", self._backlog_text())

    def _await_ack(self, conn: _Connection, mid: int) -> bool:
        """Wait until the PUBACK of `mid` is queued (or the close deadline, or the connection ends)."""
        while self._mono() < self._close_deadline and conn.lost is None:
            if any(m == mid for m, _ in list(conn.acks)):
                return True
            self._wake.wait(0.02)
            self._wake.clear()
        return any(m == mid for m, _ in list(conn.acks))

    # --- commands ----------------------------------------------------------------------------

    def _queue_command(self, message) -> None:
        """On paho's thread: hand a command to the worker, or answer busy when too many wait."""
        name = message.topic.rsplit("/", 1)[-1]
        props = getattr(message, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        try:
            self._command_queue.put_nowait((name, bytes(message.payload), correlation, response_topic))
        except queue.Full:
            self._once(("busy",), log.warning, "commands arrive faster than the lane answers them; "
                                               "answering busy (logged once)")
            self._reply(name, self._error_reply(name, "busy: too many commands waiting, try again"),
                        correlation, response_topic)

    def _serve_commands(self) -> None:
        while True:
            item = self._command_queue.get()
            if item is None:
                return
            name, payload, correlation, response_topic = item
            try:
                reply = self._commands(name, payload)
            except Exception as e:  # the commands module answers every request; this is a bug in it
                log.exception("command %r from head office failed", name)
                reply = self._error_reply(name, f"internal error: {type(e).__name__}")
            self._reply(name, reply, correlation, response_topic)

    def _reply(self, name: str, reply: dict, correlation, response_topic) -> None:
        conn = self._conn
        if conn is None or not conn.up:
            log.warning("reply to command %r lost: not connected to the broker", name)
            return
        topic = f"{self.base}/cmd/{name}/reply"
        if (isinstance(response_topic, str) and response_topic.startswith(f"{self.base}/cmd/")
                and not set(response_topic) & {"+", "#"}):
            topic = response_topic
        props = None
        if self._m.protocol == "5" and correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        conn.client.publish(topic, dumps(reply), qos=1, properties=props)

    def _error_reply(self, name: str, error: str) -> dict:
        return {"kind": "reply", "version": 1, "command": name, "request_id": None, "ok": False, "error": error,
                "result": None, **self._ids, "at": rfc3339(self._clock())}

    def _no_commands(self, name: str, payload: bytes) -> dict:
        return self._error_reply(name, "this lane takes no commands")

    # --- helpers -----------------------------------------------------------------------------

    def _backlog_text(self) -> str:
        try:
            return f"backlog {self._journal.outbox_state().backlog}"
        except JournalError:
            return "backlog unknown"

    def _once(self, key: tuple, emit, msg: str, *args) -> None:
        """Log `msg` the first time `key` is seen in this process (state changes, not every retry)."""
        if key not in self._warned:
            self._warned.add(key)
            emit(msg, *args)


def _platform_fault(name: str, faults: dict[str, str]) -> bool:
    """A platform's fault: the till's source `platform:<name>`, or its `platform` source naming it."""
    return f"platform:{name}" in faults or name in faults.get("platform", "").split()


def _close_sockets_of(e: BaseException) -> None:
    """Close the sockets a failed connect left open in the frames it unwound: paho-mqtt 2.2 does not
    close its TLS socket when the handshake fails (`_ssl_wrap_socket`), and that socket, left to
    the garbage collector, would stay open until then and warn (ResourceWarning)."""
    tb = e.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, socket.socket):
                value.close()
        tb = tb.tb_next


def _connect_error(e: Exception, host: str, port: int) -> UplinkError:
    """A failed connect (paho raises the socket's and ssl's exceptions) in the technician's words."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return UplinkError(f"TLS: the broker's certificate is not trusted ({e.verify_message})")
    if isinstance(e, ssl.SSLError):
        return UplinkError(f"TLS handshake with {host}:{port} failed ({e.reason or e})")
    if isinstance(e, (socket.timeout, TimeoutError)):
        return UplinkError(f"no answer from {host}:{port} within {CONNECT_TIMEOUT_S:g} s")
    if isinstance(e, ConnectionRefusedError):
        return UplinkError(f"{host}:{port} refused the connection (no broker listening?)")
    if isinstance(e, socket.gaierror):
        return UplinkError(f"cannot resolve {host} ({e.strerror})")
    if isinstance(e, OSError):
        return UplinkError(f"{host}:{port}: {e.strerror or e}")
    return UplinkError(f"cannot connect to {host}:{port}: {e}")

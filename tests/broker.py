"""A real mosquitto for tests, and paho-mqtt 2.x peers to talk to it.

`Broker` runs `/usr/sbin/mosquitto` (Debian 2.0.x) on a free 127.0.0.1 port with a config written
into its own directory: no anonymous clients, a password file made with `mosquitto_passwd`, an
ACL file from `acl_text` (one user per lane, and `hq`), persistence in that directory (a restart
keeps retained messages and persistent sessions) and a log file. It never touches the system
broker on 1883. The fixtures in conftest.py (`broker`, `make_broker`) kill it at teardown.

What mosquitto 2.0's acl_file does (read from its source, src/security_default.c, and checked by
tests/test_broker.py):
- PUBLISH is checked against `write` entries; a denied QoS 1 publish still gets a PUBACK: with
  MQTT v5 its reason code is 135 "Not authorized", with v3.1.1 it is a plain PUBACK that looks
  like success. Either way the message goes nowhere.
- SUBSCRIBE is never refused by the acl_file (a FIXME in mosquitto): the `read` check happens
  per message at delivery, against the message's topic, so a shared subscription
  (`$share/<group>/<filter>`) is filtered exactly like a plain one, and a lane that subscribes to
  `lanes/#` receives only what its `read` entries allow. Retained messages are checked the same way.
- The Last Will is checked against `write` when it is sent: a will on a topic the user may not
  write is dropped silently.
- `deny` entries are checked first, for every kind of access, so a lane's read of its own
  `cmd/+` cannot be combined with a `deny` of it; lanes therefore get explicit topics, no `#`.

Persistence hazard: mosquitto writes its database on a clean stop (SIGTERM) and every
`autosave_interval` seconds (default 1800). `kill()` (SIGKILL) loses what changed since the last
save: messages it had already acknowledged to a publisher but not yet delivered are gone. A test
that kills the broker and needs them must pass `autosave_interval` (and `autosave_on_changes`);
even then the save follows the PUBACK, so the window is narrowed, not closed.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
HQ = "hq"
DEFAULT_LANES = (("S001", "01"), ("S001", "02"), ("S001", "03"))
LANE_WRITES = ("txn", "event", "daily", "status")  # the lane→HQ topics under its base
NOT_AUTHORIZED = 135  # MQTT v5 reason code
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class BrokerError(RuntimeError):
    """The test broker could not be set up, started or stopped (the message carries its log)."""


def lane_user(store_id: str, terminal_id: str) -> str:
    """The broker user of one lane: `lane-{store_id}-{terminal_id}` (also the derived client id)."""
    return f"lane-{store_id}-{terminal_id}"


def acl_text(prefix: str = "lanes", lanes=DEFAULT_LANES, hq: str = HQ) -> str:
    """A mosquitto acl_file: each lane writes its own txn/event/daily/status and command replies and
    reads only its own command requests; head office reads every lane and writes every lane's
    command requests. No lane can publish a command, its own or another lane's. docs/mqtt.md shows
    this text for one store (tests/test_broker.py keeps the two equal)."""
    lines = ["# mosquitto acl_file: one user per lane, and head office. Anything not listed is denied."]
    for store_id, terminal_id in lanes:
        base = f"{prefix}/{store_id}/{terminal_id}"
        lines += ["", f"user {lane_user(store_id, terminal_id)}"]
        lines += [f"topic write {base}/{suffix}" for suffix in LANE_WRITES]
        lines += [f"topic write {base}/cmd/+/reply", f"topic read {base}/cmd/+"]
    lines += ["", f"user {hq}", f"topic read {prefix}/#", f"topic write {prefix}/+/+/cmd/+"]
    return "\n".join(lines) + "\n"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's pick; never 1883 in practice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class BrokerTLS:
    """A TLS listener's files (PEM): the CA that checks client certificates, the server's
    certificate and its key (readable by mosquitto, which runs as this user)."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


class Broker:
    """One mosquitto process in `root` (a directory of its own).

    `users` maps user name → password (random per broker). `password_file(user)` is a file (mode
    0600) holding that password, for a lane config's `[mqtt] password_file`. `start()` picks a free
    port the first time and reuses it on every later start; `stop()` is SIGTERM (mosquitto saves its
    database), `kill()` is SIGKILL (it saves nothing). Both wait for the process to end.

    `tls=BrokerTLS(...)` adds a second listener, on `tls_port`, that speaks TLS with that server
    certificate (and, with `require_certificate`, asks each client for one its CA issued); the same
    users and ACL apply on both listeners.
    """

    host = "127.0.0.1"

    def __init__(self, root: Path, *, prefix: str = "lanes", lanes=DEFAULT_LANES, debug_log: bool = False,
                 autosave_interval: int | None = None, autosave_on_changes: bool = False,
                 max_queued_messages: int = 0, tls: BrokerTLS | None = None):
        if not (os.access(MOSQUITTO, os.X_OK) and os.access(MOSQUITTO_PASSWD, os.X_OK)):
            raise BrokerError(f"{MOSQUITTO} or mosquitto_passwd is missing: run `make apt-deps`")
        self.root = Path(root)
        self.prefix = prefix
        self.lanes = tuple(lanes)
        self.port: int | None = None
        self.tls = tls
        self.tls_port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.users = {lane_user(s, t): secrets.token_urlsafe(12) for s, t in self.lanes}
        self.users[HQ] = secrets.token_urlsafe(12)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        self.log_path = self.root / "mosquitto.log"
        self._stderr_path = self.root / "mosquitto.stderr"
        self._write_passwords()
        (self.root / "acl").write_text(acl_text(prefix, self.lanes))
        self._options = {
            "debug_log": debug_log,
            "autosave_interval": autosave_interval,
            "autosave_on_changes": autosave_on_changes,
            "max_queued_messages": max_queued_messages,
        }

    # --- files ---

    def _write_passwords(self) -> None:
        passwd = self.root / "passwd"
        secrets_dir = self.root / "secrets"
        secrets_dir.mkdir(mode=0o700, exist_ok=True)
        for i, (user, password) in enumerate(self.users.items()):
            args = ["-c", "-b"] if i == 0 else ["-b"]
            done = subprocess.run([MOSQUITTO_PASSWD, *args, str(passwd), user, password],
                                  capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise BrokerError(f"mosquitto_passwd {user}: {done.stderr.strip()}")
            fd = os.open(secrets_dir / f"{user}.password", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        os.chmod(passwd, 0o600)

    def password_file(self, user: str) -> Path:
        """The file (mode 0600) holding `user`'s password and a newline."""
        if user not in self.users:
            raise KeyError(user)
        return self.root / "secrets" / f"{user}.password"

    def mqtt_config(self, store_id: str, terminal_id: str) -> dict:
        """A lane's `[mqtt]` section (as a dict for conftest.lane_dict) for this broker."""
        user = lane_user(store_id, terminal_id)
        return {"enabled": True, "host": self.host, "port": self.port, "topic_prefix": self.prefix,
                "username": user, "password_file": str(self.password_file(user))}

    def _config_text(self) -> str:
        o = self._options
        lines = [
            "# written by tests/broker.py",
            f"listener {self.port} {self.host}",
            "allow_anonymous false",
            f"password_file {self.root / 'passwd'}",
            f"acl_file {self.root / 'acl'}",
            "persistence true",
            f"persistence_location {self.root / 'data'}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            *(["log_type debug"] if o["debug_log"] else []),
            "connection_messages true",
            # As root, mosquitto would drop to the `mosquitto` user, which cannot read this directory.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            # Tests queue thousands of messages for a disconnected head office: mosquitto's default
            # (1000) would drop the rest silently. 0 = no limit.
            f"max_queued_messages {o['max_queued_messages']}",
        ]
        if o["autosave_interval"] is not None:
            lines.append(f"autosave_interval {o['autosave_interval']}")
            lines.append(f"autosave_on_changes {'true' if o['autosave_on_changes'] else 'false'}")
        if self.tls is not None:  # listener options follow their `listener` line
            lines += [f"listener {self.tls_port} {self.host}", f"cafile {self.tls.cafile}",
                      f"certfile {self.tls.certfile}", f"keyfile {self.tls.keyfile}",
                      f"require_certificate {'true' if self.tls.require_certificate else 'false'}"]
        return "\n".join(lines) + "\n"

    # --- process ---

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Broker:
        """Start mosquitto and wait until it accepts connections (at most READY_TIMEOUT_S). The first
        start picks a free port (retrying if another process takes it first); later starts use the
        same port. Raises BrokerError with the log when it does not come up."""
        if self.running:
            raise BrokerError("the broker is already running")
        first = self.port is None
        for attempt in range(5):
            if first:
                self.port = free_port(self.host)
                if self.tls is not None:
                    self.tls_port = free_port(self.host)
            conf = self.root / "mosquitto.conf"
            conf.write_text(self._config_text())
            with open(self._stderr_path, "ab") as err:
                self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                             stdout=err, stderr=err)
            if self._wait_ready():
                return self
            text = self.log_text() + self._stderr_path.read_text(errors="replace")
            if not (first and "in use" in text and attempt < 4):
                raise BrokerError(f"mosquitto did not start on port {self.port}:\n{text[-3000:]}")
        raise AssertionError("unreachable")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    return True
            except OSError:
                time.sleep(0.005)
        self.kill()
        return False

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM and wait: mosquitto saves its database and exits. Kills it (and raises BrokerError)
        if it has not exited within `timeout` seconds."""
        if not self.running:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BrokerError(f"mosquitto ignored SIGTERM for {timeout} s") from None

    def kill(self) -> None:
        """SIGKILL and wait: nothing is saved since the last autosave. Safe to call at any time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        """Everything mosquitto has logged in this directory, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"<Broker {self.host}:{self.port} {'running' if self.running else 'stopped'} in {self.root}>"


class Peer:
    """A paho-mqtt 2.x client (CallbackAPIVersion.VERSION2) for tests: it records what it receives
    and the broker's answers, and waits for them with a timeout.

    `connect()` returns the CONNACK reason code; `publish()` returns the PUBACK's reason code
    (QoS 1) and `subscribe()` the SUBACK's. `messages` holds every received paho MQTTMessage.
    """

    def __init__(self, broker: Broker, user: str | None, password: str | None = None, *, client_id: str = "",
                 protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5, clean_start: bool = True,
                 session_expiry_s: int = 0, timeout: float = 10.0):
        self.broker = broker
        self.protocol = protocol
        self.timeout = timeout
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        v5 = protocol == MQTTProtocolVersion.MQTTv5
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                  clean_session=None if v5 else clean_start, reconnect_on_failure=False)
        if user is not None:
            self.client.username_pw_set(user, broker.users.get(user) if password is None else password)
        self._cond = threading.Condition()
        self.connack = None
        self.messages: list[mqtt.MQTTMessage] = []
        self._acks: dict[int, object] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = self._on_ack

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self.connack = reason_code
            self._cond.notify_all()

    def _on_message(self, client, userdata, message):
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def _on_ack(self, client, userdata, mid, reason_code, properties):
        with self._cond:
            self._acks[mid] = reason_code  # a list of reason codes for SUBACK
            self._cond.notify_all()

    def _wait(self, predicate, what: str):
        with self._cond:
            if not self._cond.wait_for(predicate, self.timeout):
                raise TimeoutError(f"no {what} within {self.timeout} s")

    def connect(self):
        """Connect and wait for the CONNACK; returns its reason code (0 = accepted)."""
        properties = None
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self._session_expiry_s
            self.client.connect(self.broker.host, self.broker.port, clean_start=self._clean_start,
                                properties=properties)
        else:
            self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        self._wait(lambda: self.connack is not None, "CONNACK")
        return self.connack

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False):
        """Publish and, for QoS 1, wait for the PUBACK; returns its reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        self._wait(lambda: info.mid in self._acks, f"PUBACK for {topic}")
        return self._acks.pop(info.mid)

    def subscribe(self, topic_filter: str, qos: int = 1) -> list:
        """Subscribe and wait for the SUBACK; returns its reason codes."""
        _, mid = self.client.subscribe(topic_filter, qos)
        self._wait(lambda: mid in self._acks, f"SUBACK for {topic_filter}")
        return self._acks.pop(mid)

    def received(self, count: int, topic: str | None = None) -> list[mqtt.MQTTMessage]:
        """Wait until `count` messages (on `topic`, if given) have arrived; returns them."""
        def matching():
            return [m for m in self.messages if topic is None or m.topic == topic]
        self._wait(lambda: len(matching()) >= count, f"{count} message(s) on {topic or 'any topic'}")
        with self._cond:
            return matching()

    def close(self) -> None:
        """Disconnect cleanly (the Last Will, if any, is not sent) and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

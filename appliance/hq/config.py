"""Head office's configuration: an `[hq]` section (and `[logging]`) in its own TOML file, or flags.

Head office is not a lane: its file has no `[terminal]`. The keys are the dataclass below,
schema-first like the lane's config (appliance/schema.py): unknown keys are errors, every error
names its dotted key (`hq.port: must be between ...`). A command-line flag sets its key before
validation, so `--port 0` is refused exactly as `port = 0` in the file would be.

    [hq]
    db = "postgresql://hq@127.0.0.1:5432/hq"
    host = "broker.example"
    port = 8883
    tls = true
    ca_file = "/etc/appliance-hq/ca.pem"
    username = "hq"
    password_file = "/etc/appliance-hq/mqtt-password"
    group = "hq"
    listen = "0.0.0.0:8080"        # hq serve; beyond loopback it needs token_file
    token_file = "/etc/appliance-hq/web-token"

    [reconcile]                    # hq reconcile
    retry_every_s = 1800

    [providers.wechat]             # the merchant accounts, named as the lanes name them
    kind = "wechat_v3"             # (the same keys as a lane's [providers.NAME])
    ...
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.business_day import time_zone
from appliance.config import ProviderConfig, read_toml
from appliance.schema import DAY, HOUR, SECONDS, TCP_PORT, SecretFile, between, build, opt

_SHARE_GROUP_CHARS = frozenset("+#/")


def topic_prefix(v: str) -> str:
    """Schema check of an MQTT topic prefix: levels under which every lane publishes."""
    if not v or v.startswith("/") or v.endswith("/") or "//" in v:
        raise ValueError("must be one or more non-empty topic levels without a leading or trailing /")
    if "+" in v or "#" in v or v.startswith("$") or "\0" in v:
        raise ValueError("must not contain + or # or NUL, nor start with $ (a topic, not a filter)")
    return v


def _group(v: str) -> str:
    if not v or _SHARE_GROUP_CHARS & set(v) or "\0" in v:
        raise ValueError("must be a non-empty share group name without +, # or /")
    return v


def _client_id(v: str) -> str:
    if len(v.encode()) > 64 or "\0" in v:
        raise ValueError("must be at most 64 bytes without NUL")
    return v


def parse_listen(text: str) -> tuple[str, int]:
    """"HOST:PORT" (IPv6 as [::1]:PORT) -> (host, port). Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65_536:
        raise ValueError(f"must be HOST:PORT with a port 1-65535, got {text[:60]!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError("needs a host (127.0.0.1 for this machine only)")
    return host, int(port)


def _listen(v: str) -> str:
    parse_listen(v)
    return v


@dataclass(frozen=True)
class HqConfig:
    db: str = opt("", doc="sqlite:///path or postgresql://user@host:port/db; empty: hq.sqlite in "
                          "$STATE_DIRECTORY, else the working directory")
    host: str = opt("localhost", doc="the MQTT broker")
    port: int = opt(1883, check=TCP_PORT)
    tls: bool = opt(False)
    ca_file: Path | None = opt(None, doc="CA certificates for tls (absent: the system's)")
    cert_file: Path | None = opt(None, doc="client certificate for tls")
    key_file: SecretFile | None = opt(None, doc="its private key")
    username: str = opt("")
    password_file: SecretFile | None = opt(None)
    topic_prefix: str = opt("lanes", check=topic_prefix, doc="the lanes' [mqtt] topic_prefix")
    group: str = opt("hq", check=_group, doc="shared subscription group: processes in one group split the load")
    client_id: str = opt("", check=_client_id, doc="one per process, stable across restarts (empty: "
                                                   "hq-{host name}-{group}); its session keeps unacked messages")
    keepalive_s: int = opt(30, check=between(1, 65_535, SECONDS))
    session_expiry_s: int = opt(7 * 86_400, check=between(0, 2**32 - 1, SECONDS),
                                doc="the broker keeps this process's session (and unacked messages) this long")
    receive_maximum: int = opt(1000, check=between(1, 65_535, "messages"),
                               doc="messages in flight to this process, unacknowledged")
    batch_size: int = opt(500, check=between(1, 10_000, "messages"), doc="messages committed together")
    reconnect_min_s: float = opt(1.0, check=between(0.1, HOUR, SECONDS))
    reconnect_max_s: float = opt(60.0, check=between(0.1, DAY, SECONDS))
    time_zone: str = opt("Asia/Shanghai", check=time_zone, doc="the stores' time zone: report's default date")
    day_cutoff_hour: int = opt(0, check=between(0, 23, "(an hour of the local day)"))
    listen: str = opt("127.0.0.1:8080", check=_listen, doc="`hq serve`: HOST:PORT of the web day view")
    token_file: SecretFile | None = opt(None, doc="`hq serve`: the token its users give (at least 16 "
                                                  "characters); required to listen beyond loopback")

    def effective_client_id(self) -> str:
        return self.client_id or f"hq-{socket.gethostname()[:40]}-{self.group}"[:64]


@dataclass(frozen=True)
class HqLogging:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = opt("INFO")


@dataclass(frozen=True)
class ReconcileConfig:
    """`appliance hq reconcile`: when to ask again for a bill that is not there yet or failed."""

    retry_every_s: float = opt(1800.0, check=between(60.0, DAY, SECONDS),
                               doc="wait between attempts at one day's bill (WeChat: every half hour)")
    retry_for_days: int = opt(3, check=between(1, 90, "days"),
                              doc="a day still not reconciled after this many days is left to a person")


@dataclass(frozen=True)
class HqFile:
    hq: HqConfig = opt(HqConfig())
    logging: HqLogging = opt(HqLogging())
    reconcile: ReconcileConfig = opt(ReconcileConfig())
    providers: dict[str, ProviderConfig] = opt({}, doc="the merchant accounts whose bills `hq reconcile` "
                                                        "fetches, named as in the lanes' [providers]")


def load(path: Path | None, overrides: dict | None = None) -> HqFile:
    """The head-office config from `path` (None: defaults only), `overrides` ({key: value} of
    `[hq]`, from flags) applied first. Raises ConfigError naming the dotted key."""
    raw = read_toml(path) if path is not None else {}
    base = path.parent if path is not None else Path.cwd()
    if overrides:
        section = raw.get("hq", {})
        raw["hq"] = {**section, **overrides} if isinstance(section, dict) else section
    return build(HqFile, raw, "", base)

"""The Uplink port: the journal's outbox, sent to head office; the lane's status; head office's commands.

Adapters (one per file; `[mqtt] enabled` picks one): `mqtt` (paho-mqtt, docs/mqtt.md) and `none`
(nothing is sent: the outbox keeps every event queued for a later uplink). `commands.py` answers
head office's commands; the service hands it to the adapter as its `commands` callable.

Contract for adapters:
  * `start()` starts the background work and returns at once. It never waits for the network: a
    broker that is down is an outage the adapter rides out (logged once), not an error of start.
  * An outbox row is marked sent (`journal.ack`) only once head office's broker has taken it
    (MQTT: its PUBACK). Rows go out in `seq` order, at least once; head office de-duplicates by
    `event_id`. A row is never dropped, whatever the broker answers.
  * `state()` is safe to call from any thread: `{"kind", "connected", "connected_since",
    "last_error"}` plus the journal's OutboxState fields (backlog, oldest_queued_seq,
    oldest_queued_at, last_seq, last_ack_seq, last_ack_at). A JournalError from reading the
    outbox propagates.
  * `sync_now()` wakes the drain and republishes the status at once; returns at once.
  * `health_changed()` says the lane's health (the `health` callable) may have changed: an
    adapter that shows it republishes it; returns at once. Between such calls an adapter reads
    `health` no more often than it publishes a status anyway (no polling).
  * `close(timeout_s)` sends what it can within `timeout_s` seconds (the last events, then status
    `stopped`), disconnects cleanly and stops its threads; idempotent. Whatever it could not send
    stays queued for the next start.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from abc import ABC, abstractmethod
from typing import Callable, Sequence

from appliance.registry import Registry

log = logging.getLogger(__name__)

#: A command from head office: (name, raw payload) -> the reply dict (appliance/uplink/commands.py).
Commands = Callable[[str, bytes], dict]
#: The lane's health, from any thread: {"lane": ..., "faults": {source: reason}} (Till.health).
Health = Callable[[], dict]


class Uplink(ABC):
    """Base of the uplink adapters (see the module docstring for the contract)."""

    kind = "uplink"

    def __init__(self, journal) -> None:
        self._journal = journal

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def close(self, timeout_s: float = 3.0) -> None: ...

    @abstractmethod
    def sync_now(self) -> None: ...

    def health_changed(self) -> None:
        """See the module docstring; adapters that show no health ignore it."""

    def state(self) -> dict:
        return {"kind": self.kind, **self._link_state(), **dataclasses.asdict(self._journal.outbox_state())}

    def _link_state(self) -> dict:
        return {"connected": False, "connected_since": None, "last_error": None}


#: kind -> factory `(cfg: Config, journal, *, commands, health, platforms) -> Uplink`. The options
#: are the `[mqtt]` section; the kind follows `[mqtt] enabled` (see `make_uplink`).
uplinks = Registry("uplink", {"mqtt": "appliance.uplink.mqtt", "none": "appliance.uplink.none"})


def make_uplink(cfg, journal, *, commands: Commands | None = None, health: Health | None = None,
                platforms: Sequence[str] = ()) -> Uplink:
    """The uplink `cfg` (a Config) asks for: `mqtt` when `[mqtt] enabled`, else `none`. Opens nothing
    until `start()`. `platforms` are the provider names whose health the status reports. Raises
    ConfigError naming `mqtt.enabled` if the adapter cannot be loaded."""
    kind = "mqtt" if cfg.mqtt.enabled else "none"
    return uplinks.get(kind, "mqtt.enabled").factory(cfg, journal, commands=commands, health=health,
                                                      platforms=tuple(platforms))


class Backoff:
    """Reconnect delays, "full jitter": the n-th delay in a row is uniform in [min_s, min(max_s,
    min_s * 2**n)], so the lanes of a store do not all come back in the same second after a broker
    restart. `reset()` after a connection that worked. Seconds."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None):
        self.min_s, self.max_s = min_s, max_s
        self._rng = rng or random.Random()
        self._n = 0

    def next(self) -> float:
        ceiling = min(self.max_s, self.min_s * 2 ** min(self._n, 32))
        self._n += 1
        return self._rng.uniform(self.min_s, ceiling)

    def reset(self) -> None:
        self._n = 0


class Outage:
    """An outage logged once: `begin(reason)` logs a WARNING only when none is under way (later
    reasons only replace `reason`), `end(detail)` logs its end once, with how long it lasted."""

    def __init__(self, logger: logging.Logger, what: str, clock: Callable[[], float]):
        self._log, self._what, self._clock = logger, what, clock
        self.since: float | None = None
        self.reason: str | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def begin(self, reason: str, detail: str = "") -> bool:
        """Record a failure; True if it started the outage (and was logged)."""
        self.reason = reason
        if self.since is not None:
            self._log.debug("%s still down: %s", self._what, reason)
            return False
        self.since = self._clock()
        self._log.warning("%s down: %s%s", self._what, reason, f"; {detail}" if detail else "")
        return True

    def end(self, detail: str = "") -> bool:
        """The thing works again; True if that ended an outage (and was logged)."""
        if self.since is None:
            return False
        lasted = self._clock() - self.since
        self.since = None
        self._log.info("%s back after %.1f s%s", self._what, lasted, f"; {detail}" if detail else "")
        return True

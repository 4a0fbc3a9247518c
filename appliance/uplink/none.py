"""`[mqtt] enabled = false`: nothing is sent. The outbox keeps every event queued, and `state()`
still reports it, so `appliance sync` shows what a later uplink will have to send."""

from __future__ import annotations

from appliance.uplink import Uplink, uplinks


@uplinks.register("none")
class NoUplink(Uplink):
    kind = "none"

    def __init__(self, cfg, journal, *, commands=None, health=None, platforms=()):
        super().__init__(journal)

    def start(self) -> None:
        pass

    def close(self, timeout_s: float = 3.0) -> None:
        pass

    def sync_now(self) -> None:
        pass

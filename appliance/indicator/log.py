"""`kind = "log"`: each pattern change is one log line (a Pi without LED, or a bench test)."""

import logging

from appliance.indicator import Indicator, Pattern, Signal, indicators

log = logging.getLogger(__name__)


@indicators.register("log")
def _from_config(cfg, on_render=None) -> Indicator:
    return LogIndicator()


class LogIndicator(Indicator):
    def _render(self, signal: Signal, pattern: Pattern) -> None:
        log.info("indicator: %s (%s)", signal, pattern.describe())

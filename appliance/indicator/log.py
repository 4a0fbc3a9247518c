"""`kind = "log"`: each pattern change is one log line (a Pi without LED, or a bench test)."""

import logging

from appliance.indicator import Indicator, Pattern, Signal

log = logging.getLogger(__name__)


class LogIndicator(Indicator):
    def _render(self, signal: Signal, pattern: Pattern) -> None:
        log.info("indicator: %s (%s)", signal, pattern.describe())

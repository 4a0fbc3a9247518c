"""The Indicator port: what the cashier sees and hears. Semantic signals in, LED/buzzer out.

The till only ever says *what* happened (`Signal.PAID`); the pattern table below says how it
looks and sounds, so a store can retune patterns without touching the till. Adapters (one per
file, chosen by `[indicator] kind`): `gpio` (real pins), `mock` (gpiozero's MockFactory, for
tests and the demo), `log` (one log line per change), `none`.

Contract: `show(signal)` replaces the current pattern at once and returns immediately (blinking
and beeping run in the background); `close()` switches everything off and is idempotent.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum

from appliance.registry import Registry

log = logging.getLogger(__name__)


class Signal(StrEnum):
    READY = "ready"
    AWAITING_CODE = "awaiting_code"
    AWAITING_CANCEL = "awaiting_cancel"
    WORKING = "working"
    PAID = "paid"
    DECLINED = "declined"
    CANCELLED = "cancelled"
    OFFLINE_QUEUED = "offline_queued"
    UNKNOWN_CODE = "unknown_code"
    FAULT = "fault"
    OFF = "off"


Colour = tuple[int, int, int]
OFF: Colour = (0, 0, 0)
RED: Colour = (1, 0, 0)
GREEN: Colour = (0, 1, 0)
BLUE: Colour = (0, 0, 1)
YELLOW: Colour = (1, 1, 0)
COLOUR_NAMES = {OFF: "off", RED: "red", GREEN: "green", BLUE: "blue", YELLOW: "yellow"}


@dataclass(frozen=True)
class Pattern:
    """LED colour, blink timing (None = steady) and beeps: (on_s, off_s, count) or None."""

    colour: Colour
    blink: tuple[float, float] | None = None
    beeps: tuple[float, float, int] | None = None

    def describe(self) -> str:
        led = COLOUR_NAMES[self.colour]
        if self.colour != OFF:
            led += f" blink {self.blink[0]:g}/{self.blink[1]:g}s" if self.blink else " steady"
        sound = f"{self.beeps[2]}x beep {self.beeps[0]:g}s" if self.beeps else "silent"
        return f"LED {led}, {sound}"


#: The pattern table (also in README.md). Beep counts are what a cashier can tell apart blind:
#: one = good, one long = rescan, three short = declined, two = queued/cancelled.
PATTERNS: dict[Signal, Pattern] = {
    Signal.READY: Pattern(GREEN, blink=(0.1, 2.9)),
    Signal.AWAITING_CODE: Pattern(BLUE, blink=(0.5, 0.5), beeps=(0.05, 0.05, 1)),
    Signal.AWAITING_CANCEL: Pattern(RED, blink=(0.5, 0.5), beeps=(0.05, 0.05, 2)),
    Signal.WORKING: Pattern(BLUE, blink=(0.1, 0.1)),
    Signal.PAID: Pattern(GREEN, beeps=(0.3, 0.1, 1)),
    Signal.DECLINED: Pattern(RED, beeps=(0.1, 0.1, 3)),
    Signal.CANCELLED: Pattern(GREEN, blink=(0.25, 0.25), beeps=(0.1, 0.1, 2)),
    Signal.OFFLINE_QUEUED: Pattern(YELLOW, beeps=(0.2, 0.2, 2)),
    Signal.UNKNOWN_CODE: Pattern(RED, blink=(0.1, 0.1), beeps=(0.6, 0.1, 1)),
    Signal.FAULT: Pattern(RED, blink=(1.0, 1.0), beeps=(0.6, 0.3, 2)),
    Signal.OFF: Pattern(OFF),
}


class Indicator(ABC):
    """Base for indicator adapters; remembers the last signal shown (`current`)."""

    def __init__(self) -> None:
        self.current: Signal | None = None

    def show(self, signal: Signal) -> None:
        if signal == self.current and signal not in _REPEATABLE:
            return
        self.current = signal
        self._render(signal, PATTERNS[signal])

    @abstractmethod
    def _render(self, signal: Signal, pattern: Pattern) -> None: ...

    def close(self) -> None:
        if self.current not in (None, Signal.OFF):
            self.show(Signal.OFF)


#: Outcomes the cashier must hear every time, even twice in a row.
_REPEATABLE = frozenset({Signal.PAID, Signal.DECLINED, Signal.CANCELLED, Signal.OFFLINE_QUEUED,
                         Signal.UNKNOWN_CODE, Signal.AWAITING_CODE, Signal.AWAITING_CANCEL})


class NullIndicator(Indicator):
    """`kind = "none"`: no LED, no buzzer."""

    def _render(self, signal: Signal, pattern: Pattern) -> None:
        pass


#: kind -> factory `(cfg: IndicatorConfig, on_render) -> Indicator`; each adapter file registers
#: itself. The options are the `[indicator]` section.
indicators = Registry("indicator", {"log": "appliance.indicator.log", "gpio": "appliance.indicator.gpio",
                                    "mock": "appliance.indicator.gpio"})


@indicators.register("none")
def _no_indicator(cfg, on_render=None) -> Indicator:
    return NullIndicator()


def make_indicator(cfg, on_render=None) -> Indicator:
    """The adapter named by cfg.kind (an IndicatorConfig). `on_render(signal, pattern)` lets the
    demo draw the mock LED in a terminal. Raises ConfigError naming `indicator.kind` if that adapter
    cannot be loaded."""
    return indicators.get(cfg.kind, "indicator.kind").factory(cfg, on_render)

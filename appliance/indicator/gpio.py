"""`kind = "gpio"` (and `"mock"`): an RGB LED and an active buzzer on GPIO pins via gpiozero.

Wiring: three LED legs on `red_pin`, `green_pin`, `blue_pin` (BCM numbers, through resistors);
`active_high = false` for a common-anode LED (legs sink current). The buzzer is an *active*
buzzer (it sounds when its pin is high) on `buzzer_pin`, typically through a transistor.
With `pin_factory=MockFactory()` nothing touches hardware and each pin records its history.
"""

from __future__ import annotations

from gpiozero import RGBLED, Buzzer

from appliance.errors import DeviceError
from appliance.indicator import Indicator, Pattern, Signal, indicators


class GpioIndicator(Indicator):
    def __init__(self, cfg, *, pin_factory=None, on_render=None):
        """Claims the pins at once; raises DeviceError if they are busy or absent."""
        super().__init__()
        self.pin_factory = pin_factory
        self._on_render = on_render
        try:
            self.led = RGBLED(cfg.red_pin, cfg.green_pin, cfg.blue_pin, active_high=cfg.active_high,
                              pwm=False, pin_factory=pin_factory)
            self.buzzer = Buzzer(cfg.buzzer_pin, pin_factory=pin_factory) if cfg.buzzer else None
        except Exception as e:  # gpiozero raises a zoo of errors (BadPinFactory, PinInUse, ...)
            raise DeviceError(f"indicator pins unavailable: {e}") from e
        self._closed = False

    def _render(self, signal: Signal, pattern: Pattern) -> None:
        if self._closed:
            return
        if pattern.blink and pattern.colour != (0, 0, 0):
            self.led.blink(on_time=pattern.blink[0], off_time=pattern.blink[1],
                           on_color=pattern.colour, off_color=(0, 0, 0), background=True)
        else:
            self.led.color = pattern.colour
        if self.buzzer is not None:
            if pattern.beeps:
                on, off, n = pattern.beeps
                self.buzzer.beep(on_time=on, off_time=off, n=n, background=True)
            else:
                self.buzzer.off()
        if self._on_render is not None:
            self._on_render(signal, pattern)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._closed = True
        self.led.close()
        if self.buzzer is not None:
            self.buzzer.close()


@indicators.register("gpio")
def _gpio(cfg, on_render=None) -> Indicator:
    return GpioIndicator(cfg, on_render=on_render)


@indicators.register("mock")
def _mock(cfg, on_render=None) -> Indicator:
    from gpiozero.pins.mock import MockFactory

    return GpioIndicator(cfg, pin_factory=MockFactory(), on_render=on_render)

import logging
import time

import pytest
from gpiozero.pins.mock import MockFactory

from appliance.config import IndicatorConfig
from appliance.errors import DeviceError
from appliance.indicator import PATTERNS, NullIndicator, Signal, make_indicator
from appliance.indicator.gpio import GpioIndicator

CFG = IndicatorConfig(kind="mock")


@pytest.fixture
def factory():
    f = MockFactory()
    yield f
    f.reset()


def _leds(f, cfg=CFG):
    return tuple(int(f.pin(p).state) for p in (cfg.red_pin, cfg.green_pin, cfg.blue_pin))


def test_every_signal_has_a_pattern_and_a_description():
    assert set(PATTERNS) == set(Signal)
    for p in PATTERNS.values():
        assert "LED" in p.describe()


@pytest.mark.parametrize("signal", [s for s in Signal if PATTERNS[s].blink is None])
def test_steady_colours_reach_the_pins(factory, signal):
    ind = GpioIndicator(CFG, pin_factory=factory)
    ind.show(signal)
    assert _leds(factory) == PATTERNS[signal].colour
    ind.close()


def test_active_low_led_inverts_the_pins(factory):
    cfg = IndicatorConfig(kind="mock", active_high=False)
    ind = GpioIndicator(cfg, pin_factory=factory)
    ind.show(Signal.DECLINED)
    assert _leds(factory, cfg) == (0, 1, 1)  # red leg sunk low, the others high (off)
    ind.close()


def test_blinking_signal_toggles_its_colour(factory):
    ind = GpioIndicator(CFG, pin_factory=factory)
    ind.show(Signal.WORKING)  # blue 0.1/0.1
    time.sleep(0.45)
    blue = [s.state for s in factory.pin(CFG.blue_pin).states]
    assert blue.count(True) >= 2 and blue.count(False) >= 2
    assert not any(s.state for s in factory.pin(CFG.red_pin).states)
    ind.close()


def test_declined_beeps_three_times(factory):
    ind = GpioIndicator(CFG, pin_factory=factory)
    ind.show(Signal.DECLINED)
    time.sleep(0.8)
    rises = [s for prev, s in zip(factory.pin(18).states, factory.pin(18).states[1:]) if s.state and not prev.state]
    assert len(rises) == 3
    ind.close()


def test_close_switches_everything_off_and_is_idempotent(factory):
    ind = GpioIndicator(CFG, pin_factory=factory)
    ind.show(Signal.PAID)
    ind.close()
    ind.close()
    assert _leds(factory) == (0, 0, 0) and not factory.pin(18).state
    assert ind.current is Signal.OFF


def test_busy_pins_are_a_device_error(factory):
    first = GpioIndicator(CFG, pin_factory=factory)
    with pytest.raises(DeviceError, match="pins unavailable"):
        GpioIndicator(CFG, pin_factory=factory)
    first.close()


def test_outcomes_repeat_but_states_do_not(factory):
    seen = []
    ind = GpioIndicator(CFG, pin_factory=factory, on_render=lambda s, p: seen.append(s))
    for s in (Signal.READY, Signal.READY, Signal.PAID, Signal.PAID):
        ind.show(s)
    assert seen == [Signal.READY, Signal.PAID, Signal.PAID]
    ind.close()


def test_log_kind_logs_each_change(caplog):
    caplog.set_level(logging.INFO)
    ind = make_indicator(IndicatorConfig(kind="log"))
    ind.show(Signal.PAID)
    ind.show(Signal.READY)
    assert [r.getMessage() for r in caplog.records if "indicator" in r.getMessage()] == [
        f"indicator: paid ({PATTERNS[Signal.PAID].describe()})",
        f"indicator: ready ({PATTERNS[Signal.READY].describe()})"]


def test_none_and_mock_kinds():
    assert isinstance(make_indicator(IndicatorConfig(kind="none")), NullIndicator)
    ind = make_indicator(IndicatorConfig(kind="mock"))
    assert isinstance(ind.pin_factory, MockFactory)
    ind.close()


def test_steady_pattern_after_a_blinking_one_stops_the_blink(factory):
    ind = GpioIndicator(CFG, pin_factory=factory)
    ind.show(Signal.WORKING)
    time.sleep(0.25)
    ind.show(Signal.PAID)
    n = len(factory.pin(CFG.green_pin).states)
    time.sleep(0.3)
    assert _leds(factory) == PATTERNS[Signal.PAID].colour
    assert len(factory.pin(CFG.green_pin).states) == n and len(factory.pin(CFG.blue_pin).states) >= 2
    ind.close()

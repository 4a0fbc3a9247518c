"""The business date: the store's zone and cut-off hour, never the machine's zone."""

import datetime as dt

import pytest

from appliance.business_day import business_date, time_zone
from appliance.config import ConfigError, from_dict
from conftest import lane_dict

UTC = dt.timezone.utc


@pytest.mark.parametrize("utc,zone,cutoff,expected", [
    ("2026-11-29T15:59:59", "Asia/Shanghai", 0, "2026-11-29"),  # 23:59:59 in Beijing
    ("2026-11-29T16:00:00", "Asia/Shanghai", 0, "2026-11-30"),  # midnight in Beijing
    ("2026-11-29T17:30:00", "Asia/Shanghai", 2, "2026-11-29"),  # 01:30 before a 2 a.m. cut-off
    ("2026-11-29T18:00:00", "Asia/Shanghai", 2, "2026-11-30"),  # 02:00: the new day
    ("2026-11-29T23:30:00", "Asia/Shanghai", 23, "2026-11-29"),  # 07:30, the day began at 23:00 before
    ("2026-03-29T00:30:00", "Europe/Berlin", 2, "2026-03-28"),  # 01:30 CET, the night clocks go forward
    ("2026-03-29T01:00:00", "Europe/Berlin", 2, "2026-03-29"),  # 03:00 CEST: 02:00 never happened
    ("2026-10-24T23:30:00", "Europe/Berlin", 2, "2026-10-24"),  # 01:30 CEST, the night clocks go back
    ("2026-10-25T00:30:00", "Europe/Berlin", 2, "2026-10-25"),  # 02:30 CEST, the first 02:30: the new day
    ("2026-10-25T01:30:00", "Europe/Berlin", 2, "2026-10-25"),  # 02:30 CET, the second 02:30: the same day
])
def test_business_date(utc, zone, cutoff, expected):
    at = dt.datetime.fromisoformat(utc).replace(tzinfo=UTC)
    assert business_date(at, zone, cutoff) == dt.date.fromisoformat(expected)


def test_the_same_instant_in_any_offset_has_one_business_date():
    at = dt.datetime(2026, 11, 29, 16, 30, tzinfo=UTC)
    elsewhere = at.astimezone(dt.timezone(dt.timedelta(hours=-7)))
    assert business_date(at, "Asia/Shanghai", 0) == business_date(elsewhere, "Asia/Shanghai", 0)


def test_a_naive_time_is_refused():
    with pytest.raises(ValueError, match="aware"):
        business_date(dt.datetime(2026, 11, 29, 12, 0), "Asia/Shanghai", 0)


@pytest.mark.parametrize("terminal,key,reason", [
    ({"time_zone": "Mars/Olympus"}, "terminal.time_zone", "IANA time zone"),
    ({"time_zone": "../../etc/passwd"}, "terminal.time_zone", "IANA time zone"),
    ({"time_zone": ""}, "terminal.time_zone", "IANA time zone"),
    ({"day_cutoff_hour": 24}, "terminal.day_cutoff_hour", "between 0 and 23"),
    ({"day_cutoff_hour": -1}, "terminal.day_cutoff_hour", "between 0 and 23"),
])
def test_fail__bad_zone_or_hour_names_its_key(tmp_path, terminal, key, reason):
    with pytest.raises(ConfigError) as e:
        from_dict(lane_dict(tmp_path, terminal=terminal))
    assert e.value.key == key and reason in e.value.reason


def test_defaults_are_beijing_midnight(tmp_path):
    t = from_dict(lane_dict(tmp_path)).terminal
    assert (t.time_zone, t.day_cutoff_hour) == ("Asia/Shanghai", 0)
    assert time_zone("UTC") == "UTC"

"""The lane's business date: the store's day, in its own time zone, starting at its cut-off hour.

A shop that closes at 2 a.m. counts a payment at 01:30 on the 30th to the business day of the
29th (cut-off hour 2). Head office totals and reports by this date, so every lane of a store must
agree on it: it comes from `[terminal] time_zone` and `[terminal] day_cutoff_hour`, never from
the Pi's own time zone setting.

Hazard: the wall clock. A Pi without a battery clock starts with a stale time until NTP answers;
a payment journaled then gets a stale business date (its UTC timestamp is stale as well).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo


def time_zone(name: str) -> str:
    """Schema check: an IANA time zone this machine knows ("Asia/Shanghai"). Raises ValueError."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"must be an IANA time zone such as \"Asia/Shanghai\", got {name!r}") from None
    return name


def business_date(at: dt.datetime, zone: str, cutoff_hour: int) -> dt.date:
    """The business date of the aware instant `at` in the store's `zone`, whose day starts at
    `cutoff_hour` (0-23) local time. Raises ValueError for a naive `at`."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("business_date needs an aware datetime (a naive one has no instant)")
    local = at.astimezone(zoneinfo.ZoneInfo(zone))
    return (local - dt.timedelta(hours=cutoff_hour)).date()

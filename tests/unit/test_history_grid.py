"""The HOUR windows of an entitlement's history start where the query API's HOUR windows do: at each local
hour, in every zone, including Australia/Lord_Howe, whose DST change is half an hour (stepping 60 minutes
from one local midnight put its winter hours at local :30)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from control.service import window_grid

MINUTE = timedelta(minutes=1)
#: (zone, a UTC instant a day before one of its offset changes, or any day for a fixed offset).
CASES = [
    ("UTC", datetime(2026, 3, 1, tzinfo=UTC)),
    ("Asia/Kolkata", datetime(2026, 3, 1, tzinfo=UTC)),  # +05:30
    ("Asia/Kathmandu", datetime(2026, 3, 1, tzinfo=UTC)),  # +05:45
    ("America/New_York", datetime(2026, 3, 7, 12, tzinfo=UTC)),  # spring forward
    ("Europe/London", datetime(2026, 10, 24, 12, tzinfo=UTC)),  # fall back
    ("Australia/Lord_Howe", datetime(2026, 4, 3, 12, tzinfo=UTC)),  # fall back, +11 -> +10:30
    ("Australia/Lord_Howe", datetime(2026, 10, 2, 12, tzinfo=UTC)),  # spring forward, +10:30 -> +11
    ("Australia/Lord_Howe", datetime(2026, 7, 1, 0, 10, tzinfo=UTC)),  # winter, far from a change
    ("America/Caracas", datetime(2016, 4, 30, 12, tzinfo=UTC)),  # -04:30 -> -04:00
]


def query_api_hour_start(minute: datetime, zone: ZoneInfo) -> datetime:
    """The query API's HOUR window of a minute (sinks/clickhouse/reader.py): minus its local minute."""
    return minute - timedelta(minutes=minute.astimezone(zone).minute)


@pytest.mark.parametrize(("zone_name", "start"), CASES)
def test_hour_windows_start_at_local_hours(zone_name: str, start: datetime) -> None:
    zone = ZoneInfo(zone_name)
    end = start + timedelta(days=2, minutes=7)
    windows = window_grid(start, end, "HOUR", zone_name)
    assert windows[0][0] <= start and windows[-1][1] >= end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(windows))  # contiguous, no overlap
    starts = {w for w, _ in windows}
    for w_start, w_end in windows:
        local = w_start.astimezone(zone)
        assert (local.minute, local.second) == (0, 0), (zone_name, w_start, local)
        assert timedelta(minutes=30) <= w_end - w_start <= timedelta(minutes=90)
    # Every minute away from an offset change falls in the window the query API gives it.
    offsets = {}
    t = windows[0][0]
    while t < windows[-1][1]:
        offsets[t] = t.astimezone(zone).utcoffset()
        t += MINUTE
    changes = [m for m in offsets if m - MINUTE in offsets and offsets[m] != offsets[m - MINUTE]]
    checked = 0
    for minute in offsets:
        if any(abs(minute - c) < timedelta(hours=2) for c in changes):
            continue
        want = query_api_hour_start(minute, zone)
        assert want in starts, (zone_name, minute, want)
        checked += 1
    assert checked > 2000


def test_other_window_sizes_keep_their_grid() -> None:
    start = datetime(2026, 3, 7, 12, 30, tzinfo=UTC)
    days = window_grid(start, start + timedelta(days=3), "DAY", "America/New_York")
    assert [w.astimezone(ZoneInfo("America/New_York")).hour for w, _ in days] == [0, 0, 0, 0]
    assert days[1][1] - days[1][0] == timedelta(hours=23)  # the spring-forward day

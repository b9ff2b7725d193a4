"""Recurring periods (usage periods, grant recurrences), calendar-correct in an IANA time zone.

A period is an interval (``DAY``, ``WEEK``, ``MONTH``, ``YEAR`` or an ISO 8601 duration such as ``P2W``) and
an anchor. Boundary *k* is the anchor's local wall-clock time in the period's time zone plus *k* intervals,
counted on the local calendar: a monthly period anchored at 00:00 on the 1st in Europe/Budapest starts at
local midnight of every 1st, whether that is 22:00 or 23:00 UTC. Months are counted from the anchor, never
from the previous boundary, and a day that a month does not have is its last day (an anchor on the 31st
gives Jan 31, Feb 28, Mar 31, ...). A local time that does not exist (a DST gap) is read with the offset
before the gap, i.e. moved forward by the gap. The time part of a duration (``PT6H``) is absolute time.

Every boundary is a whole UTC minute (usage is stored in 1-minute windows): anchors are truncated to the
minute, and time zones' offsets are whole minutes.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

MINUTE: Final = timedelta(minutes=1)

_ISO: Final = re.compile(
    r"^P(?:(?P<y>\d+)Y)?(?:(?P<mo>\d+)M)?(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?"
    r"(?:T(?:(?P<h>\d+)H)?(?:(?P<mi>\d+)M)?(?:(?P<s>\d+)S)?)?$"
)
_NAMED: Final = {"DAY": "P1D", "WEEK": "P1W", "MONTH": "P1M", "YEAR": "P1Y"}


def truncate_minute(t: datetime) -> datetime:
    """``t`` in UTC, down to its minute."""
    return t.astimezone(UTC).replace(second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class Interval:
    """A calendar interval: months and days on the local calendar, then absolute minutes."""

    months: int = 0
    days: int = 0
    minutes: int = 0

    @classmethod
    def parse(cls, text: str) -> Interval:
        """``DAY``/``WEEK``/``MONTH``/``YEAR`` or an ISO 8601 duration of whole minutes, at least one hour.

        Raises:
            ValueError: anything else.
        """
        match = _ISO.match(_NAMED.get(text, text))
        if match is None or text in ("P", "PT"):
            raise ValueError(f"{text!r} is not DAY, WEEK, MONTH, YEAR or an ISO 8601 duration (e.g. P1M, P2W)")
        part = {k: int(v or 0) for k, v in match.groupdict().items()}
        if part["s"] % 60:
            raise ValueError(f"{text!r}: a period is whole minutes")
        interval = cls(
            months=12 * part["y"] + part["mo"],
            days=7 * part["w"] + part["d"],
            minutes=60 * part["h"] + part["mi"] + part["s"] // 60,
        )
        if interval.months == 0 and interval.days == 0 and interval.minutes < 60:
            raise ValueError(f"{text!r}: a period is at least one hour")
        return interval

    @property
    def name(self) -> str:
        """The API's name: ``MONTH`` etc. when it is one, else the ISO duration."""
        return {"P1D": "DAY", "P1W": "WEEK", "P1M": "MONTH", "P1Y": "YEAR"}.get(self.iso, self.iso)

    @property
    def iso(self) -> str:
        date = (f"{self.months // 12}Y" if self.months // 12 else "") + (
            f"{self.months % 12}M" if self.months % 12 else ""
        )
        if self.days:
            date += f"{self.days // 7}W" if self.days % 7 == 0 else f"{self.days}D"
        time = (f"{self.minutes // 60}H" if self.minutes // 60 else "") + (
            f"{self.minutes % 60}M" if self.minutes % 60 else ""
        )
        return "P" + date + (f"T{time}" if time else "")

    def approx(self) -> timedelta:
        """A lower bound of one interval's length (months of 28 days, days of 23 hours)."""
        return timedelta(days=28 * self.months) + timedelta(hours=23 * self.days) + timedelta(minutes=self.minutes)


def _add_months(local: datetime, months: int) -> datetime:
    month_index = local.year * 12 + local.month - 1 + months
    year, month = divmod(month_index, 12)
    day = min(local.day, calendar.monthrange(year, month + 1)[1])
    return local.replace(year=year, month=month + 1, day=day)


@dataclass(frozen=True, slots=True)
class RecurringPeriod:
    """Boundaries ``anchor + k × interval`` (k any integer) on the calendar of ``time_zone``."""

    interval: Interval
    anchor: datetime
    time_zone: str = "UTC"

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor", truncate_minute(self.anchor))

    def boundary(self, k: int) -> datetime:
        """Boundary number ``k`` (0 is the anchor), in UTC."""
        zone = ZoneInfo(self.time_zone)
        local = self.anchor.astimezone(zone).replace(tzinfo=None)
        if self.interval.months:
            local = _add_months(local, k * self.interval.months)
        if self.interval.days:
            local += timedelta(days=k * self.interval.days)
        start = local.replace(tzinfo=zone, fold=0).astimezone(UTC)
        return start + k * timedelta(minutes=self.interval.minutes)

    def index(self, t: datetime) -> int:
        """The ``k`` with ``boundary(k) <= t < boundary(k + 1)``."""
        k = int((t - self.anchor) / self.interval.approx())  # close: a few steps at most
        while self.boundary(k) > t:
            k -= 1
        while self.boundary(k + 1) <= t:
            k += 1
        return k

    def containing(self, t: datetime) -> tuple[datetime, datetime]:
        """The period ``[start, end)`` that ``t`` falls in."""
        k = self.index(t)
        return self.boundary(k), self.boundary(k + 1)

    def boundaries(self, after: datetime, until: datetime) -> list[datetime]:
        """Every boundary ``b`` with ``after < b <= until``, in order."""
        if until <= after:
            return []
        k = self.index(after) + 1
        out = []
        while (b := self.boundary(k)) <= until:
            out.append(b)
            k += 1
        return out

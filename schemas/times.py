"""Times in requests: RFC 3339 with an offset, as timezone-aware UTC (every API takes them so)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.problems import bad


def parse_time(field: str, value: Any, check: Callable[[datetime], datetime] | None = None) -> datetime:
    """An RFC 3339 date-time with an offset (``Z`` included), as a UTC datetime; a 400 naming ``field``
    otherwise. ``check`` (raising ValueError with the reason) vets the time as given, before it is
    converted."""
    if not isinstance(value, str):
        raise bad(field, "must be an RFC 3339 date-time string")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise bad(field, f"{value!r} is not an RFC 3339 date-time (e.g. 2025-01-01T00:00:00Z)") from None
    if parsed.tzinfo is None:
        raise bad(field, f"{value!r} has no UTC offset; add Z or +hh:mm")
    if check is not None:
        try:
            parsed = check(parsed)
        except ValueError as exc:
            raise bad(field, str(exc)) from None
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise bad(field, f"{value!r} is out of range") from None


def is_time_zone(name: str) -> bool:
    """Whether ``name`` is an IANA time zone the tz database here knows. (ZoneInfo raises OSError, not
    ZoneInfoNotFoundError, for a name too long to be a file name: that was a 500.)"""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def parse_time_zone(field: str, value: Any) -> str:
    """An IANA time zone name, as given; a 400 naming ``field`` otherwise."""
    if not isinstance(value, str) or not value:
        raise bad(field, "must be an IANA time zone name, e.g. Europe/Budapest")
    if not is_time_zone(value):
        raise bad(field, f"invalid time zone: {value[:100]}")
    return value

"""The CLI reads times as the API does: RFC 3339 with an offset; a time without one is refused, not taken
to be UTC."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import pytest

from meterstream.cli import _time


def test_times_with_an_offset_are_read_in_utc() -> None:
    assert _time("2025-01-01T00:00:00Z") == datetime(2025, 1, 1, tzinfo=UTC)
    assert _time("2025-01-01T01:00:00+01:00") == datetime(2025, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("value", ["2025-01-01T00:00:00", "2025-01-01", "yesterday"])
def test_a_time_without_an_offset_is_refused(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _time(value)

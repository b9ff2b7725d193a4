"""Usage of a subject per window, from Meterstream's meter queries, parsed exactly (Decimal, never float)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal

from meterstream_client._events import check_subject, format_time

#: Every built-in meter, in the order UsageWindow lists them.
METERS: Final = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "tokens_total",
    "cost_usd",
    "unpriced_requests",
)

WindowSize = Literal["MINUTE", "HOUR", "DAY", "MONTH"]


@dataclass(frozen=True, slots=True)
class UsageWindow:
    """A subject's usage in one window (and for one model, when grouped by model).

    Token counts follow Meterstream's convention: ``input_tokens`` includes cache reads and writes,
    ``output_tokens`` includes reasoning. ``cost_usd`` is exact; calls to models without a known price
    count in ``unpriced_requests`` and add no cost.
    """

    start: datetime
    end: datetime
    subject: str
    #: The model, when the query was grouped by model; None otherwise.
    model: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    tokens_total: int
    cost_usd: Decimal
    unpriced_requests: int


def query_params(
    subject: str,
    *,
    window: WindowSize | None,
    start: datetime | None,
    end: datetime | None,
    time_zone: str,
    by_model: bool,
) -> tuple[tuple[str, str], ...]:
    """The query string of one meter query for ``query_usage``."""
    check_subject(subject)
    if window is not None and window not in ("MINUTE", "HOUR", "DAY", "MONTH"):
        raise ValueError(f"window must be MINUTE, HOUR, DAY, MONTH or None, got {window!r}")
    if start is not None and end is not None and end <= start:
        raise ValueError("end must be after start")
    params: list[tuple[str, str]] = [("subject", subject), ("windowTimeZone", time_zone)]
    if window is not None:
        params.append(("windowSize", window))
    if start is not None:
        params.append(("from", format_time(start)))
    if end is not None:
        params.append(("to", format_time(end)))
    if by_model:
        params.append(("groupBy", "model"))
    return tuple(params)


def parse_rows(body: bytes | str) -> list[dict[str, Any]]:
    """The ``data`` rows of a MeterQueryResult, numbers as Decimal."""
    parsed = json.loads(body, parse_float=Decimal, parse_int=Decimal)
    rows = parsed.get("data") if isinstance(parsed, dict) else None
    if not isinstance(rows, list):
        raise ValueError("not a meter query result: no data array")
    return [row for row in rows if isinstance(row, dict)]


def merge(subject: str, rows_by_meter: Mapping[str, list[dict[str, Any]]]) -> list[UsageWindow]:
    """One UsageWindow per (window, model) found in any meter, zero where a meter had no row."""
    values: dict[tuple[str, str, str | None], dict[str, Decimal]] = {}
    for meter, rows in rows_by_meter.items():
        for row in rows:
            group = row.get("groupBy") or {}
            model = group.get("model") if isinstance(group, dict) else None
            key = (str(row["windowStart"]), str(row["windowEnd"]), model)
            values.setdefault(key, {})[meter] = Decimal(row["value"])
    windows = [
        UsageWindow(
            start=_parse_time(start),
            end=_parse_time(end),
            subject=subject,
            model=model,
            requests=_count(found, "requests"),
            input_tokens=_count(found, "input_tokens"),
            output_tokens=_count(found, "output_tokens"),
            cache_read_tokens=_count(found, "cache_read_tokens"),
            cache_write_tokens=_count(found, "cache_write_tokens"),
            reasoning_tokens=_count(found, "reasoning_tokens"),
            tokens_total=_count(found, "tokens_total"),
            cost_usd=found.get("cost_usd", Decimal(0)),
            unpriced_requests=_count(found, "unpriced_requests"),
        )
        for (start, end, model), found in values.items()
    ]
    return sorted(windows, key=lambda w: (w.start, w.model or ""))


def _count(found: Mapping[str, Decimal], meter: str) -> int:
    value = found.get(meter, Decimal(0))
    if value != value.to_integral_value():
        raise ValueError(f"meter {meter} returned a fractional count {value}")
    return int(value)


def _parse_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)

"""Meter query results as OpenMeter's v1 API returns them: JSON (``MeterQueryResult``) or CSV.

Values are exact: a cost is written as the decimal it is (``0.000000075``), not rounded through a float;
JSON numbers may carry any number of digits.
"""

from __future__ import annotations

import csv
import functools
import io
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import orjson

from schemas.money import format_usd
from schemas.query import MeterQuery, QueryRow


# Rows share their windows (every row of an unwindowed query has the same two): each is formatted once.
@functools.lru_cache(maxsize=4096)
def rfc3339(value: datetime, time_zone: str = "UTC") -> str:
    """RFC 3339 in the query's time zone (``Z`` for UTC), microseconds only when present."""
    local = value.astimezone(UTC) if time_zone == "UTC" else value.astimezone(ZoneInfo(time_zone))
    text = local.isoformat()
    return text.replace("+00:00", "Z") if time_zone == "UTC" else text


def number(value: Decimal) -> str:
    return format_usd(value)


def to_json(query: MeterQuery, rows: list[QueryRow]) -> bytes:
    tz = query.time_zone
    body: dict[str, object] = {}
    if query.start is not None:
        body["from"] = rfc3339(query.start)
    if query.end is not None:
        body["to"] = rfc3339(query.end)
    if query.window_size is not None:
        body["windowSize"] = query.window_size.value
    # A Fragment is written as it is: the exact decimal, never a float.
    body["data"] = [
        {
            "value": orjson.Fragment(number(row.value)),
            "windowStart": rfc3339(row.window_start, tz),
            "windowEnd": rfc3339(row.window_end, tz),
            "subject": row.group.get("subject"),
            "groupBy": {k: v for k, v in row.group.items() if k != "subject"},
        }
        for row in rows
    ]
    return orjson.dumps(body)


def to_csv(query: MeterQuery, rows: list[QueryRow]) -> str:
    """Columns as OpenMeter's: window_start, window_end, subject, customer_name, customer_email, the
    group-by keys (subject excluded), value."""
    keys = [k for k in query.group_by if k != "subject"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["window_start", "window_end", "subject", "customer_name", "customer_email", *keys, "value"])
    for row in rows:
        writer.writerow(
            [
                rfc3339(row.window_start, query.time_zone),
                rfc3339(row.window_end, query.time_zone),
                row.group.get("subject") or "",
                "",
                "",
                *(row.group.get(k, "") for k in keys),
                number(row.value),
            ]
        )
    return out.getvalue()


def wants_csv(accept: str | None) -> bool:
    """CSV when the client prefers ``text/csv`` to JSON."""
    if not accept:
        return False
    ranked: list[tuple[float, int, str]] = []
    for position, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranked.append((-q, position, media.lower()))
    for _, _, media in sorted(ranked):
        if media == "text/csv":
            return True
        if media in ("application/json", "application/*", "*/*"):
            return False
    return False

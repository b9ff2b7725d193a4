"""Ground truth, computed from what a test sent, independently of Meterstream's code: prices straight from
genai-prices (``extract_usage`` + ``calc_price``), windows with ``zoneinfo``, sums with Decimal."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from genai_prices import Usage, calc_price, extract_usage

#: Meter slug -> what one event contributes.
METER_FIELDS = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cache_read_tokens": "cache_read_tokens",
    "cache_write_tokens": "cache_write_tokens",
    "reasoning_tokens": "output_reasoning_tokens",
}

#: Provider aliases a test may send -> genai-prices provider id (what queries group by).
PROVIDER_IDS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "google": "google",
    "gemini": "google",
    "aws": "aws",
}


@dataclass(frozen=True)
class Sent:
    """One event a test sent (the first time: resends are not listed again)."""

    id: str
    source: str
    subject: str
    time: datetime
    provider: str
    model: str
    counts: Mapping[str, int]
    cost: Decimal | None

    def value(self, meter: str) -> Decimal:
        if meter == "requests":
            return Decimal(1)
        if meter == "tokens_total":
            return Decimal(self.counts.get("input_tokens", 0) + self.counts.get("output_tokens", 0))
        if meter == "cost_usd":
            return self.cost if self.cost is not None else Decimal(0)
        if meter == "unpriced_requests":
            return Decimal(1 if self.cost is None else 0)
        return Decimal(self.counts.get(METER_FIELDS[meter], 0))


def price(
    provider: str,
    model: str,
    time: datetime,
    counts: Mapping[str, int],
    context: Mapping[str, str] | None = None,
) -> Decimal | None:
    try:
        return calc_price(
            Usage(**counts),
            model,
            provider_id=provider,
            genai_request_timestamp=time,
            price_context=context or None,
        ).total_price
    except LookupError:
        return None


def sent_from_canonical(event: Mapping[str, Any]) -> Sent:
    data = event["data"]
    counts = {k: v for k, v in data.items() if k.endswith("_tokens")}
    if "reasoning_tokens" in counts:
        counts["output_reasoning_tokens"] = counts.pop("reasoning_tokens")
    time = datetime.fromisoformat(event["time"]).astimezone(UTC)
    return Sent(
        event["id"],
        event["source"],
        event["subject"],
        time,
        PROVIDER_IDS.get(data["provider"], data["provider"]),
        data["model"],
        counts,
        price(data["provider"], data["model"], time, counts),
    )


def sent_from_provider_usage(
    event: Mapping[str, Any], response: Mapping[str, Any], api_flavor: str = "default"
) -> Sent:
    """An event whose data carries a provider's raw usage; ``response`` is the provider's response body."""
    data = event["data"]
    extracted = extract_usage(response, provider_id=data["provider"], api_flavor=api_flavor)
    counts = {k: int(v) for k, v in extracted.usage.__dict__.items() if v is not None}
    time = datetime.fromisoformat(event["time"]).astimezone(UTC)
    return Sent(
        event["id"],
        event["source"],
        event["subject"],
        time,
        extracted.provider.id,
        data["model"],
        counts,
        price(data["provider"], data["model"], time, counts),
    )


def _bucket(t: datetime, window: str | None, zone: str) -> tuple[datetime, datetime]:
    tz = ZoneInfo(zone)
    if window == "MINUTE":
        start = t.replace(second=0, microsecond=0)
        return start, start + timedelta(minutes=1)
    local = t.astimezone(tz)
    if window == "HOUR":
        # The local hour at the minute's own UTC offset: where a change falls inside a local hour (Chatham's at
        # 03:45, Lord Howe's 30 minutes), re-resolving the hour's start in the zone would give a window that does
        # not hold the minute.
        fixed = local.replace(minute=0, second=0, microsecond=0, tzinfo=timezone(local.utcoffset() or timedelta()))
        start = fixed.astimezone(UTC)
        assert start <= t < start + timedelta(hours=1), (t, zone)
        return start, start + timedelta(hours=1)
    if window == "DAY":
        day = local.date()
        start = datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)
        nxt = day + timedelta(days=1)
        return start, datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).astimezone(UTC)
    if window == "MONTH":
        start = datetime(local.year, local.month, 1, tzinfo=tz)
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        return start.astimezone(UTC), datetime(year, month, 1, tzinfo=tz).astimezone(UTC)
    raise AssertionError(window)


Key = tuple[datetime, datetime, str | None, tuple[tuple[str, str], ...]]


def expected(
    events: Iterable[Sent],
    meter: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    window: str | None = None,
    zone: str = "UTC",
    group_by: Sequence[str] = (),
    subjects: Sequence[str] = (),
    include: Mapping[str, Sequence[str]] | None = None,
) -> dict[Key, Decimal]:
    """What a meter query must answer, as {(windowStart, windowEnd, subject, groupBy items): value}."""
    group = list(group_by)
    if subjects and "subject" not in group:
        group.append("subject")
    totals: dict[tuple[Any, ...], Decimal] = defaultdict(Decimal)
    spans: dict[tuple[Any, ...], list[datetime]] = {}
    for e in events:
        if start is not None and e.time < start:
            continue
        if end is not None and e.time >= end:
            continue
        if subjects and e.subject not in subjects:
            continue
        dims = {"subject": e.subject, "provider": e.provider, "model": e.model}
        if include and any(dims[k] not in v for k, v in include.items()):
            continue
        subject = e.subject if "subject" in group else None
        others = tuple(sorted((k, dims[k]) for k in group if k != "subject"))
        if window is None:
            key = (subject, others)
            minute = e.time.replace(second=0, microsecond=0)
            lo_hi = spans.setdefault(key, [minute, minute])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], minute), max(lo_hi[1], minute)
            totals[key] += e.value(meter)
        else:
            ws, we = _bucket(e.time, window, zone)
            totals[(ws, we, subject, others)] += e.value(meter)
    if window is None:
        return {
            (start or spans[k][0], end or spans[k][1] + timedelta(minutes=1), k[0], k[1]): v for k, v in totals.items()
        }
    return dict(totals)


def parse_json(body: str) -> dict[Key, Decimal]:
    """A MeterQueryResult (values parsed exactly) in the same shape as ``expected``."""
    result = json.loads(body, parse_float=Decimal, parse_int=Decimal)
    out: dict[Key, Decimal] = {}
    for row in result["data"]:
        key = (
            datetime.fromisoformat(row["windowStart"]).astimezone(UTC),
            datetime.fromisoformat(row["windowEnd"]).astimezone(UTC),
            row["subject"],
            tuple(sorted(row["groupBy"].items())),
        )
        assert key not in out, f"duplicate row {key}"
        out[key] = row["value"]
    return out


def parse_csv(text: str, group_by: Sequence[str]) -> dict[Key, Decimal]:
    rows = list(csv.DictReader(io.StringIO(text)))
    out: dict[Key, Decimal] = {}
    others = [g for g in group_by if g != "subject"]
    for row in rows:
        key = (
            datetime.fromisoformat(row["window_start"]).astimezone(UTC),
            datetime.fromisoformat(row["window_end"]).astimezone(UTC),
            row["subject"] or None,
            tuple(sorted((k, row[k]) for k in others)),
        )
        out[key] = Decimal(row["value"])
    return out

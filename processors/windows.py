"""From one events record to one windows record: price, bucket into 1-minute windows, sum. Pure logic.

A record's output depends only on the record and the price data, never on what came before it, except for
the recent-keys cache, which only ever removes events already counted elsewhere. That is what lets the sink
apply each source offset exactly once: a replayed record yields the same output, or one without the
duplicates the sink would remove anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Final

import orjson

from processors.pricing import Price, Pricer
from schemas.money import from_atto
from schemas.records import (
    RECORD_VERSION,
    AcceptedEvent,
    AuditRow,
    DeadLetterRecord,
    EventsRecord,
    EventStatus,
    WindowDelta,
    WindowsRecord,
)

log = logging.getLogger(__name__)

WINDOW_US: Final = 60_000_000
_COUNT_FIELDS: Final = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
    "unpriced_requests",
)


@dataclass(slots=True)
class _Window:
    counts: list[int] = field(default_factory=lambda: [0] * len(_COUNT_FIELDS))
    cost_atto: int = 0


@dataclass(frozen=True, slots=True)
class Output:
    """What one events record turns into."""

    windows: WindowsRecord
    dead_letters: list[DeadLetterRecord]
    #: (source, id) of every event this record stores, for the recent-keys cache once it is acknowledged.
    keys: list[tuple[str, str]]
    duplicates: int
    unpriced: int


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    usage_event_type: str
    #: Events whose event time is more than this before their receive time are dead-lettered.
    allowed_lateness_us: int


def window_start_s(time_us: int) -> int:
    """Start of the 1-minute UTC window holding ``time_us``, in seconds since the epoch."""
    return (time_us // WINDOW_US) * 60


def process_record(
    record: EventsRecord,
    *,
    topic_id: str,
    partition: int,
    offset: int,
    policy: WindowPolicy,
    pricer: Pricer,
    known: Container[tuple[str, str]] | None = None,
) -> Output:
    """Price and aggregate one events record. ``known`` holds (source, id) keys already counted; events
    with those keys (or repeated inside this record) are dropped as duplicates."""
    windows: dict[tuple[str, str, str, int], _Window] = {}
    audit: list[AuditRow] = []
    dead: list[DeadLetterRecord] = []
    keys: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    duplicates = unpriced = 0
    for index, event in enumerate(record["events"]):
        key = (event["source"], event["id"])
        if key in seen or (known is not None and key in known):
            duplicates += 1
            continue
        seen.add(key)
        keys.append(key)
        status: EventStatus
        if event["type"] != policy.usage_event_type or "usage" not in event:
            status = "not_metered"
            price: Price | str | None = None
        elif event["received_us"] - event["time_us"] > policy.allowed_lateness_us:
            status = "late"
            price = None
            dead.append(
                {
                    "reason": "later than the allowed lateness",
                    "topic_id": topic_id,
                    "partition": partition,
                    "offset": offset,
                    "event": event,
                }
            )
        else:
            status = "counted"
            result = pricer.price(
                event["provider"],
                event["model"],
                event["time_us"],
                event["usage"],
                event.get("price_context"),
            )
            price = result if isinstance(result, Price) else result.reason
            _add(windows, event, price)
            if not isinstance(price, Price):
                unpriced += 1
        audit.append(_audit_row(index, event, status, price))
    output: WindowsRecord = {
        "v": RECORD_VERSION,
        "topic_id": topic_id,
        "partition": partition,
        "offset": offset,
        "windows": [_delta(k, w) for k, w in windows.items()],
        "events": audit,
    }
    return Output(output, dead, keys, duplicates, unpriced)


def _add(windows: dict[tuple[str, str, str, int], _Window], event: AcceptedEvent, price: Price | str) -> None:
    key = (event["subject"], event["provider"], event["model"], window_start_s(event["time_us"]))
    window = windows.get(key)
    if window is None:
        window = windows[key] = _Window()
    usage = event["usage"]
    counts = window.counts
    input_tokens = usage.get("input_tokens", 0)
    output_tokens = usage.get("output_tokens", 0)
    counts[0] += 1
    counts[1] += input_tokens
    counts[2] += output_tokens
    counts[3] += usage.get("cache_read_tokens", 0)
    counts[4] += usage.get("cache_write_tokens", 0)
    counts[5] += usage.get("output_reasoning_tokens", 0)
    counts[6] += input_tokens + output_tokens
    if isinstance(price, Price):
        window.cost_atto += price.total_atto
    else:
        counts[7] += 1


def _delta(key: tuple[str, str, str, int], window: _Window) -> WindowDelta:
    subject, provider, model, start = key
    c = window.counts
    return {
        "subject": subject,
        "provider": provider,
        "model": model,
        "window_start": start,
        "requests": c[0],
        "input_tokens": c[1],
        "output_tokens": c[2],
        "cache_read_tokens": c[3],
        "cache_write_tokens": c[4],
        "reasoning_tokens": c[5],
        "total_tokens": c[6],
        "unpriced_requests": c[7],
        "cost_usd": format(from_atto(window.cost_atto), "f"),
    }


def _audit_row(index: int, event: AcceptedEvent, status: EventStatus, price: Price | str | None) -> AuditRow:
    usage = event.get("usage", {})
    return {
        "index": index,
        "id": event["id"],
        "source": event["source"],
        "subject": event["subject"],
        "type": event["type"],
        "time_us": event["time_us"],
        "received_us": event["received_us"],
        "data": orjson.dumps(event["data"]).decode(),
        "provider": event.get("provider", ""),
        "model": event.get("model", ""),
        "input_tokens": usage.get("input_tokens", 0),
        "output_tokens": usage.get("output_tokens", 0),
        "cache_read_tokens": usage.get("cache_read_tokens", 0),
        "cache_write_tokens": usage.get("cache_write_tokens", 0),
        "reasoning_tokens": usage.get("output_reasoning_tokens", 0),
        "usage": usage,
        "cost_usd": format(price.total_usd, "f") if isinstance(price, Price) else None,
        "cost_input_usd": format(price.input_usd, "f") if isinstance(price, Price) else None,
        "cost_output_usd": format(price.output_usd, "f") if isinstance(price, Price) else None,
        "price_source": price.source if isinstance(price, Price) else (price or ""),
        "status": status,
    }

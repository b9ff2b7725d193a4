"""From one events record to one windows record: price, bucket into 1-minute windows, sum. Pure logic.

A record's output depends only on the record and the price data, never on what came before it, except for
the recent-keys cache, which only ever removes events already counted elsewhere. That is what lets the sink
apply each source offset exactly once: a replayed record yields the same output, or one without the
duplicates the sink would remove anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Container
from dataclasses import dataclass
from typing import Any, Final

import orjson

from processors.pricing import Price, Pricer
from schemas.records import (
    BIG_AMOUNTS_VERSION,
    INT64_MAX,
    RECORD_VERSION,
    AcceptedEvent,
    AuditColumns,
    DeadLetterRecord,
    EventsRecord,
    EventStatus,
    WindowDelta,
    WindowsRecord,
    atto,
    wire_atto,
)

log = logging.getLogger(__name__)

WINDOW_US: Final = 60_000_000


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
    # The hot path of the processor (every event passes here once): one loop that decides, prices and
    # sums, then the audit columns built by comprehensions, which cost a fraction of per-event appends.
    windows: dict[tuple[str, str, str, int], list[int]] = {}
    kept: list[AcceptedEvent] = []
    indexes: list[int] = []
    statuses: list[EventStatus] = []
    prices: list[Price | None] = []
    reasons: list[str] = []
    dead: list[DeadLetterRecord] = []
    seen: set[tuple[str, str]] = set()
    duplicates = unpriced = 0
    lateness = policy.allowed_lateness_us
    price_of = pricer.price
    for index, event in enumerate(record["events"]):
        key = (event["source"], event["id"])
        if key in seen or (known is not None and key in known):
            duplicates += 1
            continue
        seen.add(key)
        kept.append(event)
        indexes.append(index)
        price: Price | None = None
        reason = ""
        usage = event.get("usage")
        # Ingest gives usage to the events the LLM meters count (the usage event type, LiteLLM's).
        if usage is None:
            status: EventStatus = "not_metered"
        elif event["received_us"] - event["time_us"] > lateness:
            status = "late"
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
            result = price_of(event["provider"], event["model"], event["time_us"], usage, event.get("price_context"))
            if isinstance(result, Price):
                price = result
            else:
                reason = result.reason
                unpriced += 1
            window_key = (event["subject"], event["provider"], event["model"], (event["time_us"] // WINDOW_US) * 60)
            totals = windows.get(window_key)
            if totals is None:
                totals = windows[window_key] = [0] * 9
            input_tokens = usage.get("input_tokens", 0)
            output_tokens = usage.get("output_tokens", 0)
            totals[0] += 1
            totals[1] += input_tokens
            totals[2] += output_tokens
            totals[3] += usage.get("cache_read_tokens", 0)
            totals[4] += usage.get("cache_write_tokens", 0)
            totals[5] += usage.get("output_reasoning_tokens", 0)
            totals[6] += input_tokens + output_tokens
            if price is None:
                totals[7] += 1
            else:
                totals[8] += price.total_atto
        statuses.append(status)
        prices.append(price)
        reasons.append(reason)
    usages = [event.get("usage") or {} for event in kept]
    audit: AuditColumns = {
        "index": indexes,
        "id": [e["id"] for e in kept],
        "source": [e["source"] for e in kept],
        "subject": [e["subject"] for e in kept],
        "type": [e["type"] for e in kept],
        "time_us": [e["time_us"] for e in kept],
        "received_us": [e["received_us"] for e in kept],
        "data": [e["data"] for e in kept],
        "provider": [e.get("provider", "") for e in kept],
        "model": [e.get("model", "") for e in kept],
        "input_tokens": [u.get("input_tokens", 0) for u in usages],
        "output_tokens": [u.get("output_tokens", 0) for u in usages],
        "cache_read_tokens": [u.get("cache_read_tokens", 0) for u in usages],
        "cache_write_tokens": [u.get("cache_write_tokens", 0) for u in usages],
        "reasoning_tokens": [u.get("output_reasoning_tokens", 0) for u in usages],
        "usage": [orjson.dumps(u).decode() for u in usages],
        "cost_atto": [p.total_atto if p else None for p in prices],
        "cost_input_atto": [p.input_atto if p else None for p in prices],
        "cost_output_atto": [p.output_atto if p else None for p in prices],
        "price_source": [p.source if p else r for p, r in zip(prices, reasons, strict=True)],
        "status": statuses,
    }
    output: WindowsRecord = {
        "v": RECORD_VERSION,
        "topic_id": topic_id,
        "partition": partition,
        "offset": offset,
        "windows": [_delta(k, w) for k, w in windows.items()],
        "events": audit,
    }
    # Costs are never negative and an event's is part of its window's: if no window's total fits past 64
    # bits, no amount of the record does (the common case: checked once per window, not per amount).
    if any(w[8] > INT64_MAX for w in windows.values()):
        _with_big_amounts(output)
    keys = list(zip(audit["source"], audit["id"], strict=True))
    return Output(output, dead, keys, duplicates, unpriced)


def _with_big_amounts(output: WindowsRecord) -> None:
    """Amounts past 64 bits as decimal strings, in a record of the version that says so."""
    output["v"] = BIG_AMOUNTS_VERSION
    for delta in output["windows"]:
        delta["cost_atto"] = wire_atto(atto(delta["cost_atto"]))
    audit = output["events"]
    for name in ("cost_atto", "cost_input_atto", "cost_output_atto"):
        column = audit[name]
        audit[name] = [None if a is None else wire_atto(atto(a)) for a in column]


def _delta(key: tuple[str, str, str, int], c: list[int]) -> WindowDelta:
    subject, provider, model, start = key
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
        "cost_atto": c[8],
    }


def failed_output(value: bytes, *, topic_id: str, partition: int, offset: int, reason: str) -> Output:
    """The output of an events record that cannot be processed (undecodable, of a version this release
    does not read, or making the processing fail): every event it holds that looks like one is in the
    audit log with status "failed" and in the dead-letter topic with ``reason``; a record without any
    goes to the dead-letter topic whole. The output keeps the sink's offset chain unbroken, adds nothing
    to any window, and claims no key as stored (the same events sent again, once fixed, count)."""
    events: list[Any] = []
    try:
        candidates = orjson.loads(value).get("events", [])
        events = [e for e in candidates if isinstance(e, dict) and _looks_like_event(e)]
    except (ValueError, AttributeError, TypeError):
        pass
    dead: list[DeadLetterRecord] = [
        {"reason": reason, "topic_id": topic_id, "partition": partition, "offset": offset, "event": e} for e in events
    ]
    if not events:
        raw = value.decode("utf-8", errors="replace")
        dead = [{"reason": reason, "topic_id": topic_id, "partition": partition, "offset": offset, "raw": raw}]
    n = len(events)
    audit: AuditColumns = {
        "index": list(range(n)),
        "id": [e["id"] for e in events],
        "source": [e["source"] for e in events],
        "subject": [e["subject"] for e in events],
        "type": [e["type"] for e in events],
        "time_us": [e["time_us"] for e in events],
        "received_us": [e["received_us"] for e in events],
        "data": [e["data"] for e in events],
        "provider": [str(e.get("provider", "")) for e in events],
        "model": [str(e.get("model", "")) for e in events],
        "input_tokens": [0] * n,
        "output_tokens": [0] * n,
        "cache_read_tokens": [0] * n,
        "cache_write_tokens": [0] * n,
        "reasoning_tokens": [0] * n,
        "usage": ["{}"] * n,
        "cost_atto": [None] * n,
        "cost_input_atto": [None] * n,
        "cost_output_atto": [None] * n,
        "price_source": [reason[:500]] * n,
        "status": ["failed"] * n,
    }
    record: WindowsRecord = {
        "v": RECORD_VERSION,
        "topic_id": topic_id,
        "partition": partition,
        "offset": offset,
        "windows": [],
        "events": audit,
    }
    return Output(record, dead, [], 0, 0)


_EVENT_FIELDS: Final = {"id": str, "source": str, "subject": str, "type": str, "data": str}


def _looks_like_event(event: dict[str, object]) -> bool:
    """Whether the audit log can hold ``event`` (its identity, times and data have the right types)."""
    return all(isinstance(event.get(name), kind) for name, kind in _EVENT_FIELDS.items()) and all(
        isinstance(event.get(name), int) and not isinstance(event.get(name), bool)
        for name in ("time_us", "received_us")
    )

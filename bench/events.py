"""Realistic usage events for the benchmarks: many subjects, five models of three providers, canonical
usage with cache reads, times within the last hour (well inside the allowed lateness), so that pricing
and windowing do real work.

Two shapes: CloudEvents request bodies for ingest (pre-encoded templates whose ids are filled in per
request, so that every event is new and none is dropped as a duplicate), and the records ingest writes to
the events topic (:class:`schemas.records.EventsRecord`), for pre-filling it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from schemas.records import RECORD_VERSION, AcceptedEvent, EventsRecord, encode
from schemas.topics import partition_for

#: (provider, model): all priced by genai-prices, with different price shapes.
MODELS: Final = (
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4o"),
    ("anthropic", "claude-sonnet-4-20250514"),
    ("anthropic", "claude-3-5-haiku-20241022"),
    ("google", "gemini-2.0-flash"),
)
SOURCE: Final = "bench-app"
USAGE_TYPE: Final = "llm.usage"
_ID: Final = b"@@ID@@"


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def usage(rng: random.Random) -> dict[str, int]:
    """Canonical counts: input includes cache reads; about half the calls read from the cache."""
    prompt = rng.randint(50, 20_000)
    cached = rng.choice((0, rng.randint(0, prompt)))
    return {"input_tokens": prompt, "cache_read_tokens": cached, "output_tokens": rng.randint(1, 4_000)}


def cloudevent(rng: random.Random, event_id: str, subject: str, when: datetime) -> dict[str, Any]:
    provider, model = rng.choice(MODELS)
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": SOURCE,
        "type": USAGE_TYPE,
        "subject": subject,
        "time": iso(when),
        "data": {"provider": provider, "model": model, **usage(rng)},
    }


@dataclass(frozen=True)
class BodyTemplate:
    """A request body with a hole for each event's id: ``render(ids)`` gives the bytes to send."""

    segments: tuple[bytes, ...]
    content_type: str
    events: int

    def render(self, ids: list[bytes]) -> bytes:
        parts: list[bytes] = [b""] * (2 * len(ids) + 1)
        parts[0::2] = self.segments
        parts[1::2] = ids
        return b"".join(parts)


def body_templates(
    count: int, events_per_body: int, *, subjects: int, seed: int, span_s: float = 3600.0
) -> list[BodyTemplate]:
    """``count`` different request bodies of ``events_per_body`` events each (one event: a single
    ``application/cloudevents+json`` event; more: a ``cloudevents-batch+json`` array)."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    templates = []
    for _ in range(count):
        events = [
            cloudevent(
                rng,
                _ID.decode(),
                f"user-{rng.randrange(subjects):05d}",
                now - timedelta(seconds=rng.random() * span_s),
            )
            for _ in range(events_per_body)
        ]
        single = events_per_body == 1
        body = orjson.dumps(events[0] if single else events)
        templates.append(
            BodyTemplate(
                tuple(body.split(_ID)),
                "application/cloudevents+json" if single else "application/cloudevents-batch+json",
                events_per_body,
            )
        )
    return templates


def accepted_templates(count: int, *, subjects: int, seed: int, span_s: float = 3600.0) -> list[AcceptedEvent]:
    """``count`` events exactly as ingest hands them to the processor: made by ingest's own parser (so the
    benchmark follows the wire format wherever it goes), from CloudEvents with times in the last hour."""
    from ingest.parsing import IngestPolicy, parse_request

    rng = random.Random(seed)
    now = datetime.now(UTC)
    policy = IngestPolicy(usage_event_type=USAGE_TYPE, max_batch_events=1000, max_future=timedelta(hours=1))
    events: list[AcceptedEvent] = []
    while len(events) < count:
        n = min(1000, count - len(events))
        batch = [
            cloudevent(rng, f"t-{len(events) + i}", f"user-{rng.randrange(subjects):05d}",
                       now - timedelta(seconds=rng.random() * span_s))
            for i in range(n)
        ]  # fmt: skip
        headers = {"content-type": "application/cloudevents-batch+json"}
        events.extend(parse_request(headers, orjson.dumps(batch), policy, now))
    return events


def events_records(
    total: int, *, partitions: int, subjects: int, per_request: int, seed: int, prefix: str = "pf"
) -> Iterator[tuple[int, bytes, int]]:
    """``(partition, value, events)`` records of ``total`` events, as ingest would write them for
    requests of ``per_request`` events: one record per partition per request. Events are copies of
    20,000 parsed templates (subjects, models, usage and times vary) with fresh ids."""
    templates = accepted_templates(min(total, 20_000), subjects=subjects, seed=seed)
    made = 0
    while made < total:
        n = min(per_request, total - made)
        grouped: dict[int, list[AcceptedEvent]] = {}
        for i in range(made, made + n):
            event = templates[i % len(templates)].copy()
            event["id"] = f"{prefix}-{i}"
            grouped.setdefault(partition_for(event["subject"], partitions), []).append(event)
        for partition, events in grouped.items():
            record: EventsRecord = {"v": RECORD_VERSION, "events": events}
            yield partition, encode(record), len(events)
        made += n

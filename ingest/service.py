"""The ingest use case: validate, drop known duplicates, group by partition, produce, then answer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from prometheus_client import Counter, Histogram

from ingest.parsing import IngestPolicy, parse_request
from schemas.recent import RecentKeys
from schemas.records import RECORD_VERSION, AcceptedEvent, EventsRecord, encode
from schemas.settings import IngestSettings
from schemas.topics import partition_for

log = logging.getLogger(__name__)

ACCEPTED = Counter("meterstream_ingest_events_accepted_total", "Events accepted (answered 204)")
REJECTED = Counter("meterstream_ingest_requests_rejected_total", "Requests rejected", ["reason"])
#: Rejection reasons by HTTP status, for the metric.
REASONS = {400: "invalid", 413: "too_large", 415: "unsupported_media_type", 503: "broker_unavailable"}
DUPLICATES = Counter(
    "meterstream_ingest_duplicates_total",
    "Events dropped at ingest as already acknowledged (same source, id)",
)
PRODUCED = Counter("meterstream_ingest_events_produced_total", "Events acknowledged by the broker")
PRODUCE_SECONDS = Histogram(
    "meterstream_ingest_produce_seconds",
    "Time from produce to broker acknowledgement, per request",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

#: A record is split when its encoding grows past this (the broker's default limit is 1 MiB).
MAX_RECORD_BYTES = 900_000


class Producer(Protocol):
    def partitions(self) -> int: ...

    async def send(self, records: Sequence[tuple[int, bytes]], timestamp_ms: int) -> list[int]: ...


class IngestService:
    """Accepts ingest requests. A 204 means every event of the request is in Kafka (or was already)."""

    def __init__(
        self, settings: IngestSettings, producer: Producer, clock: Callable[[], datetime] | None = None
    ) -> None:
        self._policy = IngestPolicy(
            usage_event_type=settings.usage_event_type,
            litellm_event_type=settings.litellm_event_type,
            max_batch_events=settings.max_batch_events,
            max_future=timedelta(seconds=settings.max_future_s),
        )
        self._producer = producer
        self._clock = clock or (lambda: datetime.now(UTC))
        # (source, id) of events the broker acknowledged. Only an optimisation: the sink's check against
        # the audit log is what guarantees an event is counted once.
        self._recent: RecentKeys[tuple[str, str], None] = RecentKeys(settings.recent_keys)

    async def ingest(self, headers: Mapping[str, str], body: bytes) -> int:
        """Validate and produce one request's events; returns how many were new.

        Raises:
            schemas.problems.Problem: 4xx for invalid input.
            BrokerUnavailable: nothing can be promised; the caller answers 503.
        """
        now = self._clock()
        events = parse_request(headers, body, self._policy, now)
        fresh = self._drop_known(events)
        partitions = self._producer.partitions()
        grouped: dict[int, list[AcceptedEvent]] = {}
        for event in fresh:
            grouped.setdefault(partition_for(event["subject"], partitions), []).append(event)
        records = [(p, value) for p, events_of_p in grouped.items() for value in _encode_split(events_of_p)]
        with PRODUCE_SECONDS.time():
            await self._producer.send(records, timestamp_ms=int(now.timestamp() * 1000))
        # Remember only after the acknowledgement: a key claimed before the write could make a retry of a
        # failed request count zero times (OpenMeter's dedupe bug).
        for event in fresh:
            self._recent.add((event["source"], event["id"]), None)
        PRODUCED.inc(len(fresh))
        ACCEPTED.inc(len(events))
        return len(fresh)

    def _drop_known(self, events: list[AcceptedEvent]) -> list[AcceptedEvent]:
        fresh: list[AcceptedEvent] = []
        seen: set[tuple[str, str]] = set()
        for event in events:
            key = (event["source"], event["id"])
            if key in seen or key in self._recent:
                DUPLICATES.inc()
                continue
            seen.add(key)
            fresh.append(event)
        return fresh


def _encode_split(events: list[AcceptedEvent]) -> list[bytes]:
    """One record for the events, or several if the encoding is too large for one."""
    record: EventsRecord = {"v": RECORD_VERSION, "events": events}
    value = encode(record)
    if len(value) <= MAX_RECORD_BYTES or len(events) == 1:
        return [value]
    half = len(events) // 2
    return _encode_split(events[:half]) + _encode_split(events[half:])

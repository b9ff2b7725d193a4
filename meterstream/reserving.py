"""Wiring of reservations (the ingest path and the pricer, as the control plane's reservations need them)
and of alerts (the evaluator and the webhook sender, run beside the app).

Commits record their usage as ordinary usage events through the very code ingest runs (validation,
dedupe by (source, id), a producer that answers only after the broker acknowledged), and are priced by the
processor's pricer, so a committed amount is what the windows will count.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from control.alerts.delivery import Deliverer
from control.alerts.service import AlertService
from control.holds import AcceptedUsage, EmitFailed, ReservationService
from control.sizing import Rates
from control.webhooks.sender import WebhookSender
from ingest.parsing import STRUCTURED, IngestPolicy, parse_request
from ingest.producer import BrokerUnavailable, EventProducer
from meterstream.runtime import background
from processors.pricing import Price, Pricer
from schemas.events import to_micros
from schemas.records import RECORD_VERSION, AcceptedEvent, encode
from schemas.topics import partition_for
from sinks.clickhouse.reader import MeterReader
from sinks.consumer import Sink

_HEADERS = {"content-type": STRUCTURED}


class IngestUsageEvents:
    """Commits' usage events, checked exactly as ``POST /api/v1/events`` checks them and produced with the
    same producer settings (acknowledged by every in-sync replica before ``emit`` returns)."""

    def __init__(self, policy: IngestPolicy, producer: EventProducer, topic_id: str) -> None:
        self._policy = policy
        self._producer = producer
        self._topic_id = topic_id

    def _accepted(self, event: Mapping[str, Any]) -> AcceptedEvent:
        (record,) = parse_request(_HEADERS, orjson.dumps(event), self._policy, datetime.now(UTC))
        return record

    def accept(self, event: Mapping[str, Any]) -> AcceptedUsage:
        record = self._accepted(event)
        return AcceptedUsage(
            provider=record["provider"],
            model=record["model"],
            usage=record.get("usage") or {},
            price_context=record.get("price_context") or {},
        )

    async def emit(self, event: Mapping[str, Any]) -> tuple[str, int, int]:
        """Produce the event (again, if it was sent before: the pipeline drops the copy by its id) and
        return exactly where the broker stored it."""
        record = self._accepted(event)
        now = datetime.now(UTC)
        try:
            partition = partition_for(record["subject"], self._producer.partitions())
            value = encode({"v": RECORD_VERSION, "events": [record]})
            (offset,) = await self._producer.send([(partition, value)], timestamp_ms=int(now.timestamp() * 1000))
        except BrokerUnavailable as exc:
            raise EmitFailed(str(exc)) from exc
        return self._topic_id, partition, offset


class PricerRates:
    """The processor's pricer, for commits (what a call cost) and reserves (the highest rates)."""

    def __init__(self, pricer: Pricer) -> None:
        self._pricer = pricer

    def cost(
        self, provider: str, model: str, at: datetime, usage: Mapping[str, int], context: Mapping[str, str]
    ) -> Decimal | None:
        result = self._pricer.price(provider, model, to_micros(at), usage, context or None)
        return result.total_usd if isinstance(result, Price) else None

    def rates(self, provider: str, model: str, at: datetime, context: Mapping[str, str]) -> Rates | None:
        found = self._pricer.bound_rates(provider, model, at, context or None)
        return Rates(*found) if found is not None else None


@contextlib.asynccontextmanager
async def relaying(holds: ReservationService | None) -> AsyncIterator[None]:
    """Run the relay of unacknowledged commits while the app runs."""
    if holds is None:
        yield
        return
    async with background(holds.relay_forever(), "reservations-relay"):
        yield


class ReaderClock:
    """Where the windows are, from ClickHouse alone (a process without a sink): nothing is cached."""

    def __init__(self, reader: MeterReader) -> None:
        self._reader = reader

    def applied_offsets(self) -> Mapping[tuple[str, int], int]:
        return self._reader.applied_offsets()

    def usage_version(self, subject: str) -> Hashable | None:
        return None


class SinkClock(ReaderClock):
    """Where the windows are, from the sink writing them in this process (no query needed), falling back
    to ClickHouse when the sink cannot tell (it does not hold every partition, or is still loading)."""

    def __init__(self, sink: Sink, reader: MeterReader) -> None:
        super().__init__(reader)
        self._sink = sink

    def applied_offsets(self) -> Mapping[tuple[str, int], int]:
        local = self._sink.applied_offsets()
        return local if local is not None else super().applied_offsets()

    def usage_version(self, subject: str) -> Hashable | None:
        return self._sink.usage_version(subject)


@dataclass(frozen=True, slots=True)
class Alerting:
    """The alerts of one process: the rules' evaluator, and the sender of what they fire."""

    service: AlertService
    deliverer: Deliverer
    sender: WebhookSender


@contextlib.asynccontextmanager
async def alerting(alerts: Alerting | None) -> AsyncIterator[None]:
    """Evaluate and deliver alerts while the app runs. Stopped, what is in flight is cancelled: it was not
    recorded as delivered, so it is sent again (the same webhook-id) by the next sender."""
    if alerts is None:
        yield
        return
    tasks = [
        asyncio.create_task(alerts.service.run(), name="alerts-evaluator"),
        asyncio.create_task(alerts.deliverer.run(), name="alerts-sender"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await alerts.sender.close()

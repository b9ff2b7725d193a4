"""A commit whose usage event the broker does not acknowledge is kept in PostgreSQL and sent later by the
relay (any process's); until then it counts as pending. Real PostgreSQL, a real broker, the real engine."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Consumer, TopicPartition

from control.holds import ReservationService
from control.inputs import CommitIn, FeatureIn, MeteredIn, ReserveIn, parse_entitlement
from control.model import ReservationStatus
from control.postgres.store import PostgresStore
from control.service import ControlService
from ingest.parsing import IngestPolicy
from ingest.producer import EventProducer
from meterstream.reserving import IngestUsageEvents, PricerRates, ReaderClock
from meterstream.topics import ensure_topics, topic_id
from processors.pricing import Pricer
from schemas.events import DEFAULT_USAGE_EVENT_TYPE
from schemas.records import decode_events
from schemas.settings import KafkaSettings, ReservationSettings, TopicSettings
from sinks.clickhouse.connection import ClickHouse
from sinks.clickhouse.reader import MeterReader

pytestmark = pytest.mark.integration


def _holds(
    store: PostgresStore, ch: ClickHouse, kafka: KafkaSettings, topics: TopicSettings, events_topic_id: str
) -> tuple[ReservationService, EventProducer]:
    producer = EventProducer(kafka.to_librdkafka(), topics.events, 1500, 0)
    policy = IngestPolicy(DEFAULT_USAGE_EVENT_TYPE, 1000, timedelta(hours=1))
    events = IngestUsageEvents(policy, producer, events_topic_id)
    reader = MeterReader(ch)
    holds = ReservationService(
        control=ControlService(store, reader),
        events=events,
        pricer=PricerRates(Pricer()),
        clock=ReaderClock(reader),
        settings=ReservationSettings(),
        usage_event_type=DEFAULT_USAGE_EVENT_TYPE,
    )
    return holds, producer


async def test_an_unacknowledged_commit_is_sent_by_the_relay(
    postgres_dsn: str, ch: ClickHouse, kafka: KafkaSettings, topics: TopicSettings
) -> None:
    ensure_topics(kafka, topics)
    store = PostgresStore(postgres_dsn)
    await store.open()
    producers: list[EventProducer] = []
    try:
        dead_broker = KafkaSettings(bootstrap_servers="127.0.0.1:1")
        events_topic = topic_id(kafka, topics.events)
        down, down_producer = _holds(store, ch, dead_broker, topics, events_topic)
        up, up_producer = _holds(store, ch, kafka, topics, events_topic)
        producers.extend([down_producer, up_producer])
        control = ControlService(store, MeterReader(ch))
        await control.create_feature(FeatureIn(key="relay_tokens", name="T", meterSlug="tokens_total"))
        entitlement = parse_entitlement(
            {
                "type": "metered",
                "featureKey": "relay_tokens",
                "usagePeriod": {"interval": "MONTH"},
                "issueAfterReset": 1000,
            }
        )
        assert isinstance(entitlement, MeteredIn)
        await control.create_entitlement("relayed", entitlement)
        reserved = await down.reserve("relayed", ReserveIn(id="relay-1", amounts={"relay_tokens": 100}))
        committed = await down.commit(
            "relay-1", CommitIn(usage={"provider": "openai", "model": "m", "input_tokens": 60})
        )
        # Answered: the commit is durable in PostgreSQL, though the broker never saw the event.
        assert committed.status is ReservationStatus.COMMITTED
        assert reserved.reservation.id == "relay-1"
        stored = await up.get("relay-1")
        assert stored.event_position is None
        value = await control.value("relayed", "relay_tokens", None)
        assert (value.usage, value.balance, value.reserved) == (60, 940, 0)  # pending: not forgotten

        assert await up.relay_once(older_than=timedelta(0)) == 1
        stored = await up.get("relay-1")
        assert stored.event_position is not None
        _, partition, offset = stored.event_position
        assert await up.relay_once(older_than=timedelta(0)) == 0  # sent once
        # Sent again (a retried commit racing the relay): the copy the sink counts is the lower offset.
        async with store.tx() as tx:
            await tx.mark_sent("relay-1", (stored.event_position[0], partition, offset + 7), datetime.now(UTC))
        assert (await up.get("relay-1")).event_position == stored.event_position

        consumer = Consumer(kafka.to_librdkafka() | {"group.id": f"relay-{time.monotonic()}"})
        consumer.assign([TopicPartition(topics.events, partition, offset)])
        message = consumer.poll(10)
        consumer.close()
        assert message is not None
        assert message.error() is None
        value_bytes = message.value()
        assert value_bytes is not None
        (event,) = decode_events(value_bytes)["events"]
        assert (event["id"], event["source"], event["subject"]) == ("relay-1", "meterstream/reservations", "relayed")
        assert event["usage"] == {"input_tokens": 60}
    finally:
        for producer in producers:
            producer.close(1)
        await store.close()

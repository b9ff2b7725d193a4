"""Ingest and processor against a real Kafka-protocol broker (Tansu)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from confluent_kafka import Consumer, Producer

from ingest.producer import BrokerUnavailable, EventProducer
from ingest.service import IngestService
from meterstream.broker import LocalBroker, free_port
from meterstream.topics import ensure_topics, topic_id
from processors.app import Processor
from processors.pricing import Pricer
from schemas.records import decode_events, decode_windows
from schemas.settings import CONSUMER_FETCH_MAX_WAIT_MS, IngestSettings, KafkaSettings, ProcessorSettings, TopicSettings
from schemas.topics import partition_for

pytestmark = pytest.mark.integration


def read_all(
    kafka: KafkaSettings, topic: str, expected: int, timeout_s: float = 20
) -> list[tuple[int, int, bytes, int]]:
    consumer = Consumer(
        kafka.to_librdkafka()
        | {
            "group.id": f"reader-{topic}-{time.monotonic()}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": "6000",
        }
    )
    consumer.subscribe([topic])
    out = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                out.append((message.partition(), message.offset(), message.value(), message.timestamp()[1]))
    finally:
        consumer.close()
    return out


# Within the allowed lateness (7 days) of now, so that the processor counts it.
RECENT = (datetime.now(UTC) - timedelta(hours=1)).isoformat()


def event(i: int, subject: str) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"k-{i}",
        "source": "test",
        "type": "llm.usage",
        "subject": subject,
        "time": RECENT,
        "data": {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": i, "output_tokens": 1},
    }


async def test_ingest_groups_by_partition_and_waits_for_the_broker(kafka: KafkaSettings, topics: TopicSettings) -> None:
    ensure_topics(kafka, topics)
    settings = IngestSettings(kafka=kafka, topics=topics)
    producer = EventProducer(kafka.to_librdkafka(), topics.events, 5000, 1)
    service = IngestService(settings, producer)
    body = orjson.dumps([event(i, f"user-{i % 10}") for i in range(100)])
    before = int(datetime.now(UTC).timestamp() * 1000)
    assert await service.ingest({"content-type": "application/json"}, body) == 100
    # The same request again: already acknowledged, nothing new is produced.
    assert await service.ingest({"content-type": "application/json"}, body) == 0
    producer.close()
    records = read_all(kafka, topics.events, 4)
    assert len(records) <= 4  # one record per partition touched
    seen = []
    for partition, _, value, timestamp in records:
        assert timestamp >= before  # the receive time, not the (much older) event time
        for accepted in decode_events(value)["events"]:
            assert partition_for(accepted["subject"], 4) == partition
            seen.append(accepted["id"])
    assert sorted(seen) == sorted(f"k-{i}" for i in range(100))


def test_subject_partitioning_agrees_with_kafka_clients(kafka: KafkaSettings, topics: TopicSettings) -> None:
    ensure_topics(kafka, topics)
    producer = Producer(kafka.to_librdkafka() | {"partitioner": "murmur2"})
    subjects = [f"customer-{i}" for i in range(40)] + ["ü-ñ", "a"]
    for subject in subjects:
        producer.produce(topics.events, b"x", key=subject.encode())
    producer.flush(10)
    consumer = Consumer(
        kafka.to_librdkafka()
        | {"group.id": f"keys-{time.monotonic()}", "auto.offset.reset": "earliest", "session.timeout.ms": "6000"}
    )
    consumer.subscribe([topics.events])
    found: dict[str, int] = {}
    deadline = time.monotonic() + 20
    while len(found) < len(subjects) and time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is not None and message.error() is None:
            found[message.key().decode()] = message.partition()
    consumer.close()
    assert found == {s: partition_for(s, 4) for s in subjects}


async def test_unreachable_broker_is_503_quickly() -> None:
    dead = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    settings = IngestSettings(kafka=dead, produce_timeout_ms=800)
    producer = EventProducer(dead.to_librdkafka(), "meterstream.events", 800, 1)
    service = IngestService(settings, producer)
    # The broker never answered: every request is a 503 at once, none waits for a metadata read or a produce.
    for i in range(20):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await service.ingest({"content-type": "application/cloudevents+json"}, orjson.dumps(event(i, "a")))
        assert time.monotonic() - started < 0.1
    assert producer.ping() is False
    producer.close(0.1)


async def test_broker_killed_mid_stream_answers_503_and_recovers(tmp_path: object) -> None:
    broker = LocalBroker.start()
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
        topics = TopicSettings(partitions=2)
        ensure_topics(kafka, topics)
        producer = EventProducer(kafka.to_librdkafka(), topics.events, 1500, 1)
        service = IngestService(IngestSettings(kafka=kafka, topics=topics, produce_timeout_ms=1500), producer)
        assert await service.ingest({"content-type": "application/cloudevents+json"}, orjson.dumps(event(1, "a"))) == 1
        broker.kill()
        with pytest.raises(BrokerUnavailable):
            await service.ingest({"content-type": "application/cloudevents+json"}, orjson.dumps(event(2, "a")))
        # Known to be away now: each later request is answered 503 within 100 ms (no request waits out the
        # produce timeout or a metadata read), however many come.
        slowest = 0.0
        for i in range(50):
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable):
                await service.ingest({"content-type": "application/cloudevents+json"}, orjson.dumps(event(3 + i, "a")))
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.1, slowest
        assert producer.ping() is False
        producer.close(0.1)
    finally:
        broker.stop()


async def test_processor_turns_each_record_into_one_output(kafka: KafkaSettings, topics: TopicSettings) -> None:
    ensure_topics(kafka, topics)
    settings = ProcessorSettings(kafka=kafka, topics=topics, group_id=f"proc-{topics.events}", session_timeout_s=2.0)
    producer = EventProducer(kafka.to_librdkafka(), topics.events, 5000, 1)
    service = IngestService(IngestSettings(kafka=kafka, topics=topics), producer)
    for batch in range(5):
        body = orjson.dumps([event(batch * 100 + i, f"user-{i % 7}") for i in range(100)])
        await service.ingest({"content-type": "application/json"}, body)
    producer.close()
    inputs = read_all(kafka, topics.events, 100, timeout_s=5)
    processor = Processor(settings, Pricer(), topic_id(kafka, topics.events))
    await processor.start()
    try:
        outputs = await asyncio.to_thread(read_all, kafka, topics.windows, len(inputs), 30)
        # The short fetch wait reached the running consumer (it bounds freshness on the bundled broker).
        fetcher = processor.app.consumer._thread._ensure_consumer()._fetcher
        assert fetcher._fetch_max_wait_ms == CONSUMER_FETCH_MAX_WAIT_MS
    finally:
        await processor.stop()
    assert len(outputs) == len(inputs)
    # Faust's data directory goes with the processor.
    assert not await asyncio.to_thread(processor.app.conf.datadir.exists)
    by_source = {}
    for partition, _, value, _ in outputs:
        record = decode_windows(value)
        assert record["partition"] == partition  # output lands on the partition its input was read from
        by_source[(record["partition"], record["offset"])] = record
    assert set(by_source) == {(p, o) for p, o, _, _ in inputs}
    counted = sum(w["requests"] for r in by_source.values() for w in r["windows"])
    assert counted == 500


async def test_poison_records_are_dead_lettered_and_the_chain_goes_on(
    kafka: KafkaSettings, topics: TopicSettings
) -> None:
    """Issue 19 item 2: a record the processor fails on deterministically used to be retried forever
    (every later record of its partition stalled). Now it becomes a "failed" output plus dead letters."""
    topics = topics.model_copy(update={"partitions": 1})
    ensure_topics(kafka, topics)
    now_us = int(time.time() * 1_000_000)

    def accepted(event_id: str, **usage: object) -> dict[str, object]:
        return {
            "id": event_id,
            "source": "test",
            "subject": "alice",
            "type": "llm.usage",
            "time_us": now_us,
            "received_us": now_us,
            "data": "{}",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "usage": {"input_tokens": 10, "output_tokens": 2} | usage,
        }

    values = [
        orjson.dumps({"v": 1, "events": [accepted("good-1")]}),
        b"\x00 not a record",
        orjson.dumps({"v": 99, "events": [accepted("newer")]}),
        orjson.dumps({"v": 1, "events": [accepted("bad-usage", input_tokens=None)]}),  # processing raises
        orjson.dumps({"v": 1, "events": [accepted("good-2")]}),
    ]
    producer = Producer(kafka.to_librdkafka())
    for value in values:
        producer.produce(topics.events, value, partition=0)
    assert producer.flush(10) == 0
    settings = ProcessorSettings(kafka=kafka, topics=topics, group_id=f"proc-{topics.events}", session_timeout_s=2.0)
    processor = Processor(settings, Pricer(), topic_id(kafka, topics.events))
    await processor.start()
    try:
        outputs = await asyncio.to_thread(read_all, kafka, topics.windows, len(values), 30)
        letters = await asyncio.to_thread(read_all, kafka, topics.dead_letter, 3, 30)
    finally:
        await processor.stop()
    records = sorted((decode_windows(value) for _, _, value, _ in outputs), key=lambda r: r["offset"])
    assert [r["offset"] for r in records] == [0, 1, 2, 3, 4]  # one output per input: the chain is unbroken
    statuses = [list(zip(r["events"]["id"], r["events"]["status"], strict=True)) for r in records]
    assert statuses == [
        [("good-1", "counted")],
        [],
        [("newer", "failed")],
        [("bad-usage", "failed")],
        [("good-2", "counted")],
    ]
    assert [sum(w["requests"] for w in r["windows"]) for r in records] == [1, 0, 0, 0, 1]
    dead = sorted((orjson.loads(value) for _, _, value, _ in letters), key=lambda letter: letter["offset"])
    assert [letter["offset"] for letter in dead] == [1, 2, 3]
    assert dead[0]["raw"] == "\x00 not a record"  # no events in it: the bytes themselves
    assert "upgrade this service first" in dead[1]["reason"] and dead[1]["event"]["id"] == "newer"
    assert "TypeError" in dead[2]["reason"] and dead[2]["event"]["id"] == "bad-usage"


def test_topics_are_created_with_explicit_durability_and_weak_settings_are_named(kafka: KafkaSettings) -> None:
    from confluent_kafka.admin import AdminClient, ConfigResource

    from meterstream.topics import ensure_topics

    name = f"durable-{time.monotonic_ns()}"
    topics = TopicSettings(events=f"{name}.e", windows=f"{name}.w", dead_letter=f"{name}.d", partitions=2)
    # The defaults cover the default lateness (7 days) with a margin: only the single copy is named.
    warnings = ensure_topics(kafka, topics, allowed_lateness_s=7 * 86400)
    assert len(warnings) == 1
    assert "on 1 broker" in warnings[0]
    assert ensure_topics(kafka, topics, allowed_lateness_s=7 * 86400, single_broker=True) == []
    admin = AdminClient(kafka.to_librdkafka())
    for topic, days in ((topics.events, 14), (topics.windows, 14), (topics.dead_letter, 30)):
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        configs = admin.describe_configs([resource])[resource].result(timeout=10)
        assert int(configs["retention.ms"].value) == days * 86400 * 1000
    # A lateness the retention does not cover is named for the events and windows topics.
    warnings = ensure_topics(kafka, topics, allowed_lateness_s=20 * 86400, single_broker=True)
    assert [w.split()[0] for w in warnings] == [topics.events, topics.windows]
    assert "less than the allowed lateness" in warnings[0]

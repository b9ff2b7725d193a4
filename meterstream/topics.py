"""Creating the topics, and finding the identity of the events topic."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from schemas.problems import MeterstreamError
from schemas.settings import KafkaSettings, TopicSettings

log = logging.getLogger(__name__)


class TopicError(MeterstreamError):
    """Topics are missing or inconsistent."""


def ensure_topics(kafka: KafkaSettings, topics: TopicSettings, timeout_s: float = 30.0) -> None:
    """Create the events, windows and dead-letter topics if they do not exist (explicitly: a broker's
    auto-created topics may have another partition count). The windows topic must have as many partitions
    as the events topic: the processor writes a record's output to the partition it was read from."""
    admin = AdminClient(kafka.to_librdkafka())
    wanted = {
        topics.events: topics.partitions,
        topics.windows: topics.partitions,
        topics.dead_letter: topics.partitions,
    }
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            existing = admin.list_topics(timeout=5).topics
            break
        except KafkaException:
            if time.monotonic() > deadline:
                raise TopicError(f"cannot reach the broker at {kafka.bootstrap_servers}") from None
            time.sleep(0.5)
    missing = [
        NewTopic(name, num_partitions=count, replication_factor=topics.replication_factor)
        for name, count in wanted.items()
        if name not in existing
    ]
    if missing:
        for name, future in admin.create_topics(missing, operation_timeout=timeout_s).items():
            try:
                future.result()
                log.info("topics: created %s", name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise TopicError(f"cannot create topic {name}: {exc}") from exc
    existing = admin.list_topics(timeout=10).topics
    events = len(existing[topics.events].partitions)
    windows = len(existing[topics.windows].partitions)
    if windows < events:
        raise TopicError(f"{topics.windows} has {windows} partitions, fewer than {topics.events} ({events})")


def topic_id(kafka: KafkaSettings, topic: str) -> str:
    """The broker-assigned id of a topic: it changes when the topic is deleted and recreated, which resets
    its offsets, so offsets are only ever compared under the same topic id."""
    admin = AdminClient(kafka.to_librdkafka())
    description = admin.describe_topics(TopicCollection([topic]))[topic].result(timeout=10)
    return str(description.topic_id)

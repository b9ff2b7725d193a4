"""Creating the topics, and finding the identity of the events topic."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic  # type: ignore[attr-defined]

from schemas.problems import MeterstreamError
from schemas.settings import KafkaSettings, TopicSettings

log = logging.getLogger(__name__)


class TopicError(MeterstreamError):
    """Topics are missing or inconsistent."""


#: Retention above the allowed lateness by at least this much (time to notice an outage and act).
RETENTION_MARGIN_S = 24 * 3600


def ensure_topics(
    kafka: KafkaSettings,
    topics: TopicSettings,
    timeout_s: float = 30.0,
    *,
    allowed_lateness_s: int | None = None,
    single_broker: bool = False,
) -> list[str]:
    """Create the events, windows and dead-letter topics if they do not exist (explicitly: a broker's
    auto-created topics may have another partition count), with their replication, ``min.insync.replicas``
    and retention set, not left to the broker's defaults. The windows topic must have as many partitions
    as the events topic: the processor writes a record's output to the partition it was read from.

    Returns the warnings logged about durability: replication 1 (unless ``single_broker``: the bundled local
    broker), or a retention (as configured, or as an existing topic has it) that does not cover the
    allowed lateness plus a day.
    """
    admin = AdminClient(kafka.to_librdkafka())
    retention = {
        topics.events: topics.retention_s,
        topics.windows: topics.retention_s,
        topics.dead_letter: topics.dead_letter_retention_s,
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
        NewTopic(
            name,
            num_partitions=topics.partitions,
            replication_factor=topics.replication_factor,
            config={"min.insync.replicas": str(topics.min_insync), "retention.ms": str(retention_s * 1000)},
        )
        for name, retention_s in retention.items()
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
    warnings = []
    replicas = min(len(p.replicas) for p in existing[topics.events].partitions.values())
    if replicas < 2 and not single_broker:
        warnings.append(
            f"{topics.events} keeps each record on {replicas} broker: a lost broker disk loses acknowledged "
            "events; run 3 brokers with TOPICS__REPLICATION_FACTOR=3 (deploy/SCALING.md)"
        )
    if allowed_lateness_s is not None:
        needed = allowed_lateness_s + RETENTION_MARGIN_S
        for name in (topics.events, topics.windows):
            kept = _retention_s(admin, name)
            if kept is not None and 0 <= kept < needed:
                warnings.append(
                    f"{name} keeps records {kept / 86400:g} days, less than the allowed lateness "
                    f"({allowed_lateness_s / 86400:g} days) plus a day: a processor or sink down that long "
                    "loses events; raise the topic's retention.ms"
                )
    for warning in warnings:
        log.warning("topics: %s", warning)
    return warnings


def _retention_s(admin: AdminClient, topic: str) -> float | None:
    """The topic's ``retention.ms`` in seconds (-1: forever), or None if the broker does not say."""
    try:
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        configs = admin.describe_configs([resource])[resource].result(timeout=10)
        value = configs["retention.ms"].value
    except Exception as exc:  # a broker that does not describe configs (some Kafka-protocol ones)
        log.debug("topics: retention of %s unknown (%s)", topic, exc)
        return None
    return None if value is None else int(value) / 1000


def topic_id(kafka: KafkaSettings, topic: str) -> str:
    """The broker-assigned id of a topic: it changes when the topic is deleted and recreated, which resets
    its offsets, so offsets are only ever compared under the same topic id."""
    admin = AdminClient(kafka.to_librdkafka())
    description = admin.describe_topics(TopicCollection([topic]))[topic].result(timeout=10)
    return str(description.topic_id)

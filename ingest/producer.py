"""Kafka producer for the write path: a request is answered only after the broker acknowledged it.

Delivery guarantee: ``send`` returns only when every record was acknowledged by all in-sync replicas
(``acks=all``, idempotent producer: no duplicates from the producer's own retries, order kept per
partition). If any record fails or times out, ``send`` raises :class:`BrokerUnavailable` and the client
gets a 503; records of the same request that did get through are harmless, because a retry of the request
carries the same (source, id) and is deduplicated downstream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from schemas.problems import MeterstreamError

log = logging.getLogger(__name__)


#: How often the broker's metadata (the events topic's partition count) is re-read while it answers, and
#: how often it is tried while it does not.
_METADATA_EVERY_S = 5.0
_METADATA_RETRY_S = 0.5


class BrokerUnavailable(MeterstreamError):
    """The broker did not acknowledge a record in time."""


class EventProducer:
    """An asyncio face on confluent-kafka's producer. One background thread serves delivery reports."""

    def __init__(
        self, config: dict[str, str | int | float | bool], topic: str, timeout_ms: int, linger_ms: int
    ) -> None:
        self._topic = topic
        self._timeout_s = timeout_ms / 1000
        self._config: dict[str, Any] = config | {
            "acks": "all",
            "enable.idempotence": "true",
            "linger.ms": str(linger_ms),
            # Failing here is what turns into a 503; the request itself waits a little longer.
            "message.timeout.ms": str(timeout_ms),
            "message.max.bytes": str(4 * 1024 * 1024),
            "queue.buffering.max.kbytes": str(512 * 1024),
            "error_cb": self._on_error,
            "logger": logging.getLogger("librdkafka.producer"),
        }
        self._fatal = False
        self._partitions: int | None = None
        #: Since when the broker is known not to answer (None: it answers). Requests meanwhile get a 503 at
        #: once instead of each waiting out the produce timeout; the watcher clears it as soon as it answers.
        self._down_since: float | None = None
        self._down_reason = "the broker's metadata has not been read yet"
        self._producer = Producer(self._config)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="ingest-producer-poll", daemon=True)
        self._thread.start()
        self._read_metadata()  # once before serving (at start, not in a request), then in the background
        self._watcher = threading.Thread(target=self._watch, name="ingest-producer-metadata", daemon=True)
        self._watcher.start()
        #: Highest offset the broker acknowledged, per partition (for draining at shutdown).
        self.acknowledged: dict[int, int] = {}

    def _on_error(self, error: KafkaError) -> None:
        log.warning("kafka producer: %s", error)
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._mark_down(f"all brokers are down ({error.str()})")
        if error.fatal():
            # E.g. fenced after its messages timed out during a broker outage: an idempotent producer
            # cannot continue after a fatal error; the next request gets a fresh one.
            self._fatal = True

    def _renew_if_broken(self) -> None:
        if not self._fatal:
            return
        log.warning("kafka producer: replacing the producer after a fatal error")
        old, self._producer, self._fatal = self._producer, Producer(self._config), False
        old.purge()
        old.flush(0)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def _mark_down(self, reason: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._down_reason = reason

    def _read_metadata(self) -> None:
        try:
            metadata = self._producer.list_topics(self._topic, timeout=min(2.0, self._timeout_s))
        except KafkaException as exc:
            self._mark_down(f"cannot read metadata of {self._topic}: {exc}")
            return
        topic = metadata.topics.get(self._topic)
        if topic is None or topic.error is not None or not topic.partitions:
            self._mark_down(f"topic {self._topic} is not available")
        else:
            self._partitions = len(topic.partitions)
            self._down_since = None

    def _watch(self) -> None:
        """Read the events topic's metadata in the background (never in a request): its partition count, so
        partitions added to the topic are used without a restart, and whether the broker answers at all."""
        while not self._stop.wait(_METADATA_RETRY_S if self._down_since is not None else _METADATA_EVERY_S):
            self._read_metadata()

    def partitions(self) -> int:
        """Partition count of the events topic, as last read by the watcher (never waits: BrokerUnavailable
        at once while the broker does not answer)."""
        if self._down_since is not None or self._partitions is None:
            raise BrokerUnavailable(self._down_reason)
        return self._partitions

    async def send(self, records: Sequence[tuple[int, bytes]], timestamp_ms: int) -> list[int]:
        """Produce ``(partition, value)`` records and wait until all are acknowledged; returns the offset
        each record was stored at, in order.

        The record timestamp is the receive time (not the event time), so retention counts from arrival.
        """
        if not records:
            return []
        if self._down_since is not None:
            raise BrokerUnavailable(self._down_reason)
        self._renew_if_broken()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[int]] = []

        def callback(future: asyncio.Future[int]) -> Any:
            def on_delivery(error: KafkaError | None, message: Message) -> None:
                if error is not None and (error.fatal() or error.code() in _PRODUCER_STATE_LOST):
                    self._fatal = True
                if error is not None and error.code() in _BROKER_AWAY:
                    self._mark_down(f"delivery failed: {error.str()}")
                partition, offset = message.partition(), message.offset()
                if (
                    error is None
                    and partition is not None
                    and offset is not None
                    and offset > self.acknowledged.get(partition, -1)
                ):
                    self.acknowledged[partition] = offset
                loop.call_soon_threadsafe(_settle, future, error, -1 if offset is None else offset)

            return on_delivery

        try:
            for partition, value in records:
                future: asyncio.Future[int] = loop.create_future()
                futures.append(future)
                self._producer.produce(
                    self._topic,
                    value,
                    partition=partition,
                    timestamp=timestamp_ms,
                    on_delivery=callback(future),
                )
        except (BufferError, KafkaException) as exc:
            for future in futures:
                future.cancel()
            raise BrokerUnavailable(f"cannot queue records: {exc}") from exc
        try:
            async with asyncio.timeout(self._timeout_s + 1):
                return list(await asyncio.gather(*futures))
        except TimeoutError as exc:
            self._mark_down("the broker did not acknowledge in time")
            raise BrokerUnavailable("the broker did not acknowledge in time") from exc

    def ping(self) -> bool:
        """Whether the broker answers now: False at once while it is known to be away, otherwise a metadata
        read of its own (up to 2 s; callers run it in a thread, never on the loop). The watcher's last answer
        alone can be 5 s old, and a broker that stopped answering (a paused node keeps its connections)
        would look ready until the watcher's next read timed out."""
        if self._down_since is not None or self._partitions is None:
            return False
        self._read_metadata()
        return self._down_since is None

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush what is queued, then stop and close the connections (a broker that waits for its clients
        to leave stops at once). Returns the number of records still undelivered. Sends after this fail
        with BrokerUnavailable; ping answers False."""
        remaining: int = self._producer.flush(timeout_s)
        self._mark_down("the producer is closed (shutting down)")
        self._stop.set()
        self._thread.join(timeout=2)
        self._watcher.join(timeout=3)
        if not self._thread.is_alive() and not self._watcher.is_alive():
            self._producer.close()  # nothing else uses it now (a close during a poll would deadlock)
        return remaining


#: Delivery errors after which an idempotent producer keeps failing (its producer id / epoch is no longer
#: accepted, e.g. after a broker outage): replace it rather than answer 503 forever.
_PRODUCER_STATE_LOST = frozenset(
    {
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.PRODUCER_FENCED,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
        KafkaError._FENCED,
        KafkaError._FATAL,
    }
)


#: Delivery errors that mean the broker is not answering (not a problem of the record).
_BROKER_AWAY = frozenset({KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN})


def _settle(future: asyncio.Future[int], error: KafkaError | None, offset: int) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(offset)
    else:
        future.set_exception(BrokerUnavailable(f"delivery failed: {error.str()}"))

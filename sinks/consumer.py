"""The sink loop: windows topic in, ClickHouse out.

Delivery guarantee: a batch is written first and its Kafka offsets committed second. A crash between the
two re-delivers the batch, and the applied-offset check in ``sinks.apply`` turns the replay into a no-op;
so every processor output is applied exactly once. While ClickHouse is unavailable the loop retries the
same batch with exponential backoff, pausing the partitions (and keeping its group membership), so nothing
is dropped and nothing else is consumed meanwhile.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from prometheus_client import Counter, Gauge, Histogram
from rbloom import Bloom

from schemas.recent import RecentKeys
from schemas.records import WindowsRecord, decode_windows
from schemas.settings import CONSUMER_FETCH_MAX_WAIT_MS, SinkSettings
from sinks.apply import Coords, EventKey, Plan, Source, plan_batch

log = logging.getLogger(__name__)

STORED = Counter("meterstream_sink_events_stored_total", "Events written to the audit log", ["status"])
DUPLICATES = Counter("meterstream_sink_duplicates_total", "Events dropped as already stored (same source, id)")
REPLAYS = Counter("meterstream_sink_replayed_records_total", "Windows records skipped as already applied")
GAPS = Counter("meterstream_sink_gap_records_total", "Windows records skipped ahead of a missing offset")
BATCH_SECONDS = Histogram("meterstream_sink_batch_seconds", "Time to write one batch to ClickHouse")
FRESHNESS = Histogram(
    "meterstream_sink_freshness_seconds",
    "Time from an event's acceptance at ingest to its storage in ClickHouse",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
LOOKUPS = Counter(
    "meterstream_sink_dedupe_lookups_total", "Event keys checked against the audit log (Bloom filter positives)"
)
WRITE_FAILURES = Counter("meterstream_sink_write_failures_total", "Failed attempts to write a batch")
STORAGE_UP = Gauge("meterstream_sink_storage_up", "1 if the last write or check reached ClickHouse")


class Store(Protocol):
    def applied_offsets(self) -> dict[Source, int]: ...

    def stored_coords(self, keys: list[EventKey]) -> dict[EventKey, Coords]: ...

    def stored_keys(self, since: datetime) -> Iterator[EventKey]: ...

    def write(self, plan: Plan, stored_at: datetime) -> None: ...


#: Subjects are spread over this many write versions (Sink.usage_version).
VERSION_BUCKETS = 4096


def _bucket(subject: str) -> int:
    return zlib.crc32(subject.encode()) % VERSION_BUCKETS


class Sink:
    """Consumes the windows topic and applies it to the store. Run ``run()`` in a thread of its own."""

    def __init__(self, settings: SinkSettings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self._recent: RecentKeys[EventKey, Coords] = RecentKeys(settings.recent_keys)
        # Every key stored within the dedupe horizon. A key it does not hold was certainly never stored,
        # so only its (rare) positives need the exact lookup in the audit log.
        self._stored = Bloom(settings.dedupe_capacity, 0.01)
        self._stored_count = 0
        self._applied: dict[Source, int] = {}
        # What readers in this process may know of the writes (see usage_version), under one lock.
        self._state_lock = threading.Lock()
        self._versions = [0] * VERSION_BUCKETS
        self._owns_all = False
        self._stop = threading.Event()
        self._generation = 0
        self._reload = True
        self.ready = threading.Event()
        #: Time of the last successful write, for health checks.
        self.last_write: float | None = None
        #: Told the subjects of every write once it is stored (from the sink's thread: it must not block).
        #: The alerts' evaluator listens; a crash before it is told is caught up by its sweep at start.
        self.on_stored: Callable[[set[str]], None] | None = None
        self._consumer = Consumer(
            settings.kafka.to_librdkafka()
            | {
                "group.id": settings.group_id,
                "enable.auto.commit": "false",
                "auto.offset.reset": "earliest",
                "session.timeout.ms": str(int(settings.session_timeout_s * 1000)),
                "heartbeat.interval.ms": str(max(100, int(settings.session_timeout_s * 250))),
                "max.poll.interval.ms": "600000",
                "fetch.max.bytes": str(64 * 1024 * 1024),
                "max.partition.fetch.bytes": str(16 * 1024 * 1024),
                "fetch.wait.max.ms": str(CONSUMER_FETCH_MAX_WAIT_MS),
                "logger": logging.getLogger("librdkafka.sink"),
            }
        )

    def stop(self) -> None:
        self._stop.set()

    def applied_offset(self, topic_id: str, partition: int) -> int:
        """The last events-topic offset of a source partition applied by this sink (-1: none)."""
        return self._applied.get((topic_id, partition), -1)

    def applied_offsets(self) -> dict[Source, int] | None:
        """Every source partition's applied offset, as stored (at most a moment behind a write), when this
        sink holds every windows partition and has loaded them; None when only the store can tell."""
        with self._state_lock:
            if self._reload or not self._owns_all:
                return None
            return dict(self._applied)

    def usage_version(self, subject: str) -> tuple[int, int] | None:
        """A token that changes whenever a write that may change ``subject``'s windows starts and ends:
        equal tokens before and after a read of its windows mean no write touched them in between. None
        while a write touching them is in flight, or when this sink cannot tell (it does not hold every
        windows partition, or has not loaded its state). One version per bucket of subjects (bounded
        memory): a write to another subject of the bucket changes it too, which only costs a re-read."""
        with self._state_lock:
            if self._reload or not self._owns_all:
                return None
            version = self._versions[_bucket(subject)]
            return None if version % 2 else (self._generation, version)

    def _bump(self, buckets: set[int]) -> None:
        with self._state_lock:
            for b in buckets:
                self._versions[b] += 1

    def run(self) -> None:
        """Consume until ``stop()``. The batch in hand is then written, or, if storage is down, left
        uncommitted, to be redelivered."""
        if self._retrying(self._load_stored_keys) is _GAVE_UP:
            return
        self._consumer.subscribe([self._settings.topics.windows], on_assign=self._on_assign, on_revoke=self._on_revoke)
        batch: list[tuple[Message, WindowsRecord | None]] = []
        events = 0
        oldest: float | None = None
        try:
            while not self._stop.is_set():
                for message in self._consumer.consume(num_messages=1000, timeout=0.05):
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("sink: consumer error %s", error)
                        continue
                    record = self._decode(message)
                    batch.append((message, record))
                    events += len(record["events"]["id"]) if record else 0
                    oldest = oldest or time.monotonic()
                waited_ms = (time.monotonic() - oldest) * 1000 if oldest is not None else 0.0
                if batch and (events >= self._settings.batch_events or waited_ms >= self._settings.max_wait_ms):
                    self._flush(batch)
                    batch, events, oldest = [], 0, None
            if batch:
                self._flush(batch)
        finally:
            self._consumer.close()

    @staticmethod
    def _decode(message: Message) -> WindowsRecord | None:
        try:
            return decode_windows(message.value() or b"")
        except ValueError:
            log.error("sink: undecodable windows record at %s:%s", message.partition(), message.offset())
            return None

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another sink may have advanced these partitions while they were not ours: reload the applied
        # offsets before the next batch (not here: a callback must not block on storage).
        with self._state_lock:
            self._generation += 1
            self._reload = True
            self._owns_all = len({p.partition for p in partitions}) >= self._settings.topics.partitions
        log.info("sink: assigned windows partitions %s", sorted(p.partition for p in partitions))
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._state_lock:
            self._generation += 1
            self._owns_all = False

    def _flush(self, batch: list[tuple[Message, WindowsRecord | None]]) -> None:
        records = [record for _, record in batch if record is not None]
        started = time.monotonic()
        generation = self._generation
        if self._reload:
            applied = self._retrying(self._store.applied_offsets)
            if applied is _GAVE_UP:
                return
            with self._state_lock:
                self._applied, self._reload = applied, False
        plan = self._retrying(lambda: plan_batch(records, self._applied, self._lookup))
        if plan is _GAVE_UP or generation != self._generation:
            return
        stored_at = datetime.now(UTC)
        # Odd versions while the write is in flight, new even ones after it (whatever its outcome).
        touched = {_bucket(key[0]) for key in plan.windows}
        self._bump(touched)
        try:
            if self._retrying(lambda: self._store.write(plan, stored_at)) is _GAVE_UP:
                return
            with self._state_lock:
                self._applied.update(plan.offsets)
        finally:
            self._bump(touched)
        # Written: now (and only now) the windows-topic offsets may be committed.
        offsets: dict[tuple[str, int], int] = {}
        for message, _ in batch:
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if topic is not None and partition is not None and offset is not None:
                offsets[(topic, partition)] = max(offsets.get((topic, partition), -1), offset + 1)
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
        except Exception:  # a rebalance took the partitions: the next owner replays, the check skips
            log.warning("sink: offset commit failed after write; the replay will be skipped", exc_info=True)
        self._record(plan, stored_at, started)
        if self.on_stored is not None and plan.windows:
            try:
                self.on_stored({key[0] for key in plan.windows})
            except Exception:
                log.exception("sink: the stored-subjects listener failed")

    def _load_stored_keys(self) -> None:
        started = time.monotonic()
        since = datetime.now(UTC) - timedelta(days=self._settings.dedupe_horizon_days)
        self._stored = Bloom(self._settings.dedupe_capacity, 0.01)
        self._stored_count = 0
        for key in self._store.stored_keys(since):
            self._stored.add(key)
            self._stored_count += 1
        log.info("sink: %d stored event keys loaded in %.1fs", self._stored_count, time.monotonic() - started)

    def _lookup(self, keys: list[EventKey]) -> Mapping[EventKey, Coords]:
        found: dict[EventKey, Coords] = {}
        missing: list[EventKey] = []
        stored = self._stored
        for key in keys:
            if key not in stored:
                continue  # never stored: no lookup needed
            coords = self._recent.get(key)
            if coords is None:
                missing.append(key)
            else:
                found[key] = coords
        if missing:
            LOOKUPS.inc(len(missing))
            found.update(self._store.stored_coords(missing))
        return found

    def _record(self, plan: Plan, stored_at: datetime, started: float) -> None:
        now = stored_at.timestamp()
        stored = 0
        for kept in plan.events:
            for key, coords in kept.keys_and_coords():
                self._recent.add(key, coords)
                self._stored.add(key)
                stored += 1
            events = kept.record["events"]
            statuses = collections.Counter(events["status"][i] for i in kept.positions())
            for status, count in statuses.items():
                STORED.labels(status).inc(count)
            if events["received_us"]:
                # One observation per record: its events were received together (one request).
                FRESHNESS.observe(max(0.0, now - events["received_us"][0] / 1_000_000))
        self._stored_count += stored
        if self._stored_count > self._settings.dedupe_capacity:
            log.warning("sink: more keys than dedupe_capacity; more audit-log lookups until the next restart")
        DUPLICATES.inc(plan.duplicates)
        REPLAYS.inc(plan.replays)
        GAPS.inc(plan.gaps)
        if plan.gaps:
            log.warning("sink: skipped %d records ahead of a missing offset (they will be redelivered)", plan.gaps)
        BATCH_SECONDS.observe(time.monotonic() - started)
        self.last_write = time.monotonic()

    def _retrying(self, action: Any) -> Any:
        """Run ``action`` until it succeeds (or, when stopping, give up: nothing was committed, so the
        batch is redelivered). Partitions are paused meanwhile so nothing new is fetched, and polled so
        the group keeps us."""
        delay = self._settings.retry_initial_ms / 1000
        paused: list[TopicPartition] = []
        try:
            while True:
                try:
                    result = action()
                    STORAGE_UP.set(1)
                    return result
                except Exception as exc:
                    WRITE_FAILURES.inc()
                    STORAGE_UP.set(0)
                    if self._stop.is_set():
                        log.error("sink: stopping with a batch unwritten (%s); it is redelivered on restart", exc)
                        return _GAVE_UP
                    log.warning("sink: storage failed (%s); retrying in %.1fs", exc, delay)
                    if not paused:
                        paused = self._safe_assignment()
                        if paused:
                            self._consumer.pause(paused)
                    deadline = time.monotonic() + delay
                    while time.monotonic() < deadline and not self._stop.is_set():
                        self._consumer.poll(0.1)  # keeps the group session; paused: returns nothing
                    delay = min(delay * 2, self._settings.retry_max_ms / 1000)
        finally:
            if paused:
                self._consumer.resume(paused)

    def _safe_assignment(self) -> list[TopicPartition]:
        try:
            return list(self._consumer.assignment())
        except Exception:
            return []


_GAVE_UP: Any = object()

"""The sink loop: windows topic in, ClickHouse out.

Delivery guarantee: a batch is written first and its Kafka offsets committed second. A crash between the
two re-delivers the batch, and the applied-offset check in ``sinks.apply`` turns the replay into a no-op;
so every processor output is applied exactly once. While ClickHouse is unavailable the loop retries the
same batch with exponential backoff, pausing the partitions (and keeping its group membership), so nothing
is dropped and nothing else is consumed meanwhile.

Nothing is skipped silently:

* **Gaps.** A record whose source offset is beyond the next one is not applied, and its windows partition
  is *held*: no offset at or past that record is committed, however far consumption goes on. When the
  missing record arrives (a processor's retry, a redelivery) the sink seeks back to the held record and
  applies it and what follows. A gap older than ``gap_wait_s`` is reported: readiness red, the
  ``meterstream_sink_blocked_partitions`` gauge, an error log naming the offsets; it stays held until the
  record comes or an operator records the hole as lost (``meterstream accept-gap``), which the sink reads
  back and goes on past.
* **Poison records.** Only storage errors are retried. A record the planning fails on by itself (it would
  fail the same way forever) is applied as "failed": its events in the audit log with that status and the
  whole record in the dead-letter topic with the reason; the chain goes on.
* **Versions.** A record of a version this release does not read (a newer processor) holds its partition
  as a gap does, reported at once, until a sink that reads it is deployed (see ``schemas.records``).

User meters (``user_meters``, kept current by the process's entry point) are aggregated here into 1-minute
states from the audit rows of every batch, in the batch's own write (``sinks.clickhouse.meter_states``:
exactly once by offset markers of their own). A meter whose states are behind its source partitions (new, or
its events' history from before it was made) is first backfilled from the audit log, a chunk at a time
between batches; the stream goes on meanwhile, and from the chunk that reaches a partition's applied offset
on, that partition's events are aggregated with each batch: no gap, no overlap.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import zlib
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from prometheus_client import Counter, Gauge, Histogram
from rbloom import Bloom

from schemas.meters import UserMeter, WindowChange
from schemas.recent import RecentKeys
from schemas.records import DeadLetterRecord, UnsupportedVersion, WindowsRecord, decode_windows, encode
from schemas.settings import CONSUMER_FETCH_MAX_WAIT_MS, SinkSettings
from sinks.apply import Coords, EventKey, Marker, MeterStep, Plan, Source, covered, plan_batch

log = logging.getLogger(__name__)

STORED = Counter("meterstream_sink_events_stored_total", "Events written to the audit log", ["status"])
DUPLICATES = Counter("meterstream_sink_duplicates_total", "Events dropped as already stored (same source, id)")
REPLAYS = Counter("meterstream_sink_replayed_records_total", "Windows records skipped as already applied")
GAPS = Counter("meterstream_sink_gap_records_total", "Windows records held back behind a missing offset")
BLOCKED = Gauge(
    "meterstream_sink_blocked_partitions", "Windows partitions held behind a gap for longer than gap_wait_s"
)
POISON = Counter("meterstream_sink_failed_records_total", "Windows records applied as failed and dead-lettered")
UNREADABLE = Counter("meterstream_sink_unreadable_records_total", "Windows records that are not JSON records")
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
METER_STEPS = Counter(
    "meterstream_sink_meter_steps_total", "User meters' states brought forward", ["kind"]
)  # kind: "stream" (with a batch), "backfill" (a chunk of history)
BACKFILLING = Gauge(
    "meterstream_sink_meters_backfilling", "User meters whose states are behind a source partition this sink holds"
)


class Store(Protocol):
    def applied_offsets(self) -> dict[Source, int]: ...

    def accepted_gaps(self) -> dict[Source, list[tuple[int, int]]]: ...

    def stored_coords(self, keys: list[EventKey]) -> dict[EventKey, Coords]: ...

    def stored_keys(self, since: datetime) -> Iterator[EventKey]: ...

    def write(self, plan: Plan, stored_at: datetime, meter_steps: Sequence[MeterStep] = ()) -> None: ...


class MeterStore(Protocol):
    """The user meters' states (``sinks.clickhouse.meter_states.MeterStates``)."""

    def markers(self) -> dict[str, dict[Source, Marker]]: ...

    def chunk_end(self, meter: UserMeter, source: Source, after: int, upto: int, max_rows: int) -> int: ...

    def apply(self, steps: Sequence[MeterStep]) -> None: ...


class KafkaConsumer(Protocol):
    """The part of confluent-kafka's Consumer the sink uses (a fake one in the unit tests)."""

    def subscribe(self, topics: list[str], on_assign: Any = ..., on_revoke: Any = ...) -> None: ...

    def consume(self, num_messages: int = ..., timeout: float = ...) -> list[Message]: ...

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> Any: ...

    def poll(self, timeout: float = ...) -> Message | None: ...

    def pause(self, partitions: list[TopicPartition]) -> None: ...

    def resume(self, partitions: list[TopicPartition]) -> None: ...

    def seek(self, partition: TopicPartition) -> None: ...

    def assignment(self) -> list[TopicPartition]: ...

    def close(self) -> None: ...


class DeadLetters(Protocol):
    """Where poison records go: ``send`` returns once the broker has them (or raises)."""

    def send(self, letters: Sequence[DeadLetterRecord]) -> None: ...


@dataclass(slots=True)
class Hold:
    """A windows partition held at ``offset`` (nothing at or past it committed) until ``source``'s
    ``missing`` offset is applied or accepted as lost."""

    topic: str
    partition: int
    offset: int
    source: Source
    missing: int
    since: float
    reason: str
    blocked: bool = False

    def describe(self) -> str:
        topic_id, partition = self.source
        return (
            f"windows partition {self.partition} held at offset {self.offset}: {self.reason} (events topic "
            f"{topic_id} partition {partition}, first missing offset {self.missing})"
        )


#: Subjects are spread over this many write versions (Sink.usage_version).
VERSION_BUCKETS = 4096


def _bucket(subject: str) -> int:
    return zlib.crc32(subject.encode()) % VERSION_BUCKETS


class Sink:
    """Consumes the windows topic and applies it to the store. Run ``run()`` in a thread of its own.

    ``consumer`` and ``dead_letters`` default to real Kafka clients built from the settings."""

    def __init__(
        self,
        settings: SinkSettings,
        store: Store,
        consumer: KafkaConsumer | None = None,
        dead_letters: DeadLetters | None = None,
        meter_store: MeterStore | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._meter_store = meter_store
        #: The user meters to aggregate (set by the entry point whenever they change; read once per batch).
        self.user_meters: Sequence[UserMeter] = ()
        #: Each meter's markers as stored (by state id), read again after any failure or reassignment.
        self._meter_marks: dict[str, dict[Source, Marker]] = {}
        self._meter_reload = True
        self._backfill_after = 0.0
        #: The windows partitions this sink holds (a source partition travels in the windows partition of
        #: its number).
        self._assigned: set[int] = set()
        self._recent: RecentKeys[EventKey, Coords] = RecentKeys(settings.recent_keys)
        # Every key stored within the dedupe horizon. A key it does not hold was certainly never stored,
        # so only its (rare) positives need the exact lookup in the audit log.
        self._stored = Bloom(settings.dedupe_capacity, 0.01)
        self._stored_count = 0
        self._keys_loaded_at: datetime | None = None
        self._assigned_before = False
        self._applied: dict[Source, int] = {}
        #: Offset ranges an operator accepted as lost (read with the applied offsets, and while holding).
        self._holes: dict[Source, list[tuple[int, int]]] = {}
        #: Windows partitions held behind a gap, by partition number.
        self._holds: dict[int, Hold] = {}
        self._tended = 0.0
        # What readers in this process may know of the writes (see usage_version), under one lock.
        self._state_lock = threading.Lock()
        self._versions = [0] * VERSION_BUCKETS
        self._owns_all = False
        self._stop = threading.Event()
        self._generation = 0
        self._reload = True
        self._reload_keys = False
        self.ready = threading.Event()
        #: Time of the last successful write, for health checks.
        self.last_write: float | None = None
        #: Told the subjects of every write once it is stored (from the sink's thread: it must not block).
        #: The alerts' evaluator listens; a crash before it is told is caught up by its sweep at start.
        self.on_stored: Callable[[set[str]], None] | None = None
        #: Told every stored write's window changes with each changed subject's usage version before and
        #: after it (from the sink's thread, before its next write; see usage_version). The reservations'
        #: usage cache listens (control/usage_cache.py).
        self.on_windows_stored: (
            Callable[[Sequence[WindowChange], Mapping[str, tuple[Hashable, Hashable]]], None] | None
        ) = None
        self._dead_letters = dead_letters or KafkaDeadLetters(settings)
        self._consumer: Any = consumer or Consumer(
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

    def problems(self) -> list[str]:
        """What keeps this sink from applying everything it is given: partitions held behind a gap for
        longer than ``gap_wait_s``, or behind a record it cannot read (empty: none)."""
        with self._state_lock:
            return [hold.describe() for hold in self._holds.values() if hold.blocked]

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

    def _bump(self, buckets: set[int]) -> int:
        """Advance the buckets' versions; the generation they are of."""
        with self._state_lock:
            for b in buckets:
                self._versions[b] += 1
            return self._generation

    def _tell_windows(self, plan: Plan, before: int, after: int) -> None:
        """Tell ``on_windows_stored`` what a stored write added to the windows, with each changed subject's
        usage version before the write and after it (unless the write was not this sink's alone to tell:
        a rebalance, or a partition it does not hold)."""
        listener = self.on_windows_stored
        if listener is None or not plan.windows or before != after or self.usage_version("") is None:
            return
        generation = after
        versions: dict[str, tuple[Hashable, Hashable]] = {}
        changes: list[WindowChange] = []
        for (subject, provider, model, minute), totals in plan.windows.items():
            if subject not in versions:
                v = self._versions[_bucket(subject)]  # this thread alone writes them
                versions[subject] = ((generation, v - 2), (generation, v))
            minute_start = datetime.fromtimestamp(minute, UTC)
            changes.append(WindowChange(subject, provider, model, minute_start, totals.counts, totals.cost_atto))
        try:
            listener(changes, versions)
        except Exception:
            log.exception("sink: the stored-windows listener failed")

    def run(self) -> None:
        """Consume until ``stop()``. The batch in hand is then written, or, if storage is down, left
        uncommitted, to be redelivered."""
        if self._retrying(self._load_stored_keys) is _GAVE_UP:
            return
        self._consumer.subscribe([self._settings.topics.windows], on_assign=self._on_assign, on_revoke=self._on_revoke)
        batch: list[tuple[Message, WindowsRecord]] = []
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
                    if record is not None:
                        batch.append((message, record))
                        events += len(record["events"]["id"])
                        oldest = oldest or time.monotonic()
                waited_ms = (time.monotonic() - oldest) * 1000 if oldest is not None else 0.0
                if batch and (events >= self._settings.batch_events or waited_ms >= self._settings.max_wait_ms):
                    self._flush(batch)
                    batch, events, oldest = [], 0, None
                else:
                    self._idle()
            if batch:
                self._flush(batch)
        finally:
            self._consumer.close()

    def _decode(self, message: Message) -> WindowsRecord | None:
        """The record, or None for one the sink cannot apply now: a record of a version it does not read
        holds its partition (nothing past it is committed); bytes that are no record at all (not ours, or
        corrupt) are dead-lettered, and if they were ours, the gap they leave holds the partition."""
        value = message.value() or b""
        topic, partition, offset = message.topic() or "", message.partition() or 0, message.offset() or 0
        try:
            return decode_windows(value)
        except UnsupportedVersion as exc:
            source = (str(exc.record.get("topic_id", "?")), int(exc.record.get("partition", partition) or 0))
            missing = int(exc.record.get("offset", -1) or -1)
            if self._applied.get(source, -1) >= missing >= 0:
                return None  # a replay: already applied (by an earlier copy this sink could read)
            self._hold(Hold(topic, partition, offset, source, missing, time.monotonic(), str(exc)), report_now=True)
            return None
        except ValueError as exc:
            UNREADABLE.inc()
            log.error("sink: windows record at %s:%s is not a record (%s); dead-lettered", partition, offset, exc)
            reason = f"not a windows record: {exc}"[:500]
            letter: DeadLetterRecord = {
                "reason": reason,
                "topic_id": topic,
                "partition": partition,
                "offset": offset,
                "raw": value.decode("utf-8", errors="replace"),
            }
            self._retrying(lambda: self._dead_letters.send([letter]))
            return None

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Another sink may have advanced these partitions while they were not ours, and stored keys this
        # one has not seen: reload the applied offsets and catch up the stored keys before the next batch
        # (not here: a callback must not block on storage).
        with self._state_lock:
            self._generation += 1
            self._reload = True
            # (The first assignment follows the full load at start: nothing to catch up.)
            self._reload_keys = self._assigned_before
            self._assigned_before = True
            self._owns_all = len({p.partition for p in partitions}) >= self._settings.topics.partitions
            assigned = {p.partition for p in partitions}
            self._holds = {n: hold for n, hold in self._holds.items() if n in assigned}
            self._assigned = assigned
            self._meter_reload = True
        log.info("sink: assigned windows partitions %s", sorted(p.partition for p in partitions))
        self.ready.set()

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        with self._state_lock:
            self._generation += 1
            self._owns_all = False
            revoked = {p.partition for p in partitions}
            self._assigned -= revoked
            self._meter_reload = True
            # Their held records were never committed past: the next owner reads them again.
            self._holds = {n: hold for n, hold in self._holds.items() if n not in revoked}
        self._set_blocked()

    def _flush(self, batch: list[tuple[Message, WindowsRecord]]) -> None:
        started = time.monotonic()
        generation = self._generation
        if self._reload and self._retrying(self._reload_state) is _GAVE_UP:
            return
        meters = self.user_meters
        if meters and self._meter_reload and self._retrying(self._load_meter_marks) is _GAVE_UP:
            return
        records = [record for _, record in batch]
        plan = self._plan(records)
        if plan is _GAVE_UP or generation != self._generation:
            return
        for position in plan.gapped:
            message, record = batch[position]
            source = (record["topic_id"], record["partition"])
            self._hold(
                Hold(
                    message.topic() or "",
                    message.partition() or 0,
                    message.offset() or 0,
                    source,
                    plan.missing[source],
                    time.monotonic(),
                    "a record before this one is missing",
                )
            )
        stored_at = datetime.now(UTC)
        # Odd versions while the write is in flight, new even ones after it (whatever its outcome).
        touched = {_bucket(key[0]) for key in plan.windows}
        steps = self._stream_steps(plan, meters)
        before = self._bump(touched)
        try:
            if steps:
                written = self._retrying(lambda: self._store.write(plan, stored_at, meter_steps=steps))
            else:
                written = self._retrying(lambda: self._store.write(plan, stored_at))
            if written is _GAVE_UP:
                return
            with self._state_lock:
                self._applied.update(plan.offsets)
        finally:
            after = self._bump(touched)
        self._stepped(steps, "stream")
        self._tell_windows(plan, before, after)
        # Written: now (and only now) the windows-topic offsets may be committed, never at or past a held
        # record (a restart must read it again).
        offsets: dict[tuple[str, int], int] = {}
        for message, _ in batch:
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if topic is not None and partition is not None and offset is not None:
                offsets[(topic, partition)] = max(offsets.get((topic, partition), -1), offset + 1)
        for (topic, partition), offset in list(offsets.items()):
            hold = self._holds.get(partition)
            if hold is not None and hold.topic == topic:
                offsets[(topic, partition)] = min(offset, hold.offset)
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
        except Exception:  # a rebalance took the partitions: the next owner replays, the check skips
            log.warning("sink: offset commit failed after write; the replay will be skipped", exc_info=True)
        self._record(plan, stored_at, started)
        if self._holds:
            self._tend_holds(reread=False)
        if self.on_stored is not None and plan.windows:
            try:
                self.on_stored({key[0] for key in plan.windows})
            except Exception:
                log.exception("sink: the stored-subjects listener failed")

    def _reload_state(self) -> None:
        """After an assignment: the stored keys caught up, the applied offsets and accepted gaps read again."""
        if self._reload_keys:
            self._catch_up_stored_keys()
        loaded = (self._store.applied_offsets(), self._store.accepted_gaps())
        with self._state_lock:
            (self._applied, self._holes), self._reload, self._reload_keys = loaded, False, False

    def _load_meter_marks(self) -> None:
        assert self._meter_store is not None
        self._meter_marks = self._meter_store.markers()
        self._meter_reload = False

    def _stream_steps(self, plan: Plan, meters: Sequence[UserMeter]) -> list[MeterStep]:
        """The user meters' states to write with ``plan``: for each meter, the plan's source partitions
        where its states are up to the applied offset (the others are backfilled first)."""
        if self._meter_store is None or self._meter_reload:
            return []
        steps = []
        # A caught-up meter's ranges are exactly the plan's records (its markers stand at the applied
        # offsets), whose audit rows are these events (a replay's rows are the same events): a meter of
        # another type has nothing to read there.
        types = plan.event_types() if meters else set()
        for meter in meters:
            marks = self._meter_marks.get(meter.state_id, {})
            ranges = tuple(
                (source, upto, True)
                for source, upto in plan.offsets.items()
                if _offset(marks.get(source)) >= self._applied.get(source, -1)
            )
            if ranges:
                steps.append(MeterStep(meter, ranges, events=meter.event_type in types))
        return steps

    def _stepped(self, steps: Sequence[MeterStep], kind: str) -> None:
        """Record what ``steps``, now stored, brought the markers to."""
        for step in steps:
            marks = self._meter_marks.setdefault(step.meter.state_id, {})
            for source, upto, caught in step.ranges:
                marks[source] = Marker(upto, caught)
        if steps:
            METER_STEPS.labels(kind).inc(len(steps))

    def _idle(self) -> None:
        """Between batches: the state reloaded after an assignment if no batch has come to do it (a restart
        with nothing new to read: readers then know the versions, and backfills can start), held partitions
        tended, one chunk of backfill."""
        if self._reload and time.monotonic() >= self._backfill_after:
            try:
                self._reload_state()
            except Exception as exc:
                log.warning("sink: the applied offsets cannot be read (%s); retrying in 1s", exc)
                self._backfill_after = time.monotonic() + 1.0
                return
        if self._holds and time.monotonic() - self._tended >= 1.0:
            self._tend_holds()
        self._backfill()

    def _backfill(self) -> None:
        """One chunk of backfill, when a user meter's states are behind a source partition this sink holds
        (between batches: the stream is never held up by more than one chunk). A failure is retried a second
        later, from the markers as stored."""
        meters, store = self.user_meters, self._meter_store
        if not meters or store is None or self._reload or time.monotonic() < self._backfill_after:
            return
        generation = self._generation
        try:
            if self._meter_reload:
                self._load_meter_marks()
            owned = {s: a for s, a in self._applied.items() if s[1] in self._assigned}
            behind = [
                (meter, source, applied)
                for meter in meters
                for source, applied in sorted(owned.items())
                if _offset(self._meter_marks.get(meter.state_id, {}).get(source)) < applied
            ]
            BACKFILLING.set(len({meter.state_id for meter, _, _ in behind}))
            if not behind:
                self._backfill_after = time.monotonic() + 1.0
                return
            meter, source, applied = behind[0]
            after = _offset(self._meter_marks.get(meter.state_id, {}).get(source))
            upto = store.chunk_end(meter, source, after, applied, self._settings.backfill_chunk_rows)
            if generation != self._generation:
                return
            step = MeterStep(meter, ((source, upto, upto == applied),))
            store.apply([step])
        except Exception as exc:
            log.warning("sink: a user meter's backfill failed (%s); retrying in 1s", exc)
            self._meter_reload = True
            self._backfill_after = time.monotonic() + 1.0
            return
        self._stepped([step], "backfill")
        log.info(
            "sink: meter %s backfilled to offset %d of %d in partition %s:%d",
            meter.slug,
            upto,
            applied,
            *source,
        )

    def _plan(self, records: list[WindowsRecord]) -> Plan | Any:
        """``plan_batch`` with storage errors retried and poison records isolated: a record the planning
        fails on by itself is replaced by its "failed" version (and dead-lettered); the rest is planned."""

        def attempt() -> Plan | BaseException:
            try:
                return plan_batch(records, self._applied, self._lookup, self._holes)
            except _StorageError:
                raise
            except Exception as exc:
                return exc

        result = self._retrying(attempt)
        if not isinstance(result, BaseException):
            return result
        log.error("sink: a batch cannot be planned (%s); looking for the records at fault", result)
        letters: list[DeadLetterRecord] = []
        for i, record in enumerate(records):
            alone = self._retrying(lambda record=record: self._plans_alone(record))
            if alone is _GAVE_UP:
                return _GAVE_UP
            if alone is not None:
                records[i] = _failed(record, alone)
                letters.append(_letter(record, alone))
        result = self._retrying(attempt)
        if isinstance(result, BaseException):
            # Only the combination fails (e.g. duplicates across records that disagree): every record of
            # the batch is applied as failed rather than the pipeline stalling; all are dead-lettered.
            log.error("sink: the batch still cannot be planned (%s); applying all of it as failed", result)
            reason = f"{type(result).__name__}: {result}"[:500]
            letters = [_letter(record, reason) for record in records]
            records[:] = [_failed(record, reason) for record in records]
            result = self._retrying(attempt)
            if isinstance(result, BaseException):
                raise result
        if result is _GAVE_UP or self._retrying(lambda: self._dead_letters.send(letters)) is _GAVE_UP:
            return _GAVE_UP
        POISON.inc(len(letters))
        return result

    def _plans_alone(self, record: WindowsRecord) -> str | None:
        """Why ``record`` cannot be planned on its own (None: it can). Storage errors propagate."""
        source = (record.get("topic_id"), record.get("partition"))
        try:
            plan_batch([record], {source: record["offset"] - 1}, self._lookup)
        except _StorageError:
            raise
        except Exception as exc:
            return f"cannot be applied: {type(exc).__name__}: {exc}"[:500]
        return None

    def _hold(self, hold: Hold, report_now: bool = False) -> None:
        """Hold ``hold.partition`` at ``hold.offset`` (an earlier hold of it stays); ``report_now``: blocked
        at once (nothing will fill it), not after ``gap_wait_s``."""
        GAPS.inc()
        with self._state_lock:
            held = self._holds.get(hold.partition)
            if held is not None and held.offset <= hold.offset:
                return
            self._holds[hold.partition] = hold
        log.warning("sink: %s", hold.describe())
        if report_now:
            self._block(hold)

    def _block(self, hold: Hold) -> None:
        if not hold.blocked:
            hold.blocked = True
            log.error(
                "sink: %s. Nothing past it is applied or committed until it comes; if it is gone for good, "
                "run `meterstream accept-gap --topic-id %s --partition %d --first %d --last <offset>`",
                hold.describe(),
                hold.source[0],
                hold.source[1],
                hold.missing,
            )
        self._set_blocked()

    def _set_blocked(self) -> None:
        BLOCKED.set(sum(1 for hold in list(self._holds.values()) if hold.blocked))

    def _tend_holds(self, reread: bool = True) -> None:
        """Release the holds whose missing offset is now applied or accepted as lost (reading the
        accepted holes back when ``reread``), seeking back to the held record; report the ones waiting
        longer than ``gap_wait_s``."""
        self._tended = time.monotonic()
        if reread:
            try:
                holes = self._store.accepted_gaps()
            except Exception as exc:
                log.warning("sink: cannot read the accepted gaps (%s)", exc)
            else:
                with self._state_lock:
                    self._holes = holes
        now = time.monotonic()
        for partition, hold in list(self._holds.items()):
            filled = self._applied.get(hold.source, -1) >= hold.missing
            accepted = covered(self._holes.get(hold.source, ()), hold.missing, hold.missing)
            if filled or accepted:
                with self._state_lock:
                    self._holds.pop(partition, None)
                log.info("sink: %s: released (%s)", hold.describe(), "filled" if filled else "accepted as lost")
                try:
                    self._consumer.seek(TopicPartition(hold.topic, partition, hold.offset))
                except Exception as exc:  # no longer ours: the next owner starts from the commit, before it
                    log.info("sink: cannot seek back to the held record (%s)", exc)
            elif now - hold.since >= self._settings.gap_wait_s:
                self._block(hold)
        self._set_blocked()

    def _load_stored_keys(self) -> None:
        """Every key stored within the dedupe horizon, into a fresh Bloom filter (at start)."""
        self._stored = Bloom(self._settings.dedupe_capacity, 0.01)
        self._stored_count = 0
        self._add_stored_keys(datetime.now(UTC) - timedelta(days=self._settings.dedupe_horizon_days), "loaded")

    def _catch_up_stored_keys(self) -> None:
        """Add the keys stored since the last load (by other sinks, while these partitions were theirs)."""
        assert self._keys_loaded_at is not None
        # The margin covers other sinks' clocks and their writes in flight when the keys were read.
        self._add_stored_keys(self._keys_loaded_at - _KEYS_MARGIN, "caught up after a reassignment")

    def _add_stored_keys(self, since: datetime, what: str) -> None:
        started, now, added = time.monotonic(), datetime.now(UTC), 0
        for key in self._store.stored_keys(since):
            self._stored.add(key)
            added += 1
        self._stored_count += added
        self._keys_loaded_at = now
        log.info("sink: %d stored event keys %s in %.1fs", added, what, time.monotonic() - started)

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
            try:
                found.update(self._store.stored_coords(missing))
            except Exception as exc:
                raise _StorageError(str(exc)) from exc
        return found

    def _record(self, plan: Plan, stored_at: datetime, started: float) -> None:
        now = stored_at.timestamp()
        stored = 0
        for kept in plan.events:
            events = kept.record["events"]
            statuses_column = events["status"]
            if kept.rows is None and "failed" not in statuses_column:
                # The common case, in bulk: every row stored, each a stored key.
                pairs = list(kept.keys_and_coords())
                self._recent.add_all(pairs)
                self._stored.update(key for key, _ in pairs)
                stored += len(pairs)
                statuses = collections.Counter(statuses_column)
            else:
                for i, (key, coords) in zip(kept.positions(), kept.keys_and_coords(), strict=True):
                    if statuses_column[i] == "failed":
                        continue  # not a stored key (see sinks.apply)
                    self._recent.add(key, coords)
                    self._stored.add(key)
                    stored += 1
                statuses = collections.Counter(statuses_column[i] for i in kept.positions())
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


def _offset(marker: Marker | None) -> int:
    return -1 if marker is None else marker.offset


class KafkaDeadLetters:
    """The dead-letter topic, written by the sink for poison records (acknowledged before ``send`` returns)."""

    def __init__(self, settings: SinkSettings) -> None:
        self._topic = settings.topics.dead_letter
        self._config = settings.kafka.to_librdkafka() | {"acks": "all", "enable.idempotence": "true"}
        self._producer: Producer | None = None  # made on first use: most sinks never need one

    def send(self, letters: Sequence[DeadLetterRecord]) -> None:
        if not letters:
            return
        if self._producer is None:
            self._producer = Producer(self._config)
        failures: list[str] = []

        def report(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                failures.append(error.str())

        for letter in letters:
            self._producer.produce(self._topic, encode(letter), on_delivery=report)
        if self._producer.flush(10) or failures:
            raise RuntimeError(f"dead letters not acknowledged: {failures or 'timed out'}")


class _StorageError(Exception):
    """A storage failure met while planning (retried, never taken for a poison record)."""


#: How far back the stored keys are read again after a reassignment.
_KEYS_MARGIN = timedelta(minutes=5)


def _failed(record: WindowsRecord, reason: str) -> WindowsRecord:
    """``record`` applied as failed: nothing in any window, its events (if its columns hold together) in the
    audit log with status "failed"."""
    events = record.get("events")
    columns: Any = None
    try:
        n = len(events["id"])
        if all(len(events[name]) == n for name in events):  # type: ignore[literal-required]
            columns = dict(events) | {
                "status": ["failed"] * n,
                "price_source": [reason] * n,
                "cost_atto": [None] * n,
                "cost_input_atto": [None] * n,
                "cost_output_atto": [None] * n,
            }
    except (TypeError, KeyError, AttributeError):
        columns = None
    if columns is None:
        columns = {name: [] for name in WindowsRecord.__annotations__["events"].__annotations__}
    return {
        "v": record["v"],
        "topic_id": record["topic_id"],
        "partition": record["partition"],
        "offset": record["offset"],
        "windows": [],
        "events": columns,
    }


def _letter(record: WindowsRecord, reason: str) -> DeadLetterRecord:
    return {
        "reason": reason,
        "topic_id": str(record.get("topic_id", "")),
        "partition": int(record.get("partition", -1)),
        "offset": int(record.get("offset", -1)),
        "raw": orjson.dumps(record, default=str).decode(),
    }


_GAVE_UP: Any = object()

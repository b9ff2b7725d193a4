"""The Sink class's commit, gap, poison, version and rebalance logic, with a fake consumer and store.

Issue 19: a gap in a partition's offset chain used to be skipped *and* committed past (the records after
it lost for good); a record the planning failed on was retried forever; a newer record version was
dropped like an undecodable one. These tests pin down the rules that replaced that (sinks/consumer.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import orjson
import pytest
from confluent_kafka import TopicPartition

import schemas.records
from schemas.records import DeadLetterRecord, WindowsRecord
from schemas.settings import SinkSettings, TopicSettings
from sinks.apply import Coords, EventKey, MeterStep, Plan, Source
from sinks.consumer import Sink
from tests.unit.test_apply import record as make_record
from tests.unit.test_apply import row

TOPIC = "windows"


class FakeMessage:
    def __init__(self, partition: int, offset: int, value: bytes) -> None:
        self._partition, self._offset, self._value = partition, offset, value

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def error(self) -> None:
        return None


class FakeConsumer:
    """One windows topic held in memory: partition -> values. Seeks, commits and rebalances as Kafka does."""

    def __init__(self, partitions: int = 1) -> None:
        self.log: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
        self.position = dict.fromkeys(self.log, 0)
        self.committed: dict[int, int] = {}
        self.callbacks: tuple[Callable[..., None], Callable[..., None]] | None = None
        self.lock = threading.Lock()

    def append(self, partition: int, value: bytes | WindowsRecord) -> None:
        with self.lock:
            self.log[partition].append(value if isinstance(value, bytes) else orjson.dumps(value))

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None) -> None:
        self.callbacks = (on_assign, on_revoke)
        on_assign(self, [TopicPartition(TOPIC, p) for p in self.log])

    def rebalance(self) -> None:
        """Every partition revoked and assigned again: consumption restarts from the committed offsets."""
        assert self.callbacks is not None
        on_assign, on_revoke = self.callbacks
        with self.lock:
            on_revoke(self, [TopicPartition(TOPIC, p) for p in self.log])
            self.position = {p: self.committed.get(p, 0) for p in self.log}
            on_assign(self, [TopicPartition(TOPIC, p) for p in self.log])

    def consume(self, num_messages: int = 1000, timeout: float = 0.05) -> list[FakeMessage]:
        with self.lock:
            out = []
            for partition, values in self.log.items():
                while self.position[partition] < len(values) and len(out) < num_messages:
                    offset = self.position[partition]
                    out.append(FakeMessage(partition, offset, values[offset]))
                    self.position[partition] = offset + 1
        if not out:
            time.sleep(timeout)
        return out

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        for tp in offsets:
            self.committed[tp.partition] = tp.offset

    def seek(self, partition: TopicPartition) -> None:
        self.position[partition.partition] = partition.offset

    def poll(self, timeout: float = 0.0) -> None:
        time.sleep(min(timeout, 0.01))

    def pause(self, partitions: list[TopicPartition]) -> None:
        pass

    def resume(self, partitions: list[TopicPartition]) -> None:
        pass

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, p) for p in self.log]

    def close(self) -> None:
        pass


class FakeStore:
    """The sink's storage in memory: applied offsets, audit rows, request totals per subject."""

    def __init__(self) -> None:
        self.applied: dict[Source, int] = {}
        self.rows: list[tuple[EventKey, Coords, str]] = []
        self.requests = 0
        self.holes: dict[Source, list[tuple[int, int]]] = {}
        self.fail_writes = 0

    def applied_offsets(self) -> dict[Source, int]:
        return dict(self.applied)

    def accepted_gaps(self) -> dict[Source, list[tuple[int, int]]]:
        return {k: list(v) for k, v in self.holes.items()}

    def stored_coords(self, keys: list[EventKey]) -> dict[EventKey, Coords]:
        wanted = set(keys)
        return {key: coords for key, coords, status in self.rows if key in wanted and status != "failed"}

    def stored_keys(self, since: datetime) -> Iterator[EventKey]:
        return iter([key for key, _, status in self.rows if status != "failed"])

    def write(self, plan: Plan, stored_at: datetime, meter_steps: Sequence[MeterStep] = ()) -> None:
        if self.fail_writes:
            self.fail_writes -= 1
            raise ConnectionError("storage away")
        for kept in plan.events:
            statuses = kept.record["events"]["status"]
            for i, (key, coords) in zip(kept.positions(), kept.keys_and_coords(), strict=True):
                self.rows.append((key, coords, statuses[i]))
        self.requests += sum(totals.counts[0] for totals in plan.windows.values())
        self.applied.update(plan.offsets)


class Letters:
    def __init__(self) -> None:
        self.sent: list[DeadLetterRecord] = []

    def send(self, letters: Sequence[DeadLetterRecord]) -> None:
        self.sent.extend(letters)


class Running:
    def __init__(self, consumer: FakeConsumer, store: FakeStore, **settings: Any) -> None:
        self.consumer, self.store, self.letters = consumer, store, Letters()
        config = SinkSettings(
            topics=TopicSettings(windows=TOPIC, partitions=len(consumer.log)),
            max_wait_ms=10,
            retry_initial_ms=10,
            retry_max_ms=20,
            dedupe_capacity=1000,
            **settings,
        )
        self.sink = Sink(config, store, consumer, self.letters)
        self.thread = threading.Thread(target=self.sink.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sink.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()


def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def counted(offset: int, event_id: str, topic: str = "T") -> WindowsRecord:
    return make_record(offset, row(event_id, 0), topic=topic)


def test_commit_follows_the_write_and_each_offset_counts_once() -> None:
    consumer, store = FakeConsumer(), FakeStore()
    for offset in range(3):
        consumer.append(0, counted(offset, f"e{offset}"))
    consumer.append(0, counted(1, "e1"))  # a redelivered output: a replay
    store.fail_writes = 2  # storage away for the first two attempts: nothing committed meanwhile
    with Running(consumer, store) as running:
        until(lambda: consumer.committed.get(0) == 4)
        assert running.sink.problems() == []
    assert store.applied == {("T", 0): 2}
    assert store.requests == 3


def test_a_transient_gap_holds_the_partition_and_is_filled_by_seeking_back() -> None:
    consumer, store = FakeConsumer(), FakeStore()
    consumer.append(0, counted(0, "e0"))
    consumer.append(0, counted(2, "e2"))  # source offset 1 is missing: held here (windows offset 1)
    consumer.append(0, counted(3, "e3"))
    with Running(consumer, store) as running:
        until(lambda: store.applied == {("T", 0): 0} and consumer.position[0] == 3)
        time.sleep(0.1)
        # Never committed past the held record, however far consumption went.
        assert consumer.committed.get(0, 0) <= 1
        assert running.sink.problems() == []  # not blocked yet: within gap_wait_s
        consumer.append(0, counted(1, "e1"))  # the processor's retry: the missing record comes
        until(lambda: store.applied == {("T", 0): 3})
        until(lambda: consumer.committed.get(0) == 4)
    assert store.requests == 4
    assert sorted(key[1] for key, _, _ in store.rows) == ["e0", "e1", "e2", "e3"]


def test_a_persistent_gap_blocks_visibly_until_accepted_as_lost() -> None:
    consumer, store = FakeConsumer(), FakeStore()
    consumer.append(0, counted(0, "e0"))
    consumer.append(0, counted(3, "e3"))  # offsets 1 and 2 never come (retention removed them)
    consumer.append(0, counted(4, "e4"))
    with Running(consumer, store, gap_wait_s=0.3) as running:
        until(lambda: bool(running.sink.problems()))
        (problem,) = running.sink.problems()
        assert "first missing offset 1" in problem and "held at offset 1" in problem
        assert store.applied == {("T", 0): 0}
        assert consumer.committed.get(0, 0) <= 1
        store.holes = {("T", 0): [(1, 2)]}  # meterstream accept-gap --first 1 --last 2
        until(lambda: store.applied == {("T", 0): 4})
        until(lambda: running.sink.problems() == [] and consumer.committed.get(0) == 3)
    assert store.requests == 3


def test_a_new_database_on_a_topic_whose_start_is_gone_blocks_instead_of_storing_nothing() -> None:
    consumer, store = FakeConsumer(), FakeStore()
    for offset in (500, 501):  # offsets 0..499 removed by retention: no marker says where to start
        consumer.append(0, counted(offset, f"e{offset}"))
    with Running(consumer, store, gap_wait_s=0.2) as running:
        until(lambda: bool(running.sink.problems()))
        assert "first missing offset 0" in running.sink.problems()[0]
        store.holes = {("T", 0): [(0, 499)]}
        until(lambda: store.applied == {("T", 0): 501})
    assert store.requests == 2


def test_a_poison_record_is_applied_as_failed_dead_lettered_and_the_chain_goes_on() -> None:
    consumer, store = FakeConsumer(), FakeStore()
    consumer.append(0, counted(0, "e0"))
    poison = counted(1, "e1")
    del poison["windows"][0]["requests"]  # planning it fails the same way on every try
    consumer.append(0, poison)
    consumer.append(0, counted(2, "e2"))
    with Running(consumer, store) as running:
        until(lambda: store.applied == {("T", 0): 2})
        until(lambda: consumer.committed.get(0) == 3)
        letters = running.letters.sent
    assert [(letter["offset"], "KeyError" in letter["reason"]) for letter in letters] == [(1, True)]
    assert orjson.loads(letters[0]["raw"])["offset"] == 1
    assert store.requests == 2
    assert sorted((key[1], status) for key, _, status in store.rows) == [
        ("e0", "counted"),
        ("e1", "failed"),
        ("e2", "counted"),
    ]


def test_a_failed_event_sent_again_once_fixed_counts() -> None:
    consumer, store = FakeConsumer(), FakeStore()
    consumer.append(0, make_record(0, row("e1", 0, status="failed")))
    consumer.append(0, counted(1, "e1"))
    with Running(consumer, store):
        until(lambda: store.applied == {("T", 0): 1})
    assert store.requests == 1


def test_an_undecodable_record_is_dead_lettered_and_its_gap_holds() -> None:
    consumer, store = FakeConsumer(), FakeStore()
    consumer.append(0, counted(0, "e0"))
    consumer.append(0, b"\x00not json")
    consumer.append(0, counted(2, "e2"))
    with Running(consumer, store, gap_wait_s=0.2) as running:
        until(lambda: bool(running.sink.problems()))
        assert [letter.get("raw") for letter in running.letters.sent] == ["\x00not json"]
        assert store.applied == {("T", 0): 0}
        assert consumer.committed.get(0, 0) <= 2


def test_a_newer_record_version_holds_until_a_sink_that_reads_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    consumer, store = FakeConsumer(), FakeStore()
    consumer.append(0, counted(0, "e0"))
    newer_version = max(schemas.records.READABLE_VERSIONS) + 1
    newer = counted(1, "e1") | {"v": newer_version}  # type: ignore[operator]
    consumer.append(0, newer)
    consumer.append(0, counted(2, "e2"))
    with Running(consumer, store) as old:
        until(lambda: bool(old.sink.problems()))  # reported at once, not after gap_wait_s
        assert "upgrade this service first" in old.sink.problems()[0]
        time.sleep(0.1)
        assert store.applied == {("T", 0): 0}
        assert consumer.committed.get(0, 0) <= 1
    # The upgraded sink reads the newer version: it resumes from the commit and applies the rest.
    readable = schemas.records.READABLE_VERSIONS | {newer_version}
    monkeypatch.setattr(schemas.records, "READABLE_VERSIONS", readable)
    consumer.position[0] = consumer.committed.get(0, 0)
    with Running(consumer, store) as new:
        until(lambda: store.applied == {("T", 0): 2})
        assert new.sink.problems() == []
    assert store.requests == 3


def test_an_addition_of_a_newer_processor_is_read_by_this_sink() -> None:
    consumer, store = FakeConsumer(), FakeStore()
    consumer.append(0, counted(0, "e0") | {"meters": {"m1": 3}})  # type: ignore[operator]
    with Running(consumer, store):
        until(lambda: store.applied == {("T", 0): 0})
    assert store.requests == 1


def test_rebalance_reloads_offsets_and_stored_keys_advanced_by_another_sink() -> None:
    consumer, store = FakeConsumer(partitions=2), FakeStore()
    consumer.append(0, counted(0, "e0"))
    with Running(consumer, store) as running:
        until(lambda: store.applied == {("T", 0): 0})
        # While partition 1 was another sink's, it applied offset 0 of source partition 1 and stored "x".
        store.applied[("T", 1)] = 0
        store.rows.append((("app", "x"), ("T", 1, 0, 0), "counted"))
        consumer.rebalance()
        consumer.append(1, make_record(0, row("x", 0), partition=1))  # its replay: skipped by the marker
        consumer.append(1, make_record(1, row("x", 0), partition=1))  # "x" sent again: a duplicate
        consumer.append(1, make_record(2, row("y", 0), partition=1))
        until(lambda: store.applied.get(("T", 1)) == 2)
        assert running.sink.problems() == []
    assert store.requests == 2  # e0 and y: x was counted once, by the other sink

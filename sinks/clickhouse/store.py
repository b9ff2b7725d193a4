"""Writes of the sink: the audit log, then the user meters' states and the window deltas, each with their
offset markers, atomically."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from clickhouse_connect.driver.client import Client

from schemas.events import to_micros
from schemas.meters import WINDOW_COUNTS
from schemas.money import from_atto
from schemas.records import AUDIT_COLUMNS, BIG_AMOUNTS_VERSION, atto
from sinks.apply import Coords, EventKey, MeterStep, Plan, Source
from sinks.clickhouse.connection import ClickHouse
from sinks.clickhouse.meter_states import MeterStates

_EVENT_COLUMNS: Final = (
    "source",
    "id",
    "subject",
    "type",
    "time",
    "received_at",
    "stored_at",
    "data",
    "provider",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "usage",
    "cost_atto",
    "cost_input_atto",
    "cost_output_atto",
    "price_source",
    "status",
    "src_topic",
    "src_partition",
    "src_offset",
    "src_index",
)
#: Audit columns of atto-dollar amounts (decimal strings past 64 bits in a record of BIG_AMOUNTS_VERSION).
_AMOUNTS: Final = frozenset({"cost_atto", "cost_input_atto", "cost_output_atto"})
#: Audit columns of a windows record whose table column has another name.
_AUDIT_TO_TABLE: Final = {"index": "src_index", "time_us": "time", "received_us": "received_at"}
_WINDOW_COLUMNS: Final = (
    "subject",
    "window_start",
    "provider",
    "model",
    "src_topic",
    "src_partition",
    *WINDOW_COUNTS,
    "cost_usd",
    "applied_offset",
)
#: Largest number of keys looked up in one query.
_LOOKUP_CHUNK: Final = 10_000


class WindowStore:
    """The sink's side of ClickHouse (``sinks.clickhouse.schema`` describes the tables)."""

    def __init__(self, ch: ClickHouse) -> None:
        self._ch = ch
        self._meters = MeterStates(ch)

    @property
    def meters(self) -> MeterStates:
        """The user meters' states (``meter_windows``)."""
        return self._meters

    def applied_offsets(self) -> dict[Source, int]:
        """The last applied events-topic offset of every source partition."""
        rows = (
            self._ch.client()
            .query(
                "SELECT src_topic, src_partition, max(applied_offset) FROM usage_windows "
                "WHERE subject = '' GROUP BY src_topic, src_partition"
            )
            .result_rows
        )
        return {(str(topic), int(partition)): int(offset) for topic, partition, offset in rows}

    def stored_coords(self, keys: list[EventKey]) -> dict[EventKey, Coords]:
        """Where the stored occurrence of each of these events came from (unknown keys are absent)."""
        found: dict[EventKey, Coords] = {}
        client = self._ch.client()
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start : start + _LOOKUP_CHUNK]
            rows = client.query(
                "SELECT source, id, src_topic, src_partition, src_offset, src_index FROM usage_events "
                "WHERE (source, id) IN {keys:Array(Tuple(String, String))} AND status != 'failed'",
                parameters={"keys": chunk},
            ).result_rows
            for source, event_id, topic, partition, offset, index in rows:
                found.setdefault((source, event_id), (topic, int(partition), int(offset), int(index)))
        return found

    def stored_keys(self, since: datetime) -> Iterator[EventKey]:
        """(source, id) of every event stored since ``since`` (not counting "failed" ones), streamed."""
        with self._ch.client().query_row_block_stream(
            "SELECT source, id FROM usage_events "
            "WHERE stored_at >= {since:DateTime64(6, 'UTC')} AND status != 'failed'",
            parameters={"since": since},
        ) as blocks:
            for block in blocks:
                yield from ((source, event_id) for source, event_id in block)

    def write(self, plan: Plan, stored_at: datetime, meter_steps: Sequence[MeterStep] = ()) -> None:
        """Store a batch. Audit rows first (rewriting them is harmless), then the caught-up user meters'
        states of those rows (``meter_steps``, each up to the batch's offsets), then every window delta and
        the new offset markers in one INSERT: visible together or not at all. A retry with the same plan is
        dropped by ClickHouse as a duplicate block (the token identifies the offsets it advances). The
        meters' states are stored before the windows' markers, so once an offset is applied every caught-up
        meter holds its events too."""
        client = self._ch.client()
        if plan.stored_count():
            _insert(client, "usage_events", _EVENT_COLUMNS, _event_columns(plan, stored_at))
        if meter_steps:
            self._meters.apply(meter_steps)
        if not plan.offsets:
            return
        _insert(
            client,
            "usage_windows",
            _WINDOW_COLUMNS,
            _window_columns(plan),
            settings={"insert_deduplication_token": _token(plan.offsets.items())},
        )

    def accepted_gaps(self) -> dict[Source, list[tuple[int, int]]]:
        """The offset ranges (inclusive) an operator accepted as missing, per source partition."""
        rows = (
            self._ch.client()
            .query("SELECT src_topic, src_partition, first_offset, last_offset FROM accepted_gaps")
            .result_rows
        )
        gaps: dict[Source, list[tuple[int, int]]] = {}
        for topic, partition, first, last in rows:
            gaps.setdefault((str(topic), int(partition)), []).append((int(first), int(last)))
        return gaps

    def check(self) -> None:
        """Raise unless ClickHouse can read table data (``SELECT 1`` succeeds even with the files gone)."""
        self._ch.client().query("SELECT max(applied_offset), count() FROM usage_windows WHERE subject = ''")
        self._ch.client().query("SELECT version, description FROM meterstream_migrations")


def _insert(
    client: Client, table: str, names: Sequence[str], columns: list[list[Any]], settings: dict[str, Any] | None = None
) -> None:
    try:
        client.insert(table, columns, column_names=list(names), column_oriented=True, settings=settings)
    finally:
        # clickhouse-connect keeps the columns on its insert context after the insert, and the context sits
        # in a reference cycle that only a full garbage collection frees (rare: see meterstream.services'
        # GC tuning). Every batch's values then stayed alive until one ran: the sink grew by ~1 GB in a
        # 10-minute soak and fell back in steps. The lists are ours and used once: empty them.
        for column in columns:
            column.clear()


def _token(offsets: Iterable[tuple[Source, int]]) -> str:
    text = ";".join(f"{topic}:{partition}:{offset}" for (topic, partition), offset in sorted(offsets))
    return "ms-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _event_columns(plan: Plan, stored_at: datetime) -> list[list[Any]]:
    """Audit columns in table order. Records arrive column-oriented, so this is mostly list extension:
    DateTime64(6) takes microsecond ticks and costs are integer atto-dollars, both as they come."""
    stored_us = to_micros(stored_at)
    out: dict[str, list[Any]] = {name: [] for name in _EVENT_COLUMNS}
    for kept in plan.events:
        record, events = kept.record, kept.record["events"]
        rows = kept.rows
        n = len(events["id"]) if rows is None else len(rows)
        if n == 0:
            continue
        for name in AUDIT_COLUMNS:
            column = events[name]  # type: ignore[literal-required]
            if name in _AMOUNTS and record["v"] == BIG_AMOUNTS_VERSION:
                column = [None if a is None else atto(a) for a in column]
            target = _AUDIT_TO_TABLE.get(name, name)
            out[target].extend(column if rows is None else [column[i] for i in rows])
        out["stored_at"].extend([stored_us] * n)
        out["src_topic"].extend([record["topic_id"]] * n)
        out["src_partition"].extend([record["partition"]] * n)
        out["src_offset"].extend([record["offset"]] * n)
    return [out[name] for name in _EVENT_COLUMNS]


def _window_columns(plan: Plan) -> list[list[Any]]:
    # Built column by column (a comprehension per column is several times cheaper than appending each
    # window's values to 16 lists), windows first, then one offset marker per source partition.
    keys = list(plan.windows)
    totals = list(plan.windows.values())
    n = len(keys)
    # Transposed: one list per count (each window has one of every count).
    counts = [list(c) for c in zip(*(t.counts for t in totals), strict=True)] if n else [[] for _ in WINDOW_COUNTS]
    columns: list[list[Any]] = [
        [k[0] for k in keys],  # subject
        [k[3] for k in keys],  # window_start: DateTime takes epoch seconds as they are (no datetime per window)
        [k[1] for k in keys],  # provider
        [k[2] for k in keys],  # model
        [""] * n,  # src_topic and src_partition: only offset markers have them
        [0] * n,
        *counts,
        [from_atto(t.cost_atto) for t in totals],  # cost_usd
        [-1] * n,  # applied_offset
    ]
    for (topic, partition), offset in plan.offsets.items():
        # The offset marker of one source partition (see sinks.clickhouse.schema).
        values = ("", 0, "", "", topic, partition, 0, 0, 0, 0, 0, 0, 0, 0, Decimal(0), offset)
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns

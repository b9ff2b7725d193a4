"""User meters' 1-minute states in ``meter_windows``, computed by the sink from the deduplicated audit log.

Why from the audit log: the sink finds duplicates there, and while a sum or a count can be taken back out of
a delta, a minimum, a distinct count or a latest value cannot; the audit log holds each event once. Why in
ClickHouse (INSERT ... SELECT): a state is computed by the very expressions a query of the audit log uses
(``event_columns``), so the two answers cannot drift apart.

Exactly once: every state row of a step and its offset markers (one per meter and source partition, the
last audit offset the states cover) go in one INSERT, written as one part: visible together or not at all.
A step's lower bounds are the markers as stored, read inside the INSERT, so a step retried after it was
applied (a lost answer, a crash before the sink learnt of it) adds no row but its markers again; the
deduplication token drops a retried identical INSERT on top.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

from schemas.meters import UserMeter
from sinks.apply import Marker, MeterStep, Source
from sinks.clickhouse.connection import ClickHouse

#: A user meter's values are below this in magnitude: a sum of them cannot overflow Decimal(76, 18)
#: (ClickHouse's decimal sums wrap around without an error) short of 10^18 events; larger ones are left out,
#: as not a number.
VALUE_LIMIT: Final = f"toDecimal256('1{'0' * 40}', 18)"
#: The statuses whose events are in no meter: too late, or from a record that could not be processed.
NOT_METERED: Final = "('late', 'failed')"
ZERO: Final = "toDecimal256(0, 18)"
#: The ``latest`` state of a window without a value: below every event's (ids are never empty).
NO_LATEST: Final = f"(toDateTime64(0, 6, 'UTC'), '', {ZERO})"

#: The state columns of meter_windows (beside meter_id, subject, window_start, groups), and what one
#: audit row (``event_columns``) contributes to each.
STATE_OF_EVENT: Final = (
    ("events", "toUInt64(1)"),
    ("n_values", "toUInt64(has)"),
    ("value_sum", f"ifNull(v, {ZERO})"),
    ("value_min", "v"),
    ("value_max", "v"),
    ("uniques", "if(vs != '', [vs], CAST([], 'Array(String)'))"),
    ("latest", f"if(v IS NULL, {NO_LATEST}, (t, id, assumeNotNull(v)))"),
)
#: How a window's state is aggregated from audit rows, per state column.
_AGGREGATE_EVENTS: Final = (
    "count()",
    "countIf(has = 1)",
    f"sum(ifNull(v, {ZERO}))",
    "min(v)",
    "max(v)",
    "groupUniqArrayIf(vs, vs != '')",
    f"maxIf((t, id, ifNull(v, {ZERO})), v IS NOT NULL)",
)
#: An aggregation's answer from the states (``events`` ... ``latest`` summed up per window and group). A
#: value that is missing or not a number is left out (never taken as 0); a window whose values all are
#: has no row (NULL), except for the counts.
STATE_AGGREGATES: Final = {
    "SUM": "if(sum(n_values) > 0, sum(value_sum), NULL)",
    "COUNT": "toDecimal128(sum(events), 0)",
    # Exact: a decimal sum over the count, truncated at 18 decimal places (avg() would be a float).
    "AVG": "if(sum(n_values) > 0, sum(value_sum) / sum(n_values), NULL)",
    "MIN": "min(value_min)",
    "MAX": "max(value_max)",
    "UNIQUE_COUNT": "toDecimal128(length(groupUniqArrayArray(uniques)), 0)",
    # The value of the latest event; ties in time broken by the event id, so the answer is deterministic.
    "LATEST": "if(sum(n_values) > 0, max(latest).3, NULL)",
}


def event_columns(meter: UserMeter, params: dict[str, Any], prefix: str = "") -> list[str]:
    """The columns ``t, ts, id, source, subject, g0.. (the groupBy values), vs, v, has`` of one of ``meter``'s
    audit rows: ``vs`` the value as text, ``v`` as an exact decimal (NULL when missing or not a number),
    ``has`` 1 if the row has the value its aggregation needs (any text for UNIQUE_COUNT, else a number)."""
    columns = [
        "time AS t",
        "toDateTime(toStartOfMinute(time), 'UTC') AS ts",
        "id",
        "source",
        "subject",
    ]
    for i, path in enumerate(meter.group_by.values()):
        params[f"{prefix}gp{i}"] = path
        columns.append(f"JSON_VALUE(data, {{{prefix}gp{i}:String}}) AS g{i}")
    if meter.value_property is not None:
        params[f"{prefix}vp"] = meter.value_property
        columns.append(f"JSON_VALUE(data, {{{prefix}vp:String}}) AS vs")
        columns.append(f"{value_sql('vs', prefix)} AS v")
        columns.append(
            "toUInt8(vs != '') AS has" if meter.aggregation == "UNIQUE_COUNT" else "toUInt8(v IS NOT NULL) AS has"
        )
    else:
        columns.append("'' AS vs")
        columns.append("CAST(NULL, 'Nullable(Decimal(76, 18))') AS v")
        columns.append("toUInt8(0) AS has")
    return columns


def value_sql(text: str, prefix: str = "") -> str:
    """A value given as text (``text``, an SQL expression) as an exact decimal: NULL when it is missing, not a
    number, or too large (VALUE_LIMIT)."""
    return f"if(abs(toDecimal256OrNull({text}, 18) AS {prefix}p) < {VALUE_LIMIT}, {prefix}p, NULL)"


def missing_sql(meter: UserMeter, params: dict[str, Any], prefix: str) -> str | None:
    """True for an audit row of ``meter``'s that has no value where its aggregation needs one (a number; for
    UNIQUE_COUNT, any text); None for a meter that needs none (COUNT)."""
    if meter.value_property is None:
        return None
    params[f"{prefix}vp"] = meter.value_property
    text = f"JSON_VALUE(data, {{{prefix}vp:String}})"
    lacking = f"{text} = ''" if meter.aggregation == "UNIQUE_COUNT" else f"{value_sql(text, prefix)} IS NULL"
    return f"({' AND '.join(event_where(meter, params, prefix))} AND {lacking})"


def event_where(meter: UserMeter, params: dict[str, Any], prefix: str = "") -> list[str]:
    """The conditions selecting ``meter``'s events in the audit log."""
    params[f"{prefix}etype"] = meter.event_type
    where = [f"type = {{{prefix}etype:String}}", f"status NOT IN {NOT_METERED}"]
    if meter.event_from is not None:
        params[f"{prefix}efrom"] = meter.event_from
        where.append(f"time >= {{{prefix}efrom:DateTime64(6, 'UTC')}}")
    return where


class MeterStates:
    """The sink's side of ``meter_windows``."""

    def __init__(self, ch: ClickHouse) -> None:
        self._ch = ch

    def markers(self) -> dict[str, dict[Source, Marker]]:
        """Every meter's markers, by state id and source partition."""
        rows = (
            self._ch.client()
            .query(
                "SELECT meter_id, src_topic, src_partition, max(applied_offset), max(caught_up) FROM meter_windows "
                "WHERE subject = '' GROUP BY meter_id, src_topic, src_partition"
            )
            .result_rows
        )
        found: dict[str, dict[Source, Marker]] = {}
        for meter_id, topic, partition, offset, caught in rows:
            found.setdefault(str(meter_id), {})[(str(topic), int(partition))] = Marker(int(offset), bool(caught))
        return found

    def chunk_end(self, meter: UserMeter, source: Source, after: int, upto: int, max_rows: int) -> int:
        """The last offset of a backfill chunk after ``after``: ``upto``, or sooner so that the chunk holds
        about ``max_rows`` audit rows (a single record with more is a chunk of its own)."""
        params: dict[str, Any] = {
            "etype": meter.event_type,
            "topic": source[0],
            "partition": source[1],
            "after": after,
            "upto": upto,
            "skip": max_rows,
        }
        rows = (
            self._ch.client()
            .query(
                "SELECT src_offset FROM usage_events WHERE type = {etype:String} AND src_topic = {topic:String} "
                "AND src_partition = {partition:Int32} AND src_offset > {after:Int64} AND src_offset <= {upto:Int64} "
                "ORDER BY src_offset LIMIT 1 OFFSET {skip:UInt64}",
                parameters=params,
            )
            .result_rows
        )
        if not rows:
            return upto
        first_left_out = int(rows[0][0])
        return first_left_out - 1 if first_left_out - 1 > after else first_left_out

    def apply(self, steps: Sequence[MeterStep]) -> None:
        """Apply ``steps`` in one INSERT (see the module's docstring)."""
        sql, params = step_sql(steps)
        self._ch.client().command(
            f"INSERT INTO meter_windows {sql}",
            parameters=params,
            settings={"max_insert_threads": 1, "insert_deduplication_token": _token(steps)},
        )


def step_sql(steps: Sequence[MeterStep]) -> tuple[str, dict[str, Any]]:
    """The SELECT of ``MeterStates.apply``: each meter's states of its events past its markers, and the new
    markers, in meter_windows' column order."""
    params: dict[str, Any] = {}
    parts: list[str] = []
    for i, step in enumerate(steps):
        meter, p = step.meter, f"m{i}_"
        params[f"{p}id"] = meter.state_id
        ranges: list[str] = []
        for j, ((topic, partition), upto, caught) in enumerate(step.ranges):
            q = f"{p}r{j}_"
            params |= {f"{q}topic": topic, f"{q}partition": partition, f"{q}upto": upto, f"{q}caught": int(caught)}
            marker = (
                f"ifNull((SELECT maxOrNull(applied_offset) FROM meter_windows WHERE meter_id = {{{p}id:String}} "
                f"AND subject = '' AND src_topic = {{{q}topic:String}} AND src_partition = {{{q}partition:Int32}}), -1)"
            )
            ranges.append(
                f"(src_topic = {{{q}topic:String}} AND src_partition = {{{q}partition:Int32}} "
                f"AND src_offset > {marker} AND src_offset <= {{{q}upto:Int64}})"
            )
            parts.append(
                f"SELECT {{{p}id:String}}, '', toDateTime(0, 'UTC'), CAST([], 'Array(String)'), {{{q}topic:String}}, "
                f"{{{q}partition:Int32}}, toUInt64(0), toUInt64(0), {ZERO}, CAST(NULL, 'Nullable(Decimal(76, 18))'), "
                f"CAST(NULL, 'Nullable(Decimal(76, 18))'), CAST([], 'Array(String)'), {NO_LATEST}, "
                f"{{{q}upto:Int64}}, toUInt8({{{q}caught:UInt8}})"
            )
        if not step.events:
            continue
        where = [*event_where(meter, params, p), f"({' OR '.join(ranges)})"]
        # A replayed record rewrote its audit rows as they were (same offsets): one of each counts.
        events = (
            f"SELECT {', '.join(event_columns(meter, params, p))} FROM usage_events "
            f"WHERE {' AND '.join(where)} LIMIT 1 BY source, id"
        )
        groups = ", ".join(f"g{k}" for k in range(len(meter.group_by)))
        group_array = f"[{groups}]" if groups else "CAST([], 'Array(String)')"
        parts.append(
            f"SELECT {{{p}id:String}}, subject, ts, {group_array} AS grp, '', toInt32(0), "
            f"{', '.join(_AGGREGATE_EVENTS)}, toInt64(-1), toUInt8(0) FROM ({events}) GROUP BY subject, ts, grp"
        )
    return " UNION ALL ".join(parts), params


def _token(steps: Sequence[MeterStep]) -> str:
    text = ";".join(
        f"{s.meter.state_id}:{topic}:{partition}:{upto}" for s in steps for (topic, partition), upto, _ in s.ranges
    )
    return "mw-" + hashlib.sha256(text.encode()).hexdigest()[:32]

"""Reads for the query API: meter queries, the event list, reconciliation. All values are bound
parameters; the SQL text is built only from fixed fragments and validated names.

Window totals are stored per UTC minute, yet answers are exact for any ``from``/``to`` (to the
microsecond): the whole minutes inside the range come from ``usage_windows``, the partial minutes at its
edges from the audit log, and both are bucketed and summed together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, NamedTuple

from schemas.meters import GROUP_BY_KEYS, WINDOW_COUNTS, Meter, UserMeter
from schemas.query import AcceptedGap, Difference, EventFilter, MeterQuery, QueryRow, WindowSize
from sinks.clickhouse.connection import ClickHouse, is_embedded
from sinks.clickhouse.meter_states import (
    NOT_METERED,
    STATE_AGGREGATES,
    STATE_OF_EVENT,
    event_columns,
    event_where,
    missing_sql,
)

Sql = tuple[str, dict[str, Any]]

MINUTE: Final = timedelta(minutes=1)
#: The range every stored time lies in (events before 1970 are refused; DateTime ends in 2106). Query
#: bounds outside it select the same rows as bounds at its ends, and the engine cannot parse them all.
EARLIEST: Final = datetime(1970, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(2106, 1, 1, tzinfo=UTC)


def _bounded(t: datetime | None) -> datetime | None:
    return None if t is None else min(max(t, EARLIEST), LATEST)


#: What one audit-log row contributes to each meter's column.
_EVENT_VALUE: Final[Mapping[str, str]] = {
    "requests": "toUInt64(1)",
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cache_read_tokens": "cache_read_tokens",
    "cache_write_tokens": "cache_write_tokens",
    "reasoning_tokens": "reasoning_tokens",
    "total_tokens": "input_tokens + output_tokens",
    "cost_usd": "ifNull(cost_usd, toDecimal128(0, 18))",
    "unpriced_requests": "toUInt64(cost_usd IS NULL)",
}

#: Window start and end per window size: ``{ts}`` is a minute start (DateTime('UTC')), ``{start}`` the window's
#: start, {tz} the zone. DAY and MONTH ends are computed from the local calendar date, which stays right across
#: DST and in zones where a day starts at 01:00 (a fixed +1 day interval would not).
_BUCKETS: Final[Mapping[WindowSize, tuple[str, str]]] = {
    WindowSize.MINUTE: ("{ts}", "{start} + 60"),
    # The minute's local hour start, by its local minute (the minute is whole): toStartOfHour puts a zone's
    # hours half an hour off for the rest of a day whose DST change is 30 minutes (Australia/Lord_Howe).
    WindowSize.HOUR: ("{ts} - toMinute({ts}, {{tz:String}}) * 60", "{start} + 3600"),
    WindowSize.DAY: (
        "toStartOfDay({ts}, {{tz:String}})",
        "toDateTime(toDate({start}, {{tz:String}}) + 1, {{tz:String}})",
    ),
    WindowSize.MONTH: (
        "toDateTime(toStartOfMonth({ts}, {{tz:String}}), {{tz:String}})",
        "toDateTime(addMonths(toStartOfMonth({start}, {{tz:String}}), 1), {{tz:String}})",
    ),
}


def _floor_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def _ceil_minute(t: datetime) -> datetime:
    floor = _floor_minute(t)
    return floor if floor == t else floor + MINUTE


#: The built-in meters' dimensions are columns of their own names.
_BUILTIN_COLUMNS: Final = {d: d for d in GROUP_BY_KEYS}


def _filters(query: MeterQuery, params: dict[str, Any], column_of: Mapping[str, str] = _BUILTIN_COLUMNS) -> list[str]:
    """The clauses of a query's include and exclude filters; ``column_of`` names each dimension's column."""
    clauses = []
    for dimension, values in query.include.items():
        if dimension not in column_of:
            raise ValueError(f"unknown dimension {dimension}")
        column = column_of[dimension]
        if len(values) == 1:  # the common case (one subject), and a cheaper plan than IN
            params[f"in_{dimension}"] = values[0]
            clauses.append(f"{column} = {{in_{dimension}:String}}")
        else:
            params[f"in_{dimension}"] = list(values)
            clauses.append(f"{column} IN {{in_{dimension}:Array(String)}}")
    for dimension, values in query.exclude.items():
        if dimension not in column_of:
            raise ValueError(f"unknown dimension {dimension}")
        params[f"out_{dimension}"] = list(values)
        clauses.append(f"{column_of[dimension]} NOT IN {{out_{dimension}:Array(String)}}")
    return clauses


class _Rows(NamedTuple):
    """Where a query's minute rows come from: a FROM clause, its minute-start column, and the column holding
    each meter's value (with ``subject, provider, model`` beside them)."""

    source: str
    ts: str
    values: list[str]


#: Joined to the audit log where it stands in for the windows (partial minutes): an event counts there only
#: once its windows are stored. The audit rows are written a moment before the windows and their offset
#: markers; counting them earlier would make a query's usage run ahead of the applied offsets, and a
#: reader pairing the two (a reservation's commit counts as pending until its offset is applied) would
#: count that event twice.
_APPLIED_JOIN: Final = (
    "INNER JOIN (SELECT src_topic, src_partition, max(applied_offset) AS offset FROM usage_windows "
    "WHERE subject = '' GROUP BY src_topic, src_partition) AS applied "
    "ON e.src_topic = applied.src_topic AND e.src_partition = applied.src_partition"
)


Bounds = tuple[datetime | None, datetime | None]


def _split(query: MeterQuery) -> tuple[Bounds | None, list[Bounds]]:
    """A query's range as the whole UTC minutes inside it (None: there are none) and the partial minutes
    at its edges (open ends are None)."""
    start, end = _bounded(query.start), _bounded(query.end)
    whole_from = _ceil_minute(start) if start else None
    whole_to = _floor_minute(end) if end else None
    if whole_from is not None and whole_to is not None and whole_from >= whole_to:
        return None, [(start, end)]  # inside a minute or two partial ones: all from the audit log
    edges: list[Bounds] = []
    if start is not None and whole_from is not None and start < whole_from:
        edges.append((start, whole_from))
    if end is not None and whole_to is not None and whole_to < end:
        edges.append((whole_to, end))
    return (whole_from, whole_to), edges


def _usage_union(query: MeterQuery, params: dict[str, Any], meters: Sequence[Meter]) -> _Rows:
    """The minute rows of a query's range, one value per meter of ``meters``. Whole minutes are read from the
    windows; partial minutes at the range's edges from the audit log, in a UNION (values ``v0, v1...``). A
    range of whole minutes (the common case) reads the windows table itself, without a subquery (its own
    columns): a third of a one-subject query's time here."""
    filters = _filters(query, params)
    whole, edges = _split(query)
    parts: list[str] = []
    windows_where = ""
    if whole is not None:
        whole_from, whole_to = whole
        where = ["subject != ''", *filters]
        if whole_from is not None:
            params["whole_from"] = whole_from
            where.append("window_start >= {whole_from:DateTime('UTC')}")
        if whole_to is not None:
            params["whole_to"] = whole_to
            where.append("window_start < {whole_to:DateTime('UTC')}")
        windows_where = " AND ".join(where)
    if windows_where and not edges:
        return _Rows(f"usage_windows WHERE {windows_where}", "window_start", [m.column for m in meters])
    if windows_where:
        values = ", ".join(f"{m.column} AS v{i}" for i, m in enumerate(meters))
        parts.append(
            f"SELECT window_start AS ts, subject, provider, model, {values} FROM usage_windows WHERE {windows_where}"
        )
    event_values = ", ".join(f"{_EVENT_VALUE[m.column]} AS v{i}" for i, m in enumerate(meters))
    for i, (edge_from, edge_to) in enumerate(edges):
        where = ["status = 'counted'", "e.src_offset <= applied.offset", *filters]
        if edge_from is not None:
            params[f"edge{i}_from"] = edge_from
            where.append(f"time >= {{edge{i}_from:DateTime64(6, 'UTC')}}")
        if edge_to is not None:
            params[f"edge{i}_to"] = edge_to
            where.append(f"time < {{edge{i}_to:DateTime64(6, 'UTC')}}")
        parts.append(
            "SELECT toDateTime(toStartOfMinute(time), 'UTC') AS ts, subject, provider, model, "
            f"{event_values} FROM usage_events AS e FINAL {_APPLIED_JOIN} WHERE {' AND '.join(where)}"
        )
    return _Rows(f"({' UNION ALL '.join(parts)})", "ts", [f"v{i}" for i in range(len(meters))])


def meter_query_sql(query: MeterQuery, meters: Sequence[Meter] = ()) -> Sql:
    """SQL and parameters answering a query of a built-in meter; with ``meters``, of each of them at once
    (one scan; column *i* after the groups is meter *i*'s value, the same as its own query's)."""
    if not meters:
        assert isinstance(query.meter, Meter), "user meters are read from the audit log (user_meter_sql)"
        meters = (query.meter,)
    params: dict[str, Any] = {"tz": query.time_zone}
    rows = _usage_union(query, params, meters)
    dims = [d for d in GROUP_BY_KEYS if d in query.group_by]
    return _aggregated(query, rows.source, dims, [f"sum({v})" for v in rows.values], ts=rows.ts), params


def _aggregated(
    query: MeterQuery, source: str, dims: Sequence[str], aggregates: Sequence[str], *, having: str = "", ts: str = "ts"
) -> str:
    """The answer's SQL: each of ``aggregates`` (``value0``, ``value1``...) over the rows of ``source`` (a
    FROM clause: a table with its WHERE, or a parenthesised subquery; ``ts`` its minute-start column, the
    ``dims`` columns, the values) per window of the query and group; ``having`` drops groups (`` HAVING ...``).
    The window's columns are ``_ws`` and ``_we``: never a source column's name, which a WHERE would then read
    as the alias."""
    dim_list = "".join(f", {d}" for d in dims)
    values = ", ".join(f"{a} AS value{i}" for i, a in enumerate(aggregates))
    if query.window_size is None:
        # The window is the query's range; only an open end needs the first or last minute with usage
        # (finding them costs a third of a large grouped query). The reader puts the range back in.
        span = (
            f"min({ts}) AS _ws, max({ts}) + 60 AS _we"
            if query.start is None or query.end is None
            else "toDateTime(0, 'UTC') AS _ws, toDateTime(0, 'UTC') AS _we"
        )
        # GROUP BY tuple(): no matching events gives no row (not one row of zero).
        return (
            f"SELECT {span}{dim_list}, {values} FROM {source} "
            f"GROUP BY {', '.join(dims) or 'tuple()'}{having} ORDER BY {', '.join(dims) or '_ws'}"
        )
    bucket, bucket_end = _BUCKETS[query.window_size]
    return (
        f"SELECT {bucket.format(ts=ts)} AS _ws, {bucket_end.format(start='_ws')} AS _we{dim_list}, {values} "
        f"FROM {source} GROUP BY _ws{dim_list}{having} ORDER BY _ws{dim_list}"
    )


#: What each aggregation of a user meter computes from its audit rows (``event_columns``: ``v`` the value as an
#: exact decimal, NULL when missing or not a number; ``vs`` the value as text; ``t`` the event time): the same
#: answers as ``STATE_AGGREGATES`` from the states. A value that is missing or not a number is left out (never
#: taken as 0); a window whose values all are has no row.
_USER_AGGREGATES: Final[Mapping[str, str]] = {
    "SUM": "sum(v)",
    "COUNT": "toDecimal128(count(), 0)",
    "AVG": "sum(v) / nullIf(count(v), 0)",
    "MIN": "min(v)",
    "MAX": "max(v)",
    "UNIQUE_COUNT": "toDecimal128(uniqExactIf(vs, vs != ''), 0)",
    "LATEST": "if(count(v) > 0, maxIf((t, id, assumeNotNull(v)), v IS NOT NULL).3, NULL)",
}


def _user_rows(query: MeterQuery, meter: UserMeter, params: dict[str, Any]) -> tuple[str, list[str]]:
    """The rows (``t, ts, id, source, subject, <group keys>, v, vs``) of a user meter's events in a query's
    range, filtered; and the group-by columns in order. From the deduplicated audit log (FINAL: one row per
    event), exact to the microsecond at the range's ends."""
    where = event_where(meter, params)
    for name, bound, op in (("start", query.start, ">="), ("end", query.end, "<")):
        if bound is not None:
            params[f"u_{name}"] = _bounded(bound)
            where.append(f"time {op} {{u_{name}:DateTime64(6, 'UTC')}}")
    column_of = _user_columns(meter)
    filters = _filters(query, params, column_of)
    rows = f"SELECT {', '.join(event_columns(meter, params))} FROM usage_events FINAL WHERE {' AND '.join(where)}"
    if filters:
        rows = f"SELECT * FROM ({rows}) WHERE {' AND '.join(filters)}"
    return rows, [column_of[d] for d in meter.group_keys if d in query.group_by]


def _user_columns(meter: UserMeter) -> dict[str, str]:
    return {"subject": "subject"} | {key: f"g{i}" for i, key in enumerate(meter.group_by)}


_STATES: Final = ", ".join(name for name, _ in STATE_OF_EVENT)


def _state_rows(query: MeterQuery, meter: UserMeter, params: dict[str, Any]) -> tuple[str, list[str]]:
    """The minute rows (``ts, subject, g0.., <states>``) of a user meter in a query's range, filtered: whole
    minutes from its states, partial minutes at the range's edges from the audit log, counting an event there
    only once its offset is in the states (as the windows' edges do: ``_APPLIED_JOIN``)."""
    params["state_id"] = meter.state_id
    whole, edges = _split(query)
    groups = "".join(f", groups[{i + 1}] AS g{i}" for i in range(len(meter.group_by)))
    parts = []
    if whole is not None:
        where = ["meter_id = {state_id:String}", "subject != ''"]
        for name, bound, op in (("whole_from", whole[0], ">="), ("whole_to", whole[1], "<")):
            if bound is not None:
                params[name] = bound
                where.append(f"window_start {op} {{{name}:DateTime('UTC')}}")
        parts.append(
            f"SELECT window_start AS ts, subject{groups}, {_STATES} FROM meter_windows WHERE {' AND '.join(where)}"
        )
    if edges:
        event_groups = "".join(f", g{i}" for i in range(len(meter.group_by)))
        states = ", ".join(f"{expression} AS {name}" for name, expression in STATE_OF_EVENT)
        columns = ", ".join([*event_columns(meter, params), "src_topic", "src_partition", "src_offset"])
        marks = (
            "SELECT src_topic, src_partition, max(applied_offset) AS offset FROM meter_windows "
            "WHERE meter_id = {state_id:String} AND subject = '' GROUP BY src_topic, src_partition"
        )
        for i, (edge_from, edge_to) in enumerate(edges):
            where = event_where(meter, params)
            for name, bound, op in ((f"edge{i}_from", edge_from, ">="), (f"edge{i}_to", edge_to, "<")):
                if bound is not None:
                    params[name] = bound
                    where.append(f"time {op} {{{name}:DateTime64(6, 'UTC')}}")
            parts.append(
                f"SELECT ts, subject{event_groups}, {states} FROM (SELECT {columns} FROM usage_events FINAL "
                f"WHERE {' AND '.join(where)}) AS e INNER JOIN ({marks}) AS mk "
                "ON e.src_topic = mk.src_topic AND e.src_partition = mk.src_partition WHERE e.src_offset <= mk.offset"
            )
    column_of = _user_columns(meter)
    filters = _filters(query, params, column_of)
    rows = " UNION ALL ".join(parts)
    rows = f"SELECT * FROM ({rows})" + (f" WHERE {' AND '.join(filters)}" if filters else "")
    return rows, [column_of[d] for d in meter.group_keys if d in query.group_by]


def user_meter_sql(query: MeterQuery, from_states: bool = False) -> Sql:
    """SQL and parameters answering a query of a user meter: from its states (``from_states``: they are
    caught up with every source partition) or from the audit log."""
    meter = query.meter
    assert isinstance(meter, UserMeter)
    params: dict[str, Any] = {"tz": query.time_zone}
    having = " HAVING value0 IS NOT NULL"
    if from_states:
        rows, dims = _state_rows(query, meter, params)
        aggregate = STATE_AGGREGATES[meter.aggregation]
    else:
        rows, dims = _user_rows(query, meter, params)
        aggregate = _USER_AGGREGATES[meter.aggregation]
    return _aggregated(query, f"({rows})", dims, [aggregate], having=having), params


def segment_totals_sql(query: MeterQuery, boundaries: Sequence[datetime]) -> Sql:
    """Totals of a meter query's range cut at ``boundaries`` (whole UTC minutes strictly inside it): row
    *i* is segment *i* (``[boundaries[i-1], boundaries[i])``, the range's own ends outside), and segments
    without usage have no row. The rows are the query API's own, so the totals add up to its answer."""
    if any(b.second or b.microsecond for b in boundaries):
        raise ValueError("segment boundaries must be whole minutes")
    assert isinstance(query.meter, Meter)
    params: dict[str, Any] = {"tz": query.time_zone, "bounds": list(boundaries)}
    rows = _usage_union(query, params, (query.meter,))
    sql = (
        f"SELECT arrayCount(b -> b <= {rows.ts}, {{bounds:Array(DateTime('UTC'))}}) AS segment, "
        f"sum({rows.values[0]}) AS value FROM {rows.source} GROUP BY segment ORDER BY segment"
    )
    return sql, params


def list_events_sql(f: EventFilter, meters: Sequence[UserMeter] = ()) -> Sql:
    """The events of ``f``, newest first; ``values_missing`` lists the slugs of the user meters of ``meters``
    that leave an event out for want of a value (missing, or not a number where one is needed)."""
    params: dict[str, Any] = {"start": _bounded(f.start), "limit": f.limit}
    where = ["time >= {start:DateTime64(6, 'UTC')}"]
    if f.end is not None:
        params["end"] = _bounded(f.end)
        where.append("time < {end:DateTime64(6, 'UTC')}")
    if f.subject is not None:
        params["subject"] = f.subject
        where.append("subject = {subject:String}")
    if f.id_contains:
        params["id"] = f.id_contains
        where.append("position(id, {id:String}) > 0")
    checks = []
    for i, meter in enumerate(meters):
        missing = missing_sql(meter, params, f"lm{i}_")
        if missing is not None:
            params[f"lm{i}_slug"] = meter.slug
            checks.append(f"if({missing}, {{lm{i}_slug:String}}, '')")
    values_missing = f"arrayFilter(x -> x != '', [{', '.join(checks)}])" if checks else "CAST([], 'Array(String)')"
    sql = (
        "SELECT id, source, subject, type, time, data, received_at, stored_at, status, provider, model, "
        f"cost_usd, price_source, usage, {values_missing} AS values_missing FROM usage_events FINAL "
        f"WHERE {' AND '.join(where)} ORDER BY time DESC, source, id LIMIT {{limit:UInt32}}"
    )
    return sql, params


_RECONCILE_COUNTS: Final = (*WINDOW_COUNTS, "cost_usd")


def reconcile_sql(start: datetime, end: datetime) -> Sql:
    """Window totals recomputed from the audit log, full-outer-joined to the stored ones; rows that differ.
    (Aliases are prefixed: ClickHouse would otherwise resolve ``input_tokens`` inside a later sum to the
    alias of an earlier one.)"""
    recomputed = ", ".join(f"sum({_EVENT_VALUE[c]}) AS r_{c}" for c in _RECONCILE_COUNTS)
    stored = ", ".join(f"sum({c}) AS s_{c}" for c in _RECONCILE_COUNTS)
    differs = " OR ".join(f"r_{c} != s_{c}" for c in _RECONCILE_COUNTS)
    pairs = ", ".join(f"r_{c}, s_{c}" for c in _RECONCILE_COUNTS)
    sql = (
        f"SELECT subject, provider, model, window_start, {pairs} FROM ("
        f"SELECT subject, provider, model, toDateTime(toStartOfMinute(time), 'UTC') AS window_start, {recomputed} "
        "FROM usage_events FINAL WHERE status = 'counted' AND time >= {start:DateTime64(6, 'UTC')} "
        "AND time < {end:DateTime64(6, 'UTC')} GROUP BY subject, provider, model, window_start) AS a "
        f"FULL OUTER JOIN (SELECT subject, provider, model, window_start, {stored} FROM usage_windows "
        "WHERE subject != '' AND window_start >= {start_s:DateTime('UTC')} AND window_start < {end_s:DateTime('UTC')} "
        "GROUP BY subject, provider, model, window_start) AS b USING (subject, provider, model, window_start) "
        f"WHERE {differs} ORDER BY window_start, subject, provider, model"
    )
    start, end = _bounded(start) or EARLIEST, _bounded(end) or LATEST
    return sql, {"start": start, "end": end, "start_s": start, "end_s": end}


_SOURCES_APPLIED: Final = (
    "SELECT src_topic, src_partition, max(applied_offset) AS offset FROM usage_windows "
    "WHERE subject = '' GROUP BY src_topic, src_partition"
)
_SOURCES: Final = (
    "SELECT src_topic, src_partition FROM usage_windows WHERE subject = '' GROUP BY src_topic, src_partition"
)
#: A user meter's markers (``present`` and ``caught`` are 0 for a partition without one: a LEFT JOIN fills in
#: defaults).
_CAUGHT_UP: Final = (
    "SELECT src_topic, src_partition, max(applied_offset) AS offset, max(caught_up) AS caught, "
    "toUInt8(1) AS present FROM meter_windows "
    "WHERE meter_id = {state_id:String} AND subject = '' GROUP BY src_topic, src_partition"
)


class MeterReader:
    """Answers the query API from ClickHouse."""

    def __init__(self, ch: ClickHouse) -> None:
        self._ch = ch
        #: User meters (state ids) whose states answer their queries (see states_ready).
        self._ready: set[str] = set()
        s = ch.settings
        # On a server every read runs read-only and bounded (per-query settings of the HTTP request), so no
        # query parameters can make it write, run away or exhaust it. Not on the embedded engine: there the
        # settings would stick to the one session the sink writes through too.
        self._limits: dict[str, Any] | None = None
        if not is_embedded(s.dsn):
            self._limits = {
                "readonly": 2,
                "max_execution_time": s.read_max_execution_s,
                "max_memory_usage": s.read_max_memory_bytes,
                "max_result_rows": s.read_max_result_rows,
                "result_overflow_mode": "throw",
            }

    def _query(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        return self._ch.client().query(sql, parameters=params, settings=self._limits)

    def query_meter(self, query: MeterQuery) -> list[QueryRow]:
        if isinstance(query.meter, UserMeter):
            sql, params = user_meter_sql(query, from_states=self.states_ready(query.meter))
        else:
            sql, params = meter_query_sql(query)
        return self._rows(query, self._query(sql, params).result_rows, 1)[0]

    def states_ready(self, meter: UserMeter) -> bool:
        """Whether a user meter's states were caught up with every source partition once (its backfill is
        done): from then on the sink brings them forward with every batch, and they answer its queries.
        Remembered once true (a partition that appears later is caught up with its first batch)."""
        if meter.state_id in self._ready:
            return True
        result = self._query(
            f"SELECT count() FROM ({_SOURCES}) AS u LEFT JOIN ({_CAUGHT_UP}) AS m "
            "ON u.src_topic = m.src_topic AND u.src_partition = m.src_partition WHERE m.caught = 0",
            {"state_id": meter.state_id},
        )
        ready = int(result.result_rows[0][0]) == 0
        if ready:
            self._ready.add(meter.state_id)
        return ready

    def backfill_progress(self, meter: UserMeter) -> tuple[int, int]:
        """(events in the states, events stored) of a user meter, over the offsets applied so far."""
        params: dict[str, Any] = {"state_id": meter.state_id}
        where = " AND ".join(event_where(meter, params))
        result = self._query(
            "SELECT countIf(m.present = 1 AND e.src_offset <= m.offset), count() FROM "
            f"(SELECT src_topic, src_partition, src_offset FROM usage_events FINAL WHERE {where}) AS e "
            f"INNER JOIN ({_SOURCES_APPLIED}) AS u ON e.src_topic = u.src_topic AND e.src_partition = u.src_partition "
            f"LEFT JOIN ({_CAUGHT_UP}) AS m ON e.src_topic = m.src_topic AND e.src_partition = m.src_partition "
            "WHERE e.src_offset <= u.offset",
            params,
        )
        done, total = result.result_rows[0]
        return int(done), int(total)

    def query_meters(self, query: MeterQuery, meters: Sequence[Meter]) -> list[list[QueryRow]]:
        """``query`` for each built-in meter of ``meters`` in one scan: answer *i* is meter *i*'s, row for
        row what ``query_meter`` answers for it (the same rows grouped the same way, another column summed)."""
        sql, params = meter_query_sql(query, meters)
        return self._rows(query, self._query(sql, params).result_rows, len(meters))

    @staticmethod
    def _rows(query: MeterQuery, result: Sequence[Sequence[Any]], count: int) -> list[list[QueryRow]]:
        dims = [d for d in query.meter.group_keys if d in query.group_by]
        # Unwindowed: the window is the query's range where it has bounds (converted once, not per row).
        range_start = _utc(query.start) if query.window_size is None and query.start else None
        range_end = _utc(query.end) if query.window_size is None and query.end else None
        answers: list[list[QueryRow]] = [[] for _ in range(count)]
        for row in result:
            window_start, window_end, *rest = row
            groups, values = rest[: len(dims)], rest[len(dims) :]
            start, end = range_start or _utc(window_start), range_end or _utc(window_end)
            group = dict(zip(dims, groups, strict=True))
            for answer, value in zip(answers, values, strict=True):
                answer.append(QueryRow(start, end, group, Decimal(value)))
        return answers

    def segment_totals(self, query: MeterQuery, boundaries: Sequence[datetime]) -> list[Decimal]:
        """The query's total in each segment between ``boundaries`` (see :func:`segment_totals_sql`)."""
        sql, params = segment_totals_sql(query, boundaries)
        totals = [Decimal(0)] * (len(boundaries) + 1)
        for segment, value in self._query(sql, params).result_rows:
            totals[segment] = Decimal(value)
        return totals

    def group_values(
        self, meter: Meter | UserMeter, key: str, start: datetime | None = None, end: datetime | None = None
    ) -> list[str]:
        """Every value of one group-by key in this meter's events, in ``[start, end)``
        (``/meters/{meter}/group-by/{key}/values``)."""
        params: dict[str, Any] = {}
        if isinstance(meter, Meter):
            if key not in GROUP_BY_KEYS:
                raise KeyError(key)
            where = ["subject != ''"]
            time_column, table, value = "window_start", "usage_windows", key
            kind = "DateTime('UTC')"
            start = _floor_minute(start) if start is not None else None  # windows are whole minutes
        else:
            params["etype"] = meter.event_type
            where = ["type = {etype:String}", f"status NOT IN {NOT_METERED}"]
            time_column, table, kind = "time", "usage_events", "DateTime64(6, 'UTC')"
            if key == "subject":
                value = "subject"
            else:
                params["path"] = meter.group_by[key]
                value = "JSON_VALUE(data, {path:String})"
            if meter.event_from is not None:
                start = max(start, meter.event_from) if start is not None else meter.event_from
        for name, bound, op in (("start", start, ">="), ("end", end, "<")):
            if bound is not None:
                params[name] = _bounded(bound)
                where.append(f"{time_column} {op} {{{name}:{kind}}}")
        sql = (
            f"SELECT DISTINCT {value} AS value FROM {table} WHERE {' AND '.join(where)} AND value != '' ORDER BY value"
        )
        return [str(row[0]) for row in self._query(sql, params).result_rows]

    def usage_subjects(self) -> list[tuple[str, datetime]]:
        """Every subject with stored usage, and the start of its first window."""
        result = self._query(
            "SELECT subject, min(window_start) FROM usage_windows WHERE subject != '' GROUP BY subject ORDER BY subject"
        )
        return [(subject, _utc(first)) for subject, first in result.result_rows]

    def applied_offsets(self) -> dict[tuple[str, int], int]:
        """The last events-topic offset whose windows are stored, per (topic id, partition): an event at or
        below it is in every query from now on, and one above it in none (the sink writes windows and these markers
        in one insert; partial minutes read from the audit log count only events at or below them)."""
        result = self._query(
            "SELECT src_topic, src_partition, max(applied_offset) FROM usage_windows "
            "WHERE subject = '' GROUP BY src_topic, src_partition"
        )
        return {(topic, int(partition)): int(offset) for topic, partition, offset in result.result_rows}

    def event_positions(self, source: str, ids: Sequence[str]) -> dict[str, tuple[str, int, int]]:
        """Where stored events of ``source`` with these ids came from (topic id, partition, offset). The audit
        row is written before its windows: the event is in them once that offset is applied."""
        result = self._query(
            "SELECT id, src_topic, src_partition, src_offset FROM usage_events FINAL "
            "WHERE source = {source:String} AND id IN {ids:Array(String)}",
            {"source": source, "ids": list(ids)},
        )
        return {i: (t, int(p), int(o)) for i, t, p, o in result.result_rows}

    def list_events(self, f: EventFilter, meters: Sequence[UserMeter] = ()) -> list[dict[str, Any]]:
        sql, params = list_events_sql(f, meters)
        result = self._query(sql, params)
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]

    def reconcile(self, start: datetime, end: datetime) -> list[Difference]:
        """Differences between the stored window totals and totals recomputed from the audit log over
        ``[start, end)``, widened to whole minutes."""
        start = _floor_minute(_bounded(start) or EARLIEST)  # bounded first: near the ends of time a minute
        end = _ceil_minute(_bounded(end) or LATEST)  # more would overflow
        sql, params = reconcile_sql(start, end)
        result = self._query(sql, params)
        differences = []
        for row in result.result_rows:
            subject, provider, model, window_start, *pairs = row
            values = {
                column: (Decimal(pairs[2 * i]), Decimal(pairs[2 * i + 1])) for i, column in enumerate(_RECONCILE_COUNTS)
            }
            differences.append(Difference(subject, provider, model, _utc(window_start), values))
        return differences

    def accepted_gaps(self) -> list[AcceptedGap]:
        """Every hole in the offset chain an operator accepted, oldest first."""
        result = self._query(
            "SELECT src_topic, src_partition, first_offset, last_offset, reason, accepted_at FROM accepted_gaps "
            "ORDER BY accepted_at, src_topic, src_partition, first_offset",
            {},
        )
        return [
            AcceptedGap(str(t), int(p), int(first), int(last), str(reason), _utc(at))
            for t, p, first, last, reason, at in result.result_rows
        ]

    def accept_gap(self, topic_id: str, partition: int, first: int, last: int, reason: str) -> None:
        """Record source offsets ``first``..``last`` of a partition as lost: the sink goes on past them."""
        self._ch.client().insert(
            "accepted_gaps",
            [[topic_id, partition, first, last, reason]],
            column_names=["src_topic", "src_partition", "first_offset", "last_offset", "reason"],
        )

    def check(self) -> None:
        self._ch.client().query("SELECT max(applied_offset), count() FROM usage_windows WHERE subject = ''")


def _utc(value: datetime) -> datetime:
    """clickhouse-connect returns naive UTC datetimes by default."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

"""The storage layer against a real ClickHouse engine (embedded chDB, same client API as a server)."""

from __future__ import annotations

import gc
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from schemas.meters import find_meter
from schemas.query import EventFilter, MeterQuery, WindowSize
from schemas.settings import ClickHouseSettings
from sinks.apply import Kept, Plan, Totals
from sinks.clickhouse.connection import ClickHouse
from sinks.clickhouse.reader import MeterReader
from sinks.clickhouse.schema import MIGRATIONS, migrate
from sinks.clickhouse.store import WindowStore
from tests.helpers.truth import Sent, expected

pytestmark = pytest.mark.integration

REQUESTS = find_meter("requests")
assert REQUESTS is not None


def minutes(start: datetime, end: datetime) -> list[datetime]:
    out = []
    t = start
    while t < end:
        out.append(t)
        t += timedelta(minutes=1)
    return out


def window_plan(times: list[datetime], subject: str = "s", topic: str = "T", offset: int = 0) -> Plan:
    plan = Plan(offsets={(topic, 0): offset})
    for t in times:
        totals = Totals()
        totals.counts[0] = 1
        totals.cost_atto = 10**12
        plan.windows[(subject, "openai", "gpt-4o-mini", int(t.timestamp()))] = totals
    return plan


def test_migrations_are_idempotent(ch: ClickHouse) -> None:
    assert migrate(ch) == []
    versions = sorted(row[0] for row in ch.client().query("SELECT version FROM meterstream_migrations").result_rows)
    assert versions == [m.version for m in MIGRATIONS]


# Every minute of two weeks around DST changes, in zones that are easy to get wrong: New York (DST),
# Kolkata (+05:30), Kathmandu (+05:45), Lord Howe (30-minute DST), Santiago (DST starts at midnight, so a
# day begins at 01:00), London.
SPANS = [
    (datetime(2024, 3, 8, tzinfo=UTC), datetime(2024, 3, 12, tzinfo=UTC)),
    (datetime(2024, 9, 5, tzinfo=UTC), datetime(2024, 9, 10, tzinfo=UTC)),
    (datetime(2024, 10, 30, tzinfo=UTC), datetime(2024, 11, 5, tzinfo=UTC)),
]
ZONES = [
    "UTC",
    "America/New_York",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Europe/London",
]


def assert_windows_match_the_calendar(ch: ClickHouse, zone: str, times: list[datetime]) -> None:
    """One event per minute of ``times``: every HOUR, DAY and MONTH window in ``zone`` as the calendar has it."""
    WindowStore(ch).write(window_plan(times), datetime.now(UTC))
    sent = [Sent(str(i), "x", "s", t, "openai", "gpt-4o-mini", {}, Decimal("0.000001")) for i, t in enumerate(times)]
    reader = MeterReader(ch)
    for window in ("HOUR", "DAY", "MONTH"):
        rows = reader.query_meter(MeterQuery(meter=REQUESTS, window_size=WindowSize(window), time_zone=zone))
        got = {(r.window_start, r.window_end, None, ()): r.value for r in rows}
        assert got == expected(sent, "requests", window=window, zone=zone), (zone, window)
        starts = [r.window_start for r in rows]
        assert starts == sorted(starts)


@pytest.mark.parametrize("zone", ZONES)
def test_time_zone_windows_match_the_calendar(ch: ClickHouse, zone: str) -> None:
    assert_windows_match_the_calendar(ch, zone, [t for start, end in SPANS for t in minutes(start, end)])


# More zones, each over two days from just before each of its 2024 changes: Chatham (+12:45, changes at 02:45
# and 03:45 local), Troll (a two-hour DST), Dublin (tzdata's negative DST: winter is the "saving" time),
# Casablanca (clocks go back for Ramadan, forward after), St John's (-03:30 with DST), Lord Howe (a 30-minute
# DST; the SPANS above miss its changes).
ZONE_CHANGES = {
    "Pacific/Chatham": (datetime(2024, 4, 6, tzinfo=UTC), datetime(2024, 9, 28, tzinfo=UTC)),
    "Antarctica/Troll": (datetime(2024, 3, 30, tzinfo=UTC), datetime(2024, 10, 26, tzinfo=UTC)),
    "Europe/Dublin": (datetime(2024, 3, 30, tzinfo=UTC), datetime(2024, 10, 26, tzinfo=UTC)),
    "Africa/Casablanca": (datetime(2024, 3, 9, tzinfo=UTC), datetime(2024, 4, 13, tzinfo=UTC)),
    "America/St_Johns": (datetime(2024, 3, 9, tzinfo=UTC), datetime(2024, 11, 2, tzinfo=UTC)),
    "Australia/Lord_Howe": (datetime(2024, 4, 6, tzinfo=UTC), datetime(2024, 10, 5, tzinfo=UTC)),
}


@pytest.mark.parametrize("zone", sorted(ZONE_CHANGES))
def test_more_time_zone_changes_match_the_calendar(ch: ClickHouse, zone: str) -> None:
    starts = ZONE_CHANGES[zone]
    times = [t for start in starts for t in minutes(start, start + timedelta(days=2))]
    assert any(ZoneInfo(zone).utcoffset(t) != ZoneInfo(zone).utcoffset(starts[0]) for t in times)  # a change
    assert_windows_match_the_calendar(ch, zone, times)


def test_a_retried_insert_is_not_applied_twice(ch: ClickHouse) -> None:
    store, reader = WindowStore(ch), MeterReader(ch)
    t = datetime(2025, 1, 1, tzinfo=UTC)
    plan = window_plan([t], offset=7)
    store.write(plan, datetime.now(UTC))
    store.write(plan, datetime.now(UTC))  # e.g. after a timeout whose insert had in fact landed
    (row,) = reader.query_meter(MeterQuery(meter=REQUESTS))
    assert row.value == 1
    assert store.applied_offsets() == {("T", 0): 7}
    store.write(window_plan([t], offset=8), datetime.now(UTC))
    assert reader.query_meter(MeterQuery(meter=REQUESTS))[0].value == 2
    assert store.applied_offsets() == {("T", 0): 8}


def test_cost_sums_are_exact(ch: ClickHouse) -> None:
    plan = Plan(offsets={("T", 0): 0})
    amounts = ["0.000000000000000001", "12345678.123456789012345678", "0.00045", "7.5E-8"]
    for i, amount in enumerate(amounts):
        totals = Totals()
        totals.counts[0] = 1
        totals.cost_atto = int(Decimal(amount).scaleb(18))
        plan.windows[("s", "p", "m", 60 * i)] = totals
    WindowStore(ch).write(plan, datetime.now(UTC))
    (row,) = MeterReader(ch).query_meter(MeterQuery(meter=find_meter("cost_usd")))  # type: ignore[arg-type]
    assert row.value == sum(Decimal(a) for a in amounts)


def test_stored_coordinates_and_event_list(ch: ClickHouse) -> None:
    from tests.unit.test_apply import record, row

    plan = Plan(events=[Kept(record(5, row("a", 0), row("b'); --", 1), partition=1), None)], offsets={})
    store = WindowStore(ch)
    store.write(plan, datetime(2025, 1, 1, tzinfo=UTC))
    store.write(plan, datetime(2025, 1, 1, tzinfo=UTC))  # a replay rewrites identical rows
    assert store.stored_coords([("app", "a"), ("app", "b'); --"), ("app", "zzz")]) == {
        ("app", "a"): ("T", 1, 5, 0),
        ("app", "b'); --"): ("T", 1, 5, 1),
    }
    events = MeterReader(ch).list_events(EventFilter(start=datetime(2023, 1, 1, tzinfo=UTC), limit=10))
    assert sorted(e["id"] for e in events) == ["a", "b'); --"]
    only = MeterReader(ch).list_events(EventFilter(start=datetime(2023, 1, 1, tzinfo=UTC), id_contains="b'", limit=10))
    assert [e["id"] for e in only] == ["b'); --"]


def test_reconcile_sees_a_missing_window(ch: ClickHouse) -> None:
    from tests.unit.test_apply import MINUTE, record, row

    store, reader = WindowStore(ch), MeterReader(ch)
    plan = Plan(events=[Kept(record(0, row("a", 0)), None)], offsets={("T", 0): 0})
    totals = Totals()
    totals.counts[:7] = [1, 10, 2, 0, 0, 0, 12]
    totals.cost_atto = 10**15
    plan.windows[("alice", "openai", "gpt-4o-mini", MINUTE)] = totals
    store.write(plan, datetime.now(UTC))
    start = datetime.fromtimestamp(MINUTE, UTC)
    assert reader.reconcile(start, start + timedelta(minutes=1)) == []
    store.write(Plan(events=[Kept(record(1, row("b", 0)), None)], offsets={}), datetime.now(UTC))
    (difference,) = reader.reconcile(start - timedelta(seconds=1), start + timedelta(seconds=1))
    assert difference.values["requests"] == (Decimal(2), Decimal(1))


def test_the_audit_log_counts_an_event_once_its_windows_are_stored(ch: ClickHouse) -> None:
    """Partial minutes are read from the audit log, which is written a moment before the windows and their
    offset markers. An event counts there only once its offset is applied: the usage a query reports never
    runs ahead of the applied offsets (a commit pending until its offset is applied counts once)."""
    from tests.unit.test_apply import MINUTE, record, row

    store, reader = WindowStore(ch), MeterReader(ch)
    start = datetime.fromtimestamp(MINUTE, UTC)
    inside = MeterQuery(meter=REQUESTS, start=start, end=start + timedelta(seconds=30), include={"subject": ("alice",)})
    across = MeterQuery(
        meter=REQUESTS, start=start, end=start + timedelta(minutes=1, seconds=30), include={"subject": ("alice",)}
    )

    def total(q: MeterQuery) -> Decimal:
        return sum((r.value for r in reader.query_meter(q)), Decimal(0))

    first = record(3, row("a", 0), row("b", 1))
    store.write(Plan(events=[Kept(first, None)], offsets={}), datetime.now(UTC))  # the audit rows alone
    assert (total(inside), total(across)) == (0, 0)
    assert reader.applied_offsets() == {}
    plan = Plan(events=[Kept(first, None)], offsets={("T", 0): 3})
    totals = Totals()
    totals.counts[0] = 2
    plan.windows[("alice", "openai", "gpt-4o-mini", MINUTE)] = totals
    store.write(plan, datetime.now(UTC))
    assert (total(inside), total(across)) == (2, 2)
    # A later event's audit row: not counted while the marker of its partition is behind it.
    store.write(Plan(events=[Kept(record(4, row("c", 0)), None)], offsets={}), datetime.now(UTC))
    assert (total(inside), total(across)) == (2, 2)
    store.write(
        Plan(events=[Kept(record(9, row("d", 0), partition=1), None)], offsets={("T", 1): 9}), datetime.now(UTC)
    )
    assert total(inside) == 3  # its own partition's marker covers it; the other's still does not cover "c"
    store.write(Plan(offsets={("T", 0): 4}), datetime.now(UTC))
    assert total(inside) == 4


def test_a_written_batch_is_released_at_once(ch: ClickHouse) -> None:
    """Once a batch is written nothing holds its values, with no wait for a full garbage collection
    (clickhouse-connect's insert context lingers in a reference cycle; keeping each batch alive until a
    collection grew the sink by ~1 GB in a 10-minute soak)."""
    from tests.unit.test_apply import record, row

    written = record(7, row("released-at-once", 0))
    value = written["events"]["id"][0]  # one of the batch's values, as the audit-log insert takes it
    plan = Plan(events=[Kept(written, None)], offsets={("T", 0): 7})
    plan.windows[("s", "openai", "gpt-4o-mini", 1_700_000_040)] = Totals()
    store = WindowStore(ch)
    gc.collect()
    gc.disable()
    try:
        before = sys.getrefcount(value)
        store.write(plan, datetime.now(UTC))
        after = sys.getrefcount(value)
    finally:
        gc.enable()
    assert after == before


def test_read_limits_apply_on_a_server_only(clickhouse_settings: ClickHouseSettings) -> None:
    """Per-query settings stick to the embedded engine's one session (which the sink writes through), so
    the read-only, time, memory and row limits are sent to a server only."""
    embedded = MeterReader(ClickHouse(clickhouse_settings))
    assert embedded._limits is None
    server = MeterReader(ClickHouse(ClickHouseSettings(dsn="http://clickhouse:8123", read_max_result_rows=7)))
    assert server._limits == {
        "readonly": 2,
        "max_execution_time": 30,
        "max_memory_usage": 4 * 1024**3,
        "max_result_rows": 7,
        "result_overflow_mode": "throw",
    }

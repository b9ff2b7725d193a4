"""User meters' states (meter_windows) against a real ClickHouse engine: the states answer every query as the
audit log does, a step is applied exactly once and written as one part, and backfill chunks are bounded."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from schemas.meters import UserMeter
from schemas.query import MeterQuery, QueryRow, WindowSize
from sinks.apply import Kept, MeterStep, Plan, Source
from sinks.clickhouse.connection import ClickHouse
from sinks.clickhouse.reader import MeterReader, user_meter_sql
from sinks.clickhouse.store import WindowStore
from tests.unit.test_apply import AuditRow, record, row

pytestmark = pytest.mark.integration

T0 = datetime(2024, 11, 3, 4, 0, tzinfo=UTC)  # two hours before New York leaves DST
CREATED = datetime(2024, 1, 1, tzinfo=UTC)


def meter(aggregation: str, value: str | None = "$.v", event_from: datetime | None = None) -> UserMeter:
    return UserMeter(
        id=f"01JMETER{aggregation}",
        slug=aggregation.lower(),
        name=aggregation,
        event_type="tokens",
        aggregation=aggregation,
        value_property=None if aggregation == "COUNT" else value,
        group_by={"model": "$.model", "tier": "$.tier"},
        created_at=CREATED,
        updated_at=CREATED,
        event_from=event_from,
    )


METERS = [meter(a) for a in ("SUM", "COUNT", "AVG", "MIN", "MAX", "LATEST")] + [meter("UNIQUE_COUNT", "$.user")]


def event(rng: random.Random, n: int) -> AuditRow:
    r = row(f"e{n}", 0, cost=None, status=rng.choice(["not_metered"] * 12 + ["late", "failed"]))
    value: Any = rng.choice([rng.randint(-5, 50), f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}", "1e3", None, "x"])
    data: dict[str, Any] = {"model": rng.choice(["a", "b", "c"]), "user": f"u{rng.randint(0, 30)}"}
    if rng.random() < 0.8:
        data["tier"] = rng.choice(["free", "pro"])
    if value is not None:
        data["v"] = value
    r.update(
        type=rng.choice(["tokens"] * 5 + ["other"]),
        subject=rng.choice(["alice", "bob", "carol"]),
        time_us=int((T0 + timedelta(seconds=rng.uniform(0, 4 * 3600))).timestamp() * 1_000_000),
        data=json.dumps(data),
    )
    return r


def written(
    store: WindowStore, records: Sequence[Any], meters: Sequence[UserMeter], caught_up: bool = True
) -> dict[Source, int]:
    """Write ``records`` as the sink writes one batch: audit rows, then the meters' steps, then the markers."""
    offsets: dict[Source, int] = {}
    for r in records:
        source = (r["topic_id"], r["partition"])
        offsets[source] = max(offsets.get(source, -1), r["offset"])
    steps = [MeterStep(m, tuple((s, upto, caught_up) for s, upto in sorted(offsets.items()))) for m in meters]
    store.write(Plan(events=[Kept(r, None) for r in records], offsets=offsets), datetime.now(UTC), steps)
    return offsets


def answer(reader: MeterReader, query: MeterQuery, from_states: bool) -> list[QueryRow]:
    sql, params = user_meter_sql(query, from_states=from_states)
    return MeterReader._rows(query, reader._query(sql, params).result_rows, 1)[0]


def history(rng: random.Random, count: int) -> list[Any]:
    records, n = [], 0
    offsets = {0: -1, 1: -1}
    for _ in range(count):
        partition = rng.choice([0, 1])
        offsets[partition] += 1
        rows = []
        for i in range(rng.randint(1, 8)):
            rows.append(event(rng, n) | {"index": i})
            n += 1
        records.append(record(offsets[partition], *rows, partition=partition))
    return records


def queries(rng: random.Random, m: UserMeter, count: int) -> list[MeterQuery]:
    found = []
    for _ in range(count):
        start = T0 + timedelta(seconds=rng.uniform(-600, 3 * 3600)) if rng.random() < 0.8 else None
        end = None if start is None or rng.random() < 0.2 else start + timedelta(seconds=rng.uniform(1, 3 * 3600))
        if start is not None and rng.random() < 0.3:
            start = start.replace(second=0, microsecond=0)  # whole minutes only, the edges none
        group_by = tuple(k for k in m.group_keys if rng.random() < 0.4)
        include = {"model": ("a", "c")} if rng.random() < 0.3 else {}
        exclude = {"subject": ("bob",)} if rng.random() < 0.3 else {}
        found.append(
            MeterQuery(
                meter=m,
                start=start,
                end=end,
                window_size=rng.choice([None, WindowSize.MINUTE, WindowSize.HOUR, WindowSize.DAY]),
                time_zone=rng.choice(["UTC", "America/New_York", "Asia/Kathmandu"]),
                group_by=group_by,
                include=include,
                exclude=exclude,
            )
        )
    return found


def test_states_answer_every_query_as_the_audit_log_does(ch: ClickHouse) -> None:
    rng = random.Random(18)
    store, reader = WindowStore(ch), MeterReader(ch)
    records = history(rng, 120)
    for i in range(0, len(records), 25):
        written(store, records[i : i + 25], METERS)
    written(store, records[40:50], METERS)  # a replayed batch: its audit rows again, its steps add nothing
    for m in METERS:
        assert reader.states_ready(m)
        for q in queries(rng, m, 25):
            assert answer(reader, q, True) == answer(reader, q, False), q

    # An independent check, so the two paths cannot agree on a wrong answer: the whole history's totals.
    events = [
        (json.loads(e["data"]), e["subject"])
        for r in records
        for e in (dict(zip(r["events"], values, strict=True)) for values in zip(*r["events"].values(), strict=True))
        if e["type"] == "tokens" and e["status"] == "not_metered"
    ]

    def number(v: Any) -> Decimal | None:
        try:
            return Decimal(str(v)) if v is not None else None
        except ArithmeticError:
            return None

    values = [v for d, _ in events if (v := number(d.get("v"))) is not None and v.is_finite()]
    total = {m.aggregation: answer(reader, MeterQuery(meter=m), True) for m in METERS}
    assert [r.value for r in total["SUM"]] == [sum(values)]
    assert [r.value for r in total["COUNT"]] == [len(events)]
    assert [r.value for r in total["MIN"]] == [min(values)]
    assert [r.value for r in total["MAX"]] == [max(values)]
    assert [r.value for r in total["UNIQUE_COUNT"]] == [len({d["user"] for d, _ in events})]


def parts(ch: ClickHouse) -> int:
    result = ch.client().query(
        "SELECT count() FROM system.parts WHERE database = currentDatabase() AND table = 'meter_windows' AND active"
    )
    return int(result.result_rows[0][0])


def test_a_step_is_one_part_and_applies_once(ch: ClickHouse) -> None:
    rng = random.Random(7)
    store, reader = WindowStore(ch), MeterReader(ch)
    ch.client().command("SYSTEM STOP MERGES meter_windows")
    records = history(rng, 30)
    store.write(Plan(events=[Kept(r, None) for r in records]), datetime.now(UTC))  # the audit rows alone
    (sum_meter,) = [m for m in METERS if m.aggregation == "SUM"]
    before = parts(ch)
    ranges = ((("T", 0), records[-1]["offset"] + 100, True), (("T", 1), records[-1]["offset"] + 100, True))
    store.meters.apply([MeterStep(sum_meter, ranges)])
    assert parts(ch) == before + 1  # every state row and both markers: visible together or not at all
    once = answer(reader, MeterQuery(meter=sum_meter, window_size=WindowSize.MINUTE), True)
    assert once
    store.meters.apply([MeterStep(sum_meter, ranges)])  # a retry of the same INSERT: deduplicated
    shorter = tuple((s, upto - 1, c) for s, upto, c in ranges)
    store.meters.apply([MeterStep(sum_meter, shorter)])  # a stale step: its ranges are below the markers
    assert answer(reader, MeterQuery(meter=sum_meter, window_size=WindowSize.MINUTE), True) == once
    assert {s: m.offset for s, m in store.meters.markers()[sum_meter.state_id].items()} == {
        ("T", 0): records[-1]["offset"] + 100,
        ("T", 1): records[-1]["offset"] + 100,
    }


def test_edges_count_an_event_once_its_offset_is_in_the_states(ch: ClickHouse) -> None:
    """Partial minutes are read from the audit log, which is written before the steps: an event there counts
    only once the meter's marker covers it, so a query never runs ahead of the states it adds to."""
    store, reader = WindowStore(ch), MeterReader(ch)
    (count,) = [m for m in METERS if m.aggregation == "COUNT"]
    start = datetime.fromtimestamp(1_700_000_040, UTC)

    def late(event_id: str) -> AuditRow:
        return row(event_id, 0, cost=None, status="not_metered") | {"type": "tokens", "data": "{}"}

    written(store, [record(0, late("a"))], [count])
    q = MeterQuery(meter=count, start=start, end=start + timedelta(seconds=30))
    assert [r.value for r in answer(reader, q, True)] == [1]
    store.write(Plan(events=[Kept(record(1, late("b")), None)]), datetime.now(UTC))  # no step yet
    assert [r.value for r in answer(reader, q, True)] == [1]
    store.meters.apply([MeterStep(count, ((("T", 0), 1, True),))])
    assert [r.value for r in answer(reader, q, True)] == [2]


def test_a_meter_from_a_time_on_and_backfill_chunks(ch: ClickHouse) -> None:
    rng = random.Random(3)
    store, reader = WindowStore(ch), MeterReader(ch)
    records = history(rng, 60)
    later = T0 + timedelta(hours=1, seconds=30)
    m = meter("SUM", event_from=later)
    store.write(
        Plan(events=[Kept(r, None) for r in records], offsets={("T", 0): 10**6, ("T", 1): 10**6}), datetime.now(UTC)
    )
    assert not reader.states_ready(m)
    assert reader.backfill_progress(m)[0] == 0
    # Backfill partition 0 in chunks of about 20 rows, as the sink does.
    after, ends = -1, []
    while after < 10**6:
        end = store.meters.chunk_end(m, ("T", 0), after, 10**6, 20)
        assert end > after
        store.meters.apply([MeterStep(m, ((("T", 0), end, end == 10**6),))])
        ends.append(end)
        after = end
    assert len(ends) > 3
    done, total = reader.backfill_progress(m)
    assert 0 < done < total
    assert not reader.states_ready(m)  # partition 1 is not caught up yet
    store.meters.apply([MeterStep(m, ((("T", 1), 10**6, True),))])
    assert reader.states_ready(m) and reader.backfill_progress(m)[0] == reader.backfill_progress(m)[1]
    for q in queries(rng, m, 20):
        assert answer(reader, q, True) == answer(reader, q, False), q
    assert all(
        r.window_start >= later.replace(second=0)
        for r in answer(reader, MeterQuery(meter=m, window_size=WindowSize.MINUTE), True)
    )


def test_events_without_a_value_are_counted_as_such(ch: ClickHouse) -> None:
    """An event with no value where its meter needs one is left out of the meter's numbers, and said so: the
    event list names the meters that leave it out, and a gauge counts them per meter (from the states)."""
    from schemas.query import EventFilter
    from sinks.clickhouse.metrics import MeterValuesMissing

    rng = random.Random(9)
    store, reader = WindowStore(ch), MeterReader(ch)
    records = history(rng, 40)
    written(store, records, METERS)
    events = [
        dict(zip(r["events"], values, strict=True))
        for r in records
        for values in zip(*r["events"].values(), strict=True)
    ]
    metered = [e for e in events if e["type"] == "tokens" and e["status"] == "not_metered"]

    def lacks(e: AuditRow, aggregation: str) -> bool:
        value = json.loads(e["data"]).get("user" if aggregation == "UNIQUE_COUNT" else "v")
        if aggregation == "UNIQUE_COUNT":
            return value in (None, "")
        try:
            return value is None or not Decimal(str(value)).is_finite()
        except ArithmeticError:
            return True

    expected = {m.slug: sum(lacks(e, m.aggregation) for e in metered) for m in METERS if m.value_property}
    assert expected["sum"] > 0
    (family,) = MeterValuesMissing(ch, lambda: METERS).collect()
    assert {s.labels["meter"]: s.value for s in family.samples} == expected

    listed = reader.list_events(EventFilter(start=T0 - timedelta(days=1), limit=100), METERS)
    assert len(listed) == 100
    for e in listed:
        (audit,) = [a for a in events if a["id"] == e["id"]]
        wanted = [m.slug for m in METERS if m.value_property and audit in metered and lacks(audit, m.aggregation)]
        assert list(e["values_missing"]) == wanted, (audit, e["values_missing"])
    assert any(e["values_missing"] for e in listed)
    assert all(not e["values_missing"] for e in reader.list_events(EventFilter(start=T0 - timedelta(days=1))))


def test_a_step_without_events_of_the_meter_moves_only_its_markers(ch: ClickHouse) -> None:
    """The sink marks a step ``events=False`` when no event of its records has the meter's type: the markers
    advance (the meter stays caught up) and no state is written; a later step with events counts them."""
    store, reader = WindowStore(ch), MeterReader(ch)
    (count,) = [m for m in METERS if m.aggregation == "COUNT"]
    others = [
        record(n, row(f"o{n}", 0, cost=None, status="not_metered") | {"type": "other", "data": "{}"}) for n in range(3)
    ]
    plan = Plan(events=[Kept(r, None) for r in others], offsets={("T", 0): 2})
    assert plan.event_types() == {"other"}
    store.write(plan, datetime.now(UTC), [MeterStep(count, ((("T", 0), 2, True),), events=False)])
    assert {s: m.offset for s, m in store.meters.markers()[count.state_id].items()} == {("T", 0): 2}
    assert answer(reader, MeterQuery(meter=count, window_size=WindowSize.MINUTE), True) == []
    mine = record(3, row("t3", 0, cost=None, status="not_metered") | {"type": "tokens", "data": "{}"})
    store.write(
        Plan(events=[Kept(mine, None)], offsets={("T", 0): 3}),
        datetime.now(UTC),
        [MeterStep(count, ((("T", 0), 3, True),))],
    )
    assert [r.value for r in answer(reader, MeterQuery(meter=count, window_size=WindowSize.MINUTE), True)] == [1]
    assert answer(reader, MeterQuery(meter=count), True) == answer(reader, MeterQuery(meter=count), False)

"""The sink's exactly-once decisions: offsets chained per source partition, events deduplicated by identity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from schemas.records import AUDIT_COLUMNS, AuditColumns, WindowsRecord
from sinks.apply import Coords, EventKey, plan_batch

AuditRow = dict[str, Any]

MINUTE = 1_700_000_040  # a window start, seconds


def row(
    event_id: str, index: int, *, cost: int | None = 10**15, status: str = "counted", input_tokens: int = 10
) -> AuditRow:
    return {
        "index": index,
        "id": event_id,
        "source": "app",
        "subject": "alice",
        "type": "llm.usage",
        "time_us": MINUTE * 1_000_000 + 5,
        "received_us": MINUTE * 1_000_000 + 9,
        "data": "{}",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_tokens": input_tokens,
        "output_tokens": 2,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "usage": f'{{"input_tokens": {input_tokens}, "output_tokens": 2}}',
        "cost_atto": cost,
        "cost_input_atto": cost,
        "cost_output_atto": 0 if cost is not None else None,
        "price_source": "test",
        "status": status,
    }


def columns(*rows: AuditRow) -> AuditColumns:
    return {name: [r[name] for r in rows] for name in AUDIT_COLUMNS}  # type: ignore[return-value]


def stored_ids(plan: Any) -> list[str]:
    return [key[1] for kept in plan.events for key, _ in kept.keys_and_coords()]


def stored_coords(plan: Any) -> list[Coords]:
    return [coords for kept in plan.events for _, coords in kept.keys_and_coords()]


def record(offset: int, *rows: AuditRow, partition: int = 0, topic: str = "T") -> WindowsRecord:
    counted = [r for r in rows if r["status"] == "counted"]
    windows = []
    if counted:
        windows.append(
            {
                "subject": "alice",
                "provider": "openai",
                "model": "gpt-4o-mini",
                "window_start": MINUTE,
                "requests": len(counted),
                "input_tokens": sum(r["input_tokens"] for r in counted),
                "output_tokens": 2 * len(counted),
                "cache_read_tokens": 0,
                "cache_write_tokens": 0,
                "reasoning_tokens": 0,
                "total_tokens": sum(r["input_tokens"] + 2 for r in counted),
                "unpriced_requests": sum(1 for r in counted if r["cost_atto"] is None),
                "cost_atto": sum(r["cost_atto"] or 0 for r in counted),
            }
        )
    return {
        "v": 1,
        "topic_id": topic,
        "partition": partition,
        "offset": offset,
        "windows": windows,
        "events": columns(*rows),
    }  # type: ignore[typeddict-item]


def nothing_stored(keys: list[EventKey]) -> Mapping[EventKey, Coords]:
    return {}


def totals(plan: Any) -> tuple[int, int, int]:
    (window,) = plan.windows.values()
    return window.counts[0], window.counts[1], window.cost_atto


def test_records_apply_in_offset_order_once() -> None:
    plan = plan_batch([record(0, row("a", 0)), record(1, row("b", 0)), record(1, row("b", 0))], {}, nothing_stored)
    assert plan.offsets == {("T", 0): 1}
    assert plan.replays == 1
    assert totals(plan) == (2, 20, 2 * 10**15)


def test_already_applied_offsets_are_replays() -> None:
    plan = plan_batch([record(4, row("a", 0)), record(5, row("b", 0))], {("T", 0): 4}, nothing_stored)
    assert plan.replays == 1 and plan.offsets == {("T", 0): 5}
    assert stored_ids(plan) == ["b"]


def test_a_gap_stops_the_partition_until_the_missing_record_comes() -> None:
    plan = plan_batch([record(0, row("a", 0)), record(2, row("c", 0)), record(1, row("b", 0))], {}, nothing_stored)
    # 2 is skipped (ahead of 1); it will be redelivered after 1, since its input was never acknowledged.
    assert plan.gaps == 1 and plan.offsets == {("T", 0): 1}
    assert stored_ids(plan) == ["a", "b"]


def test_partitions_and_topics_are_chained_separately() -> None:
    plan = plan_batch(
        [record(0, row("a", 0)), record(0, row("b", 0), partition=1), record(0, row("c", 0), topic="U")],
        {("T", 1): -1},
        nothing_stored,
    )
    assert plan.offsets == {("T", 0): 0, ("T", 1): 0, ("U", 0): 0}


def test_a_duplicate_stored_earlier_is_taken_back_out() -> None:
    def stored(keys: list[EventKey]) -> Mapping[EventKey, Coords]:
        return {("app", "a"): ("T", 0, 3, 0)}

    plan = plan_batch([record(7, row("a", 0), row("b", 1, input_tokens=30))], {("T", 0): 6}, stored)
    assert plan.duplicates == 1
    assert stored_ids(plan) == ["b"]
    assert totals(plan) == (1, 30, 10**15)


def test_the_same_occurrence_is_not_a_duplicate() -> None:
    # The audit rows of offset 7 were written, then the process died before the window deltas: the replay counts.
    def stored(keys: list[EventKey]) -> Mapping[EventKey, Coords]:
        return {("app", "a"): ("T", 0, 7, 0)}

    plan = plan_batch([record(7, row("a", 0))], {("T", 0): 6}, stored)
    assert plan.duplicates == 0 and totals(plan) == (1, 10, 10**15)


def test_duplicates_within_a_batch_keep_the_first() -> None:
    plan = plan_batch([record(0, row("a", 0)), record(0, row("a", 0), partition=1)], {}, nothing_stored)
    assert plan.duplicates == 1
    assert stored_coords(plan) == [("T", 0, 0, 0)]
    assert sum(w.counts[0] for w in plan.windows.values()) == 1


def test_a_window_emptied_by_duplicates_is_not_written() -> None:
    def stored(keys: list[EventKey]) -> Mapping[EventKey, Coords]:
        return {("app", "a"): ("T", 0, 0, 0)}

    plan = plan_batch([record(1, row("a", 0))], {("T", 0): 0}, stored)
    assert plan.windows == {} and plan.offsets == {("T", 0): 1}


def test_unpriced_duplicates_are_taken_back_from_unpriced() -> None:
    def stored(keys: list[EventKey]) -> Mapping[EventKey, Coords]:
        return {("app", "a"): ("T", 0, 0, 0)}

    plan = plan_batch([record(1, row("a", 0, cost=None), row("b", 1, cost=None))], {("T", 0): 0}, stored)
    (window,) = plan.windows.values()
    assert window.counts[0] == 1 and window.counts[7] == 1 and window.cost_atto == 0


def test_late_duplicates_touch_no_window() -> None:
    def stored(keys: list[EventKey]) -> Mapping[EventKey, Coords]:
        return {("app", "a"): ("T", 0, 0, 0)}

    plan = plan_batch([record(1, row("a", 0, status="late"))], {("T", 0): 0}, stored)
    assert plan.duplicates == 1 and plan.windows == {} and stored_ids(plan) == []


def test_inconsistent_deltas_are_refused() -> None:
    def stored(keys: list[EventKey]) -> Mapping[EventKey, Coords]:
        return {("app", "a"): ("T", 0, 0, 0)}

    broken = record(1, row("a", 0))
    broken["windows"][0]["requests"] = 0  # inconsistent with its audit rows
    with pytest.raises(AssertionError, match="negative"):
        plan_batch([broken], {("T", 0): 0}, stored)


@pytest.mark.parametrize("value", [None, "x"])
@pytest.mark.parametrize("field", ["requests", "total_tokens", "cost_atto"])
def test_a_corrupt_count_fails_planning(field: str, value: Any) -> None:
    """A delta whose count is null or text (a corrupt record) fails in planning, where the sink tells a
    poison record, whether its window is new to the batch or already there."""
    corrupt = record(0, row("a", 0))
    corrupt["windows"][0][field] = value  # type: ignore[literal-required]
    with pytest.raises((TypeError, ValueError)):
        plan_batch([corrupt], {}, lambda keys: {})
    with pytest.raises((TypeError, ValueError)):
        plan_batch([record(0, row("b", 0)), {**corrupt, "offset": 1}], {}, lambda keys: {})

"""The reservations' usage cache: a kept usage brought forward by a stored write equals a fresh read."""

from __future__ import annotations

import random
from bisect import bisect_right
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from control.usage_cache import Segments, UsageCache
from schemas.meters import WINDOW_COUNTS, WindowChange

T0 = datetime(2026, 3, 1, tzinfo=UTC)
MIN = timedelta(minutes=1)


def change(minute: int, tokens: int, *, subject: str = "alice", model: str = "gpt-4o", atto: int = 0) -> WindowChange:
    counts = [0] * len(WINDOW_COUNTS)
    counts[WINDOW_COUNTS.index("total_tokens")] = tokens
    counts[WINDOW_COUNTS.index("requests")] = 1
    return WindowChange(subject, "openai", model, T0 + minute * MIN, counts, atto)


def segments(
    column: str = "total_tokens", *, start: datetime = T0, cuts: tuple[int, ...] = (10,), **filters: str
) -> Segments:
    return Segments("alice", column, filters, start, tuple(T0 + c * MIN for c in cuts))


def test_a_write_seen_whole_is_added_to_its_segments() -> None:
    cache = UsageCache(10)
    cache.put("k", (0, 2), segments(), [Decimal(5), Decimal(7)])
    cache.stored([change(3, 100), change(10, 1), change(11, 2), change(-1, 1000)], {"alice": ((0, 2), (0, 4))})
    assert cache.get("k", (0, 2)) is None  # the old version is gone
    assert cache.get("k", (0, 4)) == [Decimal(105), Decimal(10)]  # before the range's start: not counted
    assert cache.advanced == 1


def test_a_kept_usage_at_another_version_is_dropped() -> None:
    cache = UsageCache(10)
    cache.put("k", (0, 2), segments(), [Decimal(5), Decimal(7)])
    # A write began after this usage was read and before another was stored: it saw part of a write.
    cache.stored([change(3, 100)], {"alice": ((0, 6), (0, 8))})
    assert cache.get("k", (0, 8)) is None and cache.get("k", (0, 2)) is None
    assert cache.dropped == 1


def test_the_minute_of_an_unaligned_start_cannot_be_brought_forward() -> None:
    cache = UsageCache(10)
    start = T0 + timedelta(seconds=30)
    cache.put("k", (0, 2), segments(start=start), [Decimal(5), Decimal(7)])
    cache.stored([change(0, 100)], {"alice": ((0, 2), (0, 4))})  # the window of 00:00 holds 00:00:10 too
    assert cache.get("k", (0, 4)) is None
    cache.put("k", (0, 4), segments(start=start), [Decimal(5), Decimal(7)])
    cache.stored([change(1, 100)], {"alice": ((0, 4), (0, 6))})  # the next minute is whole
    assert cache.get("k", (0, 6)) == [Decimal(105), Decimal(7)]


def test_filters_and_other_subjects() -> None:
    cache = UsageCache(10)
    cache.put("k", (0, 2), segments(model="gpt-4o"), [Decimal(0), Decimal(0)])
    cache.stored(
        [change(1, 10), change(1, 20, model="o3"), change(1, 40, subject="bob")],
        {"alice": ((0, 2), (0, 4)), "bob": ((0, 2), (0, 4))},
    )
    assert cache.get("k", (0, 4)) == [Decimal(10), Decimal(0)]
    # A subject the write did not change keeps its version (its bucket may have moved: then a miss).
    cache.stored([change(2, 5, subject="bob")], {"bob": ((0, 4), (0, 6))})
    assert cache.get("k", (0, 4)) == [Decimal(10), Decimal(0)]


def test_money_is_exact() -> None:
    cache = UsageCache(10)
    cache.put("k", (0, 2), segments("cost_usd"), [Decimal("0.000000000000000001"), Decimal(0)])
    cache.stored([change(1, 0, atto=3), change(12, 0, atto=-1)], {"alice": ((0, 2), (0, 4))})
    assert cache.get("k", (0, 4)) == [Decimal("0.000000000000000004"), Decimal("-0.000000000000000001")]


def test_a_full_cache_starts_over() -> None:
    cache = UsageCache(2)
    cache.put("a", (0, 2), segments(), [Decimal(1), Decimal(1)])
    cache.put("b", (0, 2), segments(), [Decimal(2), Decimal(2)])
    cache.put("c", (0, 2), segments(), [Decimal(3), Decimal(3)])
    assert cache.get("a", (0, 2)) is None and cache.get("c", (0, 2)) == [Decimal(3), Decimal(3)]
    cache.stored([change(1, 1)], {"alice": ((0, 2), (0, 4))})
    assert cache.get("c", (0, 4)) == [Decimal(4), Decimal(3)]


def test_a_segment_count_that_does_not_match_is_refused() -> None:
    with pytest.raises(ValueError, match="one total per segment"):
        UsageCache(2).put("k", (0, 2), segments(), [Decimal(1)])


@pytest.mark.parametrize("seed", range(20))
def test_brought_forward_equals_summing_every_window(seed: int) -> None:
    """Against a ground truth: every window ever stored, summed per segment from the range's start."""
    rng = random.Random(seed)
    cuts = tuple(sorted(rng.sample(range(1, 60), 3)))
    start_minute = rng.randrange(-5, 5)
    seg = Segments("alice", "total_tokens", {}, T0 + start_minute * MIN, tuple(T0 + c * MIN for c in cuts))
    stored: list[WindowChange] = []

    def truth() -> list[Decimal]:
        totals = [Decimal(0)] * (len(cuts) + 1)
        for c in stored:
            if c.subject == "alice" and c.minute >= seg.start:
                totals[bisect_right(seg.cuts, c.minute)] += c.value("total_tokens")
        return totals

    cache = UsageCache(10)
    version = 0
    cache.put("k", (0, version), seg, truth())
    for _ in range(30):
        write = [
            change(rng.randrange(-10, 70), rng.randrange(-50, 500), subject=rng.choice(["alice", "bob"]))
            for _ in range(rng.randrange(1, 6))
        ]
        stored.extend(write)
        subjects = {c.subject for c in write}
        cache.stored(write, {s: ((0, version), (0, version + 2)) for s in subjects})
        if "alice" in subjects:
            version += 2
        assert cache.get("k", (0, version)) == truth()

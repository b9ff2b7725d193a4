"""RecentKeys: bounded, and always remembers the most recent half of its capacity."""

from __future__ import annotations

import pytest

from schemas.recent import RecentKeys


@pytest.mark.parametrize("capacity", [2, 3, 10, 1000])
def test_remembers_the_latest_half_and_never_more_than_capacity(capacity: int) -> None:
    recent: RecentKeys[int, str] = RecentKeys(capacity)
    # Every key ever added is looked for (a quadratic scan: at every step for small capacities, every
    # 37th step and the last for large ones).
    every = 1 if capacity <= 10 else 37
    last = 10 * capacity + 6
    for n in range(last + 1):
        recent.add(n, f"v{n}")
        if n % every == 0 or n == last:
            held = [k for k in range(n + 1) if k in recent]
            assert len(held) <= capacity
        latest = range(max(0, n + 1 - capacity // 2), n + 1)
        assert all(k in recent for k in latest)
        assert all(recent.get(k) == f"v{k}" for k in latest)
    assert 0 not in recent
    assert recent.get(0) is None


def test_a_key_added_again_keeps_its_newest_value_and_is_remembered_longer() -> None:
    recent: RecentKeys[str, int] = RecentKeys(4)
    recent.add("a", 1)
    recent.add("b", 2)  # young generation full: {a, b} becomes old
    recent.add("a", 3)
    assert recent.get("a") == 3
    recent.add("c", 4)  # {a, c} becomes old, {a, b} is forgotten
    assert "a" in recent and recent.get("a") == 3
    assert "b" not in recent


@pytest.mark.parametrize("capacity", [0, 1])
def test_too_small_a_capacity_remembers_nothing(capacity: int) -> None:
    recent: RecentKeys[str, None] = RecentKeys(capacity)
    recent.add("a", None)
    recent.add_all([("b", None)])
    assert "a" not in recent and "b" not in recent


def test_clear_forgets_everything() -> None:
    recent: RecentKeys[str, int] = RecentKeys(10)
    recent.add_all((k, 1) for k in "abcdefgh")
    recent.clear()
    assert not any(k in recent for k in "abcdefgh")

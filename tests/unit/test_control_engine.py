"""Recurring periods and the burn-down engine (pure logic): calendar rules, burn order, expiry, overage,
rollover at resets, recurrence; and replaying from a memoryless reset equals replaying from the start."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control import engine
from control.model import Entitlement, EntitlementType, Grant, UsageReset
from control.periods import Interval, RecurringPeriod

D = Decimal
T0 = datetime(2026, 3, 1, tzinfo=UTC)
H = timedelta(hours=1)
DAILY = Interval(days=1)


def test_intervals_parse_and_name() -> None:
    assert Interval.parse("MONTH") == Interval(months=1)
    assert Interval.parse("P1Y2M") == Interval(months=14)
    assert Interval.parse("P2W") == Interval(days=14)
    assert Interval.parse("PT6H") == Interval(minutes=360)
    assert [Interval.parse(x).name for x in ("DAY", "P7D", "P12M", "PT90M")] == ["DAY", "WEEK", "YEAR", "PT1H30M"]
    for bad in ("FORTNIGHT", "P", "PT30M", "PT1H30S", "", "1M"):
        with pytest.raises(ValueError):  # noqa: PT011 - the message is the parser's, asserted elsewhere
            Interval.parse(bad)


def test_months_clamp_to_the_last_day_and_are_counted_from_the_anchor() -> None:
    p = RecurringPeriod(Interval(months=1), datetime(2026, 1, 31, 12, tzinfo=UTC))
    assert [p.boundary(k).date().isoformat() for k in range(5)] == [
        "2026-01-31",
        "2026-02-28",
        "2026-03-31",
        "2026-04-30",
        "2026-05-31",
    ]
    assert p.boundary(-1).date().isoformat() == "2025-12-31"
    leap = RecurringPeriod(Interval(months=12), datetime(2024, 2, 29, tzinfo=UTC))
    assert leap.boundary(1).date().isoformat() == "2025-02-28"
    assert leap.boundary(4).date().isoformat() == "2028-02-29"


def test_local_calendar_across_dst() -> None:
    # Local midnight in Budapest: 23:00 UTC in winter, 22:00 UTC in summer (DST began 2026-03-29).
    p = RecurringPeriod(Interval(days=1), datetime(2026, 3, 27, 23, tzinfo=UTC), "Europe/Budapest")
    assert [p.boundary(k) for k in range(4)] == [
        datetime(2026, 3, 27, 23, tzinfo=UTC),
        datetime(2026, 3, 28, 23, tzinfo=UTC),
        datetime(2026, 3, 29, 22, tzinfo=UTC),
        datetime(2026, 3, 30, 22, tzinfo=UTC),
    ]
    assert p.containing(datetime(2026, 3, 29, 22, 30, tzinfo=UTC)) == (p.boundary(2), p.boundary(3))
    assert p.boundaries(p.boundary(0), p.boundary(2)) == [p.boundary(1), p.boundary(2)]
    # A local time a DST gap skips is moved forward by the gap (02:30 on 2026-03-08 in New York).
    ny = RecurringPeriod(Interval(days=1), datetime(2026, 3, 6, 7, 30, tzinfo=UTC), "America/New_York")
    assert ny.boundary(2) == datetime(2026, 3, 8, 7, 30, tzinfo=UTC)  # 03:30 EDT


def test_anchor_in_the_future_and_containing_is_half_open() -> None:
    p = RecurringPeriod(Interval(months=1), datetime(2030, 1, 1, tzinfo=UTC))
    assert p.containing(datetime(2026, 3, 1, tzinfo=UTC)) == (
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2026, 4, 1, tzinfo=UTC),
    )
    assert p.containing(datetime(2026, 2, 28, 23, 59, tzinfo=UTC))[1] == datetime(2026, 3, 1, tzinfo=UTC)


def entitlement(start: datetime = T0, interval: Interval = DAILY, preserve: bool = False) -> Entitlement:
    return Entitlement(
        id="e",
        subject_key="s",
        feature_id="f",
        feature_key="f",
        type=EntitlementType.METERED,
        usage_period=RecurringPeriod(interval, start),
        measure_usage_from=start,
        is_soft_limit=False,
        is_unlimited=False,
        issue_after_reset=None,
        issue_after_reset_priority=1,
        preserve_overage_at_reset=preserve,
        config=None,
        metadata=None,
        plan_key=None,
        plan_template=None,
        created_at=start,
        updated_at=start,
    )


def grant(
    gid: str,
    amount: int,
    effective: datetime = T0,
    expires: datetime | None = None,
    priority: int = 1,
    rollover: tuple[int, int] = (0, 0),
    recurrence: RecurringPeriod | None = None,
    voided: datetime | None = None,
) -> Grant:
    return Grant(
        id=gid,
        entitlement_id="e",
        amount=D(amount),
        priority=priority,
        effective_at=effective,
        expiration_duration="YEAR",
        expiration_count=1,
        expires_at=expires or effective + timedelta(days=365),
        min_rollover_amount=D(rollover[0]),
        max_rollover_amount=D(rollover[1]),
        recurrence=recurrence,
        metadata=None,
        annotations=None,
        created_at=effective,
        updated_at=effective,
        voided_at=voided,
    )


def run(
    ent: Entitlement,
    grants: list[Grant],
    usage: dict[datetime, int],
    at: datetime,
    resets: list[UsageReset] | None = None,
    replay_by: datetime | None = None,
) -> engine.Balance:
    """Replay with usage given as amounts at minute starts (what the stored windows hold)."""
    line = engine.timeline(ent, grants, resets or [], at, replay_by=replay_by)
    usages = [D(sum(v for t, v in usage.items() if lo <= t < hi)) for lo, hi in line.segments()]
    return engine.replay(line, usages, record_segments=True)


def test_burn_order_priority_then_expiry() -> None:
    grants = [
        grant("late", 100, priority=1),
        grant("soon", 100, priority=1, expires=T0 + 10 * H),
        grant("low", 100, priority=5, expires=T0 + 2 * H),
    ]
    b = run(entitlement(), grants, {T0 + H: 150}, T0 + 3 * H)
    assert b.grant_balances == {"late": D(50), "soon": D(0)}  # "low" expired untouched, "soon" burnt first
    assert (b.balance, b.usage, b.overage, b.total_available) == (D(50), D(150), D(0), D(200))


def test_overage_is_paid_by_a_grant_that_comes_later() -> None:
    b = run(entitlement(), [grant("g", 100, effective=T0 + 2 * H)], {T0 + H: 25, T0 + 3 * H: 25}, T0 + 4 * H)
    assert (b.balance, b.overage, b.usage, b.total_available) == (D(50), D(0), D(50), D(100))
    before = run(entitlement(), [grant("g", 100, effective=T0 + 2 * H)], {T0 + H: 25}, T0 + 90 * timedelta(minutes=1))
    assert (before.balance, before.overage) == (D(0), D(25))


def test_reset_rolls_over_and_forgives_or_preserves_overage() -> None:
    day = timedelta(days=1)
    grants = [grant("plain", 100), grant("issue", 1000, rollover=(1000, 1000), priority=2)]
    usage = {T0 + H: 1050, T0 + day + H: 10}
    b = run(entitlement(), grants, usage, T0 + day + 2 * H)
    # After the reset at T0 + 1 day the plain grant rolls over to 0, the issue grant to its amount.
    assert b.grant_balances == {"plain": D(0), "issue": D(990)}
    assert (b.usage, b.overage, b.last_reset) == (D(10), D(0), T0 + day)
    over = {T0 + H: 1200, T0 + day + H: 10}
    forgiven = run(entitlement(), grants, over, T0 + day + 2 * H)
    assert (forgiven.balance, forgiven.overage) == (D(990), D(0))
    kept = run(entitlement(preserve=True), grants, over, T0 + day + 2 * H)
    assert (kept.balance, kept.overage) == (D(890), D(0))  # the 100 overage is paid first after the reset
    assert kept.total_available == D(1000)


def test_manual_reset_re_anchors_unless_retained() -> None:
    ent = entitlement(interval=Interval(days=1))
    reset = UsageReset("e", T0 + 5 * H, retain_anchor=False, preserve_overage=False, created_at=T0)
    resets, period = engine.resets_between(ent.usage_period, [reset], T0, T0 + timedelta(days=2), False)  # type: ignore[arg-type]
    assert [r.at for r in resets] == [T0 + 5 * H, T0 + 29 * H]
    assert period.anchor == T0 + 5 * H
    kept = UsageReset("e", T0 + 5 * H, retain_anchor=True, preserve_overage=False, created_at=T0)
    resets, _ = engine.resets_between(ent.usage_period, [kept], T0, T0 + timedelta(days=2), False)  # type: ignore[arg-type]
    assert [r.at for r in resets] == [T0 + 5 * H, T0 + 24 * H, T0 + 48 * H]


def test_recurrence_refills_and_voiding_ends() -> None:
    hourly = RecurringPeriod(Interval(minutes=60), T0)
    b = run(
        entitlement(),
        [grant("r", 10, recurrence=hourly)],
        {T0: 8, T0 + H: 4, T0 + 2 * H: 3},
        T0 + 150 * timedelta(minutes=1),
    )
    assert (b.balance, b.overage) == (D(7), D(0))
    voided = run(entitlement(), [grant("v", 100, voided=T0 + H)], {T0: 10, T0 + 2 * H: 5}, T0 + 3 * H)
    assert (voided.balance, voided.overage, voided.total_available) == (D(0), D(5), D(10))


def test_has_access() -> None:
    ent = entitlement()
    used_up = run(ent, [grant("g", 10)], {T0: 10}, T0 + H)
    assert not engine.has_access(ent, used_up)
    assert engine.has_access(replace(ent, is_soft_limit=True), used_up)
    assert engine.has_access(ent, run(ent, [grant("g", 10)], {T0: 9}, T0 + H))


MINUTES = st.integers(min_value=0, max_value=4 * 24 * 60 - 1)


@settings(max_examples=150, deadline=None)
@given(
    grants=st.lists(
        st.tuples(
            st.integers(1, 500),
            MINUTES,
            st.integers(60, 6000),
            st.integers(1, 3),
            st.sampled_from([(0, 0), (50, 50), (0, 100), (20, 300)]),
            st.booleans(),
        ),
        max_size=5,
    ),
    usage=st.dictionaries(MINUTES, st.integers(0, 200), max_size=40),
    preserve=st.booleans(),
    at=MINUTES,
)
def test_replaying_from_a_memoryless_reset_equals_replaying_everything(
    grants: list[tuple[int, int, int, int, tuple[int, int], bool]],
    usage: dict[int, int],
    preserve: bool,
    at: int,
) -> None:
    minute = timedelta(minutes=1)
    ent = entitlement(interval=Interval(days=1), preserve=preserve)
    made = [
        grant(
            f"g{i}",
            amount,
            effective=T0 + start * minute,
            expires=T0 + (start + length) * minute,
            priority=priority,
            rollover=rollover,
            recurrence=RecurringPeriod(Interval(minutes=360), T0 + start * minute) if recurs else None,
        )
        for i, (amount, start, length, priority, rollover, recurs) in enumerate(grants)
    ]
    use = {T0 + m * minute: v for m, v in usage.items()}
    end = T0 + at * minute + timedelta(seconds=30)
    fast = run(ent, made, use, end)
    full = run(ent, made, use, end, replay_by=T0)
    assert (fast.balance, fast.usage, fast.overage, fast.total_available, fast.last_reset) == (
        full.balance,
        full.usage,
        full.overage,
        full.total_available,
        full.last_reset,
    )
    assert fast.grant_balances == full.grant_balances

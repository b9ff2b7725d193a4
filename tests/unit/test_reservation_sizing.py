"""The pure rules of reservations: how much a call counts on each meter, what output fits, and what holds
and commits still take from a balance (never both counted with the windows, never neither)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.model import HoldLine, Reservation, ReservationStatus
from control.sizing import CallBound, Rates, actual_amount, bound_amount, max_output_that_fits, outstanding

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
RATES = Rates(Decimal("0.0000025"), Decimal("0.00001"))


def test_bound_amounts_per_meter() -> None:
    call = CallBound(1000, 500, RATES)
    expected = {
        "requests": 1,
        "input_tokens": 1000,
        "output_tokens": 500,
        "total_tokens": 1500,
        "cache_read_tokens": 1000,
        "reasoning_tokens": 500,
        "unpriced_requests": 0,
    }
    for column, amount in expected.items():
        assert bound_amount(column, call) == amount
    assert bound_amount("cost_usd", call) == Decimal("0.0075")
    unpriced = CallBound(1000, 500, None)
    assert bound_amount("cost_usd", unpriced) is None
    assert bound_amount("unpriced_requests", unpriced) == 1


def test_the_bound_covers_the_actual_usage_of_any_call_within_it() -> None:
    usage = {"input_tokens": 900, "output_tokens": 450, "cache_read_tokens": 300, "output_reasoning_tokens": 100}
    call = CallBound(1000, 500, RATES)
    for column in (
        "requests",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cache_read_tokens",
        "reasoning_tokens",
    ):
        actual = actual_amount(column, usage, None)
        bound = bound_amount(column, call)
        assert actual is not None
        assert bound is not None
        assert actual <= bound


@given(
    available=st.integers(0, 10_000),
    input_tokens=st.integers(0, 5_000),
    output_tokens=st.integers(1, 5_000),
)
def test_the_largest_output_that_fits_fits_and_one_more_does_not(
    available: int, input_tokens: int, output_tokens: int
) -> None:
    call = CallBound(input_tokens, output_tokens, RATES)
    lines = [("total_tokens", Decimal(available)), ("cost_usd", Decimal(available) / 100_000)]
    fit = max_output_that_fits(call, lines)
    if fit is None:
        assert any(bound_amount(c, call, 0) > a for c, a in lines)  # type: ignore[operator]
        return
    assert fit <= output_tokens
    for column, room in lines:
        amount = bound_amount(column, call, fit)
        assert amount is not None
        assert amount <= room
    if fit < output_tokens:
        assert any(bound_amount(c, call, fit + 1) > a for c, a in lines)  # type: ignore[operator]


def _reservation(
    status: ReservationStatus,
    amount: int,
    *,
    expires_in_s: float = 60,
    committed_at: datetime | None = None,
    position: tuple[str, int, int] | None = None,
    actual: int | None = None,
) -> Reservation:
    line = HoldLine("ent", "tokens", Decimal(amount), False, Decimal(actual) if actual is not None else None)
    return Reservation(
        id=f"r{amount}",
        subject_key="s",
        status=status,
        provider=None,
        model=None,
        request_digest="d",
        estimate=None,
        lines=(line, HoldLine("other", "x", Decimal(999), False)),
        created_at=NOW - timedelta(seconds=1),
        expires_at=NOW + timedelta(seconds=expires_in_s),
        committed_at=committed_at,
        event_position=position,
    )


@pytest.mark.parametrize(
    ("applied", "pending"),
    [
        ({}, 30),  # nothing applied: the commit is pending
        ({("t", 0): 41}, 30),  # applied up to just before its event
        ({("t", 0): 42}, 0),  # its event applied: the windows count it, the reservation does not
        ({("t", 1): 100}, 30),  # another partition
    ],
)
def test_a_commit_counts_until_its_event_is_applied(applied: dict[tuple[str, int], int], pending: int) -> None:
    commit = _reservation(ReservationStatus.COMMITTED, 50, committed_at=NOW, position=("t", 0, 42), actual=30)
    out = outstanding("ent", [commit], applied, NOW - timedelta(days=1), NOW)
    assert (out.held, out.pending) == (0, pending)


def test_holds_count_until_they_expire_and_unsent_commits_count_their_actual() -> None:
    live = _reservation(ReservationStatus.HELD, 10, expires_in_s=5)
    expired = _reservation(ReservationStatus.HELD, 20, expires_in_s=-1)
    unsent = _reservation(ReservationStatus.COMMITTED, 40, committed_at=NOW, actual=35)
    unpriced = _reservation(ReservationStatus.COMMITTED, 8, committed_at=NOW)  # actual unknown: the hold's amount
    released = _reservation(ReservationStatus.RELEASED, 1000)
    out = outstanding("ent", [live, expired, unsent, unpriced, released], {}, NOW - timedelta(days=1), NOW)
    assert (out.held, out.pending) == (10, 43)
    assert out.next_expiry == NOW + timedelta(seconds=5)


def test_a_commit_before_the_period_counts_in_its_own_period_only() -> None:
    old = _reservation(ReservationStatus.COMMITTED, 50, committed_at=NOW - timedelta(hours=2), actual=50)
    out = outstanding("ent", [old], {}, NOW - timedelta(hours=1), NOW)
    assert out.pending == 0

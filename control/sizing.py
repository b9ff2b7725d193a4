"""How much a call counts toward each feature, and what reservations still hold (pure logic, no I/O).

A call is sized in the windows' own terms: the built-in meters sum per-call counts (``requests`` 1, input
tokens, output tokens, ...), so an upper bound of a call's usage on a meter follows from upper bounds of
its input and output tokens and, for cost, from the highest rates that could apply to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from control.model import Reservation, ReservationStatus

ZERO = Decimal(0)
#: Cost bounds are kept to this many decimal places (rounded up: a bound never rounds below the truth).
COST_PLACES = Decimal("1e-12")


@dataclass(frozen=True, slots=True)
class Rates:
    """The highest price per token a call's input and output could be charged, and per call."""

    input_per_token: Decimal
    output_per_token: Decimal
    per_request: Decimal = ZERO


@dataclass(frozen=True, slots=True)
class CallBound:
    """Upper bounds of one call: its tokens, and its cost when the model has a known price."""

    input_tokens: int
    output_tokens: int
    rates: Rates | None

    def cost(self, output_tokens: int | None = None) -> Decimal | None:
        if self.rates is None:
            return None
        out = self.output_tokens if output_tokens is None else output_tokens
        raw = (
            self.rates.per_request + self.input_tokens * self.rates.input_per_token + out * self.rates.output_per_token
        )
        return raw.quantize(COST_PLACES, rounding=ROUND_CEILING)


def bound_amount(column: str, bound: CallBound, output_tokens: int | None = None) -> Decimal | None:
    """The most one call within ``bound`` adds to a meter summing ``column``; None when it cannot be told
    (a cost without a known price)."""
    i = bound.input_tokens
    o = bound.output_tokens if output_tokens is None else output_tokens
    if column == "cost_usd":
        return bound.cost(o)
    if column == "unpriced_requests":
        return Decimal(1 if bound.rates is None else 0)
    amounts = {
        "requests": 1,
        "input_tokens": i,
        "cache_read_tokens": i,  # a part of the input
        "cache_write_tokens": i,
        "output_tokens": o,
        "reasoning_tokens": o,  # a part of the output
        "total_tokens": i + o,
    }
    return Decimal(amounts[column])


def actual_amount(column: str, usage: Mapping[str, int], cost: Decimal | None) -> Decimal | None:
    """What one call with these canonical counts adds to a meter summing ``column`` (as the processor sums
    it into the windows); None for a cost that could not be priced."""
    if column == "cost_usd":
        return cost
    if column == "unpriced_requests":
        return Decimal(1 if cost is None else 0)
    i, o = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
    amounts = {
        "requests": 1,
        "input_tokens": i,
        "cache_read_tokens": usage.get("cache_read_tokens", 0),
        "cache_write_tokens": usage.get("cache_write_tokens", 0),
        "output_tokens": o,
        "reasoning_tokens": usage.get("output_reasoning_tokens", 0),
        "total_tokens": i + o,
    }
    return Decimal(amounts[column])


def max_output_that_fits(
    bound: CallBound, lines: Iterable[tuple[str, Decimal]], limit: int | None = None
) -> int | None:
    """The largest output-token budget with which a call of ``bound``'s input fits every ``(column,
    available)`` line; None when none does (the input alone does not fit). Every meter is linear in the
    output tokens, so each line gives one ceiling."""
    best = limit if limit is not None else bound.output_tokens
    for column, available in lines:
        base = bound_amount(column, bound, 0)
        if base is None:
            return None
        if base > available:
            return None
        slope = bound_amount(column, bound, 1)
        assert slope is not None
        per_token = slope - base
        if per_token > 0:
            room = ((available - base) / per_token).to_integral_value(rounding=ROUND_FLOOR)
            best = min(best, int(room))
    return max(best, 0)


@dataclass(frozen=True, slots=True)
class Outstanding:
    """What reservations take from one entitlement beyond the windows' usage."""

    #: Live holds.
    held: Decimal
    #: Commits in the current period whose usage is not in the windows yet.
    pending: Decimal
    #: The earliest expiry of a live hold (when some room comes back by itself).
    next_expiry: datetime | None


def visible(r: Reservation, applied: Mapping[tuple[str, int], int]) -> bool:
    """Whether a committed reservation's usage is in the windows: the sink applied its event's offset."""
    if r.event_position is None:
        return False
    topic, partition, offset = r.event_position
    return applied.get((topic, partition), -1) >= offset


def outstanding(
    entitlement_id: str,
    reservations: Sequence[Reservation],
    applied: Mapping[tuple[str, int], int],
    period_start: datetime,
    now: datetime,
) -> Outstanding:
    """Holds and not-yet-visible commits on ``entitlement_id``.

    A hold counts until it expires, in whatever period (its usage, if it comes, is recorded at commit time,
    in the current period). A commit counts until the sink has applied its event (then the windows count
    it) and only in the period its event time (the commit time) falls in: never both, never neither —
    provided ``applied`` and the windows' usage are one snapshot (no write to the subject's windows between
    the two reads).
    """
    held = pending = ZERO
    expiry: datetime | None = None
    for r in reservations:
        line = next((ln for ln in r.lines if ln.entitlement_id == entitlement_id), None)
        if line is None:
            continue
        state = r.state_at(now)
        if state is ReservationStatus.HELD:
            held += line.amount
            expiry = r.expires_at if expiry is None else min(expiry, r.expires_at)
        elif state is ReservationStatus.COMMITTED and not visible(r, applied):
            assert r.committed_at is not None
            if r.committed_at >= period_start:
                pending += line.actual if line.actual is not None else line.amount
    return Outstanding(held, pending, expiry)

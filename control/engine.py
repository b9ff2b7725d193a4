"""The balance of a metered entitlement: grants burnt down by usage, period by period (pure logic, no I/O).

The engine never keeps a running counter. Given the entitlement, its grants and manual resets, and a time,
it lays out a timeline of *boundaries* (the start, every reset, every grant's start, end and recurrence,
and any extra boundary asked for), then needs one number per segment between two boundaries: the usage
that the query API reports for that subject, meter, filters and range. It then replays the timeline:

- at a boundary, in this order: grants that end (expire or are voided) drop out with what they had left;
  at a reset every remaining grant's balance rolls over as ``min(maxRollover, max(balance, minRollover))``
  and the overage is forgiven unless it is preserved (preserveOverageAtReset, or the reset's own flag);
  grants that start get their amount; grants that recur get their amount back; then an overage carried
  over is paid from the balances (burn order);
- within a segment its usage burns the grants in burn order (lower priority number, then earlier expiry,
  then earlier creation); what no grant covers is overage.

All boundaries are whole minutes except the end (the time asked about), so segment usage sums minute
windows exactly and the last segment ends where the query API's ``to`` would. Replay starts at the latest
reset whose outcome does not depend on the past (no overage carried, every grant's rollover clamps to a
fixed amount), so a typical evaluation covers one period.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Final

from control.model import Entitlement, Grant, UsageReset
from control.periods import RecurringPeriod, truncate_minute

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Reset:
    """A reset of usage: at a period boundary (automatic) or asked for (manual)."""

    at: datetime
    preserve_overage: bool
    manual: bool


def resets_between(
    period: RecurringPeriod,
    manual: Sequence[UsageReset],
    start: datetime,
    end: datetime,
    preserve_overage_at_reset: bool,
) -> tuple[list[Reset], RecurringPeriod]:
    """Every reset in ``(start, end]`` and the period in force at ``end``. A manual reset that does not
    retain the anchor re-anchors the period at itself; one at a period boundary is that boundary's reset.
    (Linear in the number of boundaries: each stretch between manual resets is one walk of its period.)"""
    resets: list[Reset] = []
    t = start
    for m in sorted((r for r in manual if start < r.at <= end), key=lambda r: r.at):
        resets.extend(Reset(b, preserve_overage_at_reset, manual=False) for b in period.boundaries(t, m.at) if b < m.at)
        resets.append(Reset(m.at, m.preserve_overage, manual=True))
        if not m.retain_anchor:
            period = RecurringPeriod(period.interval, m.at, period.time_zone)
        t = m.at
    resets.extend(Reset(b, preserve_overage_at_reset, manual=False) for b in period.boundaries(t, end))
    return resets, period


def period_in_force(period: RecurringPeriod, manual: Sequence[UsageReset], at: datetime) -> RecurringPeriod:
    """The period at ``at``: re-anchored at the latest manual reset up to ``at`` that did not retain the
    anchor (without walking any boundary)."""
    moved = [r.at for r in manual if r.at <= at and not r.retain_anchor]
    return RecurringPeriod(period.interval, max(moved), period.time_zone) if moved else period


def burn_order(grant: Grant) -> tuple[int, datetime, datetime, str]:
    """Lower priority number first, then the earlier expiry, then the earlier creation (as OpenMeter)."""
    return grant.priority, grant.expires_at, grant.created_at, grant.id


@dataclass(slots=True)
class Segment:
    """One stretch of the timeline with constant grants: what it used, and the balances around it."""

    start: datetime
    end: datetime
    usage: Decimal
    overage: Decimal
    balances_at_start: dict[str, Decimal]
    balances_at_end: dict[str, Decimal]
    grant_usage: dict[str, Decimal]


@dataclass(slots=True)
class Balance:
    """The state at the end of the timeline."""

    #: Sum of what the active grants have left.
    balance: Decimal
    #: Usage since the last reset (or since usage started counting).
    usage: Decimal
    #: Usage no grant covered yet (carried forward: a grant that becomes available pays it first).
    overage: Decimal
    #: Grant amounts available in this period: what is left plus what the period's usage took from grants.
    total_available: Decimal
    last_reset: datetime
    grant_balances: dict[str, Decimal]
    segments: list[Segment] = field(default_factory=list)
    #: Total balance and usage since the last reset, at each boundary asked for (after its events).
    balance_at: dict[datetime, Decimal] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Timeline:
    """Boundaries ``b0 < b1 < ... < bn``: the usage of each ``[b_i, b_i+1)`` is needed to replay it."""

    boundaries: tuple[datetime, ...]
    resets: tuple[Reset, ...]
    grants: tuple[Grant, ...]
    #: When usage starts counting (the entitlement's measureUsageFrom, or the reset replay starts at).
    usage_start: datetime
    end: datetime
    #: Balances at the first boundary (grants active before it that a memoryless reset set).
    seeded: bool

    def segments(self) -> list[tuple[datetime, datetime]]:
        return list(zip(self.boundaries, self.boundaries[1:], strict=False))


def _memoryless(reset: Reset, grants: Iterable[Grant]) -> bool:
    """The state right after this reset does not depend on anything before it."""
    if reset.preserve_overage:
        return False
    for g in grants:
        active_across = g.effective_at < reset.at < g.ends_at()
        if active_across and g.min_rollover_amount != g.max_rollover_amount and not _recurs_at(g, reset.at):
            return False
    return True


#: How many period boundaries back from the end the replay looks for one to start at.
_LOOK_BACK: Final = 1000


def _replay_start(
    entitlement: Entitlement,
    live: Sequence[Grant],
    manual: Sequence[UsageReset],
    *,
    start: datetime,
    end: datetime,
    replay_by: datetime | None,
) -> tuple[datetime, bool]:
    """The latest reset (not after ``replay_by``) whose outcome does not depend on the past, and True; or
    the start of measurement and False. Walks back from the end, boundary by boundary, at most
    ``_LOOK_BACK`` of them (then the replay is a full one: exact, only slower)."""
    assert entitlement.usage_period is not None
    limit = end if replay_by is None else min(end, replay_by)
    candidates: list[Reset] = [Reset(r.at, r.preserve_overage, manual=True) for r in manual if r.at <= limit]
    later_manual = sorted(r.at for r in manual)
    period = period_in_force(entitlement.usage_period, manual, limit)
    floor = max([start, *(t for t in later_manual if t <= limit)])
    k = period.index(limit)
    for _ in range(_LOOK_BACK):
        b = period.boundary(k)
        if b <= floor:
            break
        candidates.append(Reset(b, entitlement.preserve_overage_at_reset, manual=False))
        k -= 1
    for reset in sorted(candidates, key=lambda r: r.at, reverse=True):
        if _memoryless(reset, live):
            return reset.at, True
    return start, False


def _recurs_at(grant: Grant, t: datetime) -> bool:
    return grant.recurrence is not None and t > grant.effective_at and grant.recurrence.containing(t)[0] == t


def timeline(
    entitlement: Entitlement,
    grants: Sequence[Grant],
    manual_resets: Sequence[UsageReset],
    at: datetime,
    *,
    extra: Iterable[datetime] = (),
    replay_by: datetime | None = None,
) -> Timeline:
    """The boundaries needed to evaluate ``entitlement`` at ``at``, with ``extra`` boundaries (whole
    minutes) too; the replay starts no later than ``replay_by`` when given (history needs the state there)."""
    assert entitlement.usage_period is not None
    assert entitlement.measure_usage_from is not None
    start = entitlement.measure_usage_from
    end = max(at, start)
    manual = [r for r in manual_resets if start < r.at <= end]
    live = [g for g in grants if g.effective_at <= end and g.ends_at() > start]
    replay_start, seeded = _replay_start(entitlement, live, manual, start=start, end=end, replay_by=replay_by)
    # Only the resets from where the replay starts are laid out (a long history of short periods is not
    # walked again for every value).
    resets, _ = resets_between(
        period_in_force(entitlement.usage_period, manual, replay_start),
        [r for r in manual if r.at > replay_start],
        replay_start,
        end,
        entitlement.preserve_overage_at_reset,
    )
    if seeded:
        preserve = next((r.preserve_overage for r in manual if r.at == replay_start), False)
        resets.insert(0, Reset(replay_start, preserve, manual=any(r.at == replay_start for r in manual)))
    points = {replay_start, end}
    points.update(r.at for r in resets if r.at > replay_start)
    for g in live:
        for t in (g.effective_at, g.ends_at()):
            if replay_start < t < end:
                points.add(t)
        if g.recurrence is not None:
            points.update(g.recurrence.boundaries(max(g.effective_at, replay_start), min(g.ends_at(), end)))
    points.update(truncate_minute(t) for t in extra if replay_start < t < end)
    boundaries = tuple(sorted(p for p in points if replay_start <= p <= end))
    return Timeline(
        boundaries=boundaries,
        resets=tuple(r for r in resets if r.at >= replay_start),
        grants=tuple(sorted(live, key=burn_order)),
        usage_start=replay_start,
        end=end,
        seeded=seeded,
    )


def _burn(balances: dict[str, Decimal], order: Sequence[Grant], amount: Decimal, used: dict[str, Decimal]) -> Decimal:
    """Take ``amount`` from the balances in burn order; returns what was not covered."""
    for g in order:
        if amount <= 0:
            break
        have = balances.get(g.id)
        if have is None or have <= 0:
            continue
        take = min(have, amount)
        balances[g.id] = have - take
        used[g.id] = used.get(g.id, ZERO) + take
        amount -= take
    return amount


def replay(line: Timeline, usages: Sequence[Decimal], record_segments: bool = False) -> Balance:
    """Replay ``line`` given the usage of each of its segments."""
    segments = line.segments()
    if len(usages) != len(segments):
        raise ValueError(f"{len(segments)} segment usages needed, {len(usages)} given")
    resets = {r.at: r for r in line.resets}
    balances: dict[str, Decimal] = {}
    overage = ZERO
    period_usage = ZERO
    #: Burnt from grants since the last reset (usage, and an overage carried over and paid).
    period_taken = ZERO
    last_reset = line.usage_start
    out_segments: list[Segment] = []
    balance_at: dict[datetime, Decimal] = {}
    points = line.boundaries
    for i, t in enumerate(points):
        # 1. Grants that end here drop out with what they had left.
        for g in line.grants:
            if g.id in balances and g.ends_at() <= t:
                del balances[g.id]
        # 2. A reset: rollover, and the overage is forgiven unless preserved.
        reset = resets.get(t)
        if reset is not None:
            for g in line.grants:
                if g.effective_at < t < g.ends_at():
                    balances[g.id] = min(g.max_rollover_amount, max(g.min_rollover_amount, balances.get(g.id, ZERO)))
            if not reset.preserve_overage:
                overage = ZERO
            period_usage = period_taken = ZERO
            last_reset = t
        # 3. Grants that start here, and grants that recur here, get their amount.
        for g in line.grants:
            if g.ends_at() <= t:
                continue
            starts = g.effective_at == t or (i == 0 and not line.seeded and g.effective_at < t)
            if starts or _recurs_at(g, t):
                balances[g.id] = g.amount
        # 4. An overage carried forward is paid first from whatever is available now.
        if overage > 0:
            paid: dict[str, Decimal] = {}
            left = _burn(balances, line.grants, overage, paid)
            period_taken += overage - left
            overage = left
        balance_at[t] = sum(balances.values(), ZERO)
        if i == len(points) - 1:
            break
        usage = usages[i]
        before = dict(balances)
        used: dict[str, Decimal] = {}
        uncovered = _burn(balances, line.grants, usage, used)
        overage += uncovered
        period_usage += usage
        period_taken += usage - uncovered
        if record_segments:
            out_segments.append(Segment(t, points[i + 1], usage, overage, before, dict(balances), used))
    balance = sum(balances.values(), ZERO)
    return Balance(
        balance=balance,
        usage=period_usage,
        overage=overage,
        total_available=balance + period_taken,
        last_reset=last_reset,
        grant_balances=balances,
        segments=out_segments,
        balance_at=balance_at,
    )


def has_access(entitlement: Entitlement, balance: Balance | None) -> bool:
    """Metered: unlimited, a soft limit, or something left to use."""
    if entitlement.is_unlimited or entitlement.is_soft_limit:
        return True
    return balance is not None and balance.balance > 0

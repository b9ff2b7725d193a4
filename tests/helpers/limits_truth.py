"""Ground truth for the control plane's limits, computed from what a test sent and the grants and resets it
made, independently of Meterstream's code (nothing here imports ``control``): written from the rules in
``control/README.md`` with ``zoneinfo``, ``calendar`` and Decimal.

It replays an entitlement from the time usage starts counting, event by event (every usage event on its
own, not per stored window), so it shares no shortcut with the server's engine:

- periods: boundary *k* is the anchor's local wall-clock time plus *k* intervals on the local calendar of
  the period's zone (a day a month lacks is its last day), counted from the anchor;
- at each time, in order: grants that end (expire or are voided) drop out; at a reset (a period boundary,
  or a manual reset) every active grant's balance becomes ``min(maxRollover, max(minRollover, balance))``,
  the overage is forgiven unless preserved, and usage restarts; grants that start or recur get their
  amount; a carried overage is paid from what is available;
- usage burns the grants in burn order (lower priority number, then earlier expiry, then earlier
  creation); what no grant covers is overage.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from tests.helpers.truth import Sent

ZERO = Decimal(0)
_MONTHS = {"MONTH": 1, "YEAR": 12}
_DAYS = {"DAY": 1, "WEEK": 7}
_APPROX_DAYS = {"DAY": 1, "WEEK": 7, "MONTH": 30, "YEAR": 365}


def minute(t: datetime) -> datetime:
    """``t`` in UTC, down to its minute (every stored control-plane time is whole minutes)."""
    return t.astimezone(UTC).replace(second=0, microsecond=0)


def local_midnight(year: int, month: int, day: int, zone: str) -> datetime:
    """00:00 of that date in ``zone``, in UTC."""
    return datetime(year, month, day, tzinfo=ZoneInfo(zone)).astimezone(UTC)


def shift(t: datetime, zone: str, *, months: int = 0, days: int = 0) -> datetime:
    """``t`` moved by months, then days, on the wall clock of ``zone`` (months clamp to the month's last
    day); the local result is read back with that moment's offset."""
    tz = ZoneInfo(zone)
    local = t.astimezone(tz).replace(tzinfo=None)
    index = local.year * 12 + (local.month - 1) + months
    year, month = index // 12, index % 12 + 1
    local = local.replace(year=year, month=month, day=min(local.day, calendar.monthrange(year, month)[1]))
    local += timedelta(days=days)
    return local.replace(tzinfo=tz).astimezone(UTC)


@dataclass(frozen=True)
class Period:
    """A recurring period: DAY, WEEK, MONTH or YEAR, from ``anchor`` (minute-truncated), in ``zone``."""

    interval: str
    anchor: datetime
    zone: str = "UTC"

    def boundary(self, k: int) -> datetime:
        return shift(
            minute(self.anchor),
            self.zone,
            months=_MONTHS.get(self.interval, 0) * k,
            days=_DAYS.get(self.interval, 0) * k,
        )

    def containing(self, t: datetime) -> tuple[datetime, datetime]:
        """The period ``[start, end)`` holding ``t``."""
        k = int((t - minute(self.anchor)) / timedelta(days=_APPROX_DAYS[self.interval]))
        while self.boundary(k) > t:
            k -= 1
        while self.boundary(k + 1) <= t:
            k += 1
        return self.boundary(k), self.boundary(k + 1)

    def next_after(self, t: datetime) -> datetime:
        """The first boundary strictly after ``t``."""
        return self.containing(t)[1]


def expires(start: datetime, duration: str, count: int) -> datetime:
    """A grant's expiry: ``count`` × ``duration`` after its start (in UTC; months clamp like periods)."""
    if duration == "HOUR":
        return start + timedelta(hours=count)
    return shift(start, "UTC", months=_MONTHS.get(duration, 0) * count, days=_DAYS.get(duration, 0) * count)


@dataclass
class Grant:
    amount: Decimal
    effective_at: datetime
    expiration: tuple[str, int]
    priority: int = 1
    min_rollover: Decimal = ZERO
    max_rollover: Decimal = ZERO
    recurrence: Period | None = None
    voided_at: datetime | None = None
    #: The server's id, once made (for the test's own bookkeeping).
    id: str = ""

    @property
    def start(self) -> datetime:
        return minute(self.effective_at)

    @property
    def expires_at(self) -> datetime:
        return expires(self.start, *self.expiration)

    @property
    def end(self) -> datetime:
        return self.expires_at if self.voided_at is None else min(self.expires_at, minute(self.voided_at))


@dataclass(frozen=True)
class Reset:
    at: datetime
    retain_anchor: bool = False
    #: None: the entitlement's preserveOverageAtReset.
    preserve_overage: bool | None = None


@dataclass
class Metered:
    """A metered entitlement as the test made it, with the grants (in creation order) and resets it added."""

    subject: str
    meter: str
    period: Period
    measure_from: datetime
    filters: Mapping[str, str] = field(default_factory=dict)
    issue_after_reset: Decimal | None = None
    issue_priority: int = 1
    soft_limit: bool = False
    unlimited: bool = False
    preserve_overage: bool = False
    grants: list[Grant] = field(default_factory=list)
    resets: list[Reset] = field(default_factory=list)

    @property
    def start(self) -> datetime:
        return minute(self.measure_from)

    def all_grants(self) -> list[Grant]:
        """issueAfterReset's grant (made with the entitlement, so first) and the test's."""
        out = []
        if self.issue_after_reset:
            amount = self.issue_after_reset
            out.append(Grant(amount, self.start, ("YEAR", 100), self.issue_priority, amount, amount))
        return out + list(self.grants)

    def counts(self, e: Sent) -> bool:
        dims = {"provider": e.provider, "model": e.model}
        return e.subject == self.subject and all(dims[k] == v for k, v in self.filters.items())

    def usage_between(self, events: Iterable[Sent], lo: datetime, hi: datetime) -> Decimal:
        """Raw metered usage in ``[lo, hi)`` (what the query API must total)."""
        return sum((e.value(self.meter) for e in events if self.counts(e) and lo <= e.time < hi), ZERO)

    def reset_times(self, at: datetime) -> tuple[list[tuple[datetime, bool]], Period]:
        """Every reset in ``(start, at]`` with whether it preserves the overage, and the period in force."""
        period = self.period
        manual = sorted(self.resets, key=lambda r: r.at)
        out: list[tuple[datetime, bool]] = []
        t = self.start
        while True:
            auto = period.next_after(t)
            nxt = next((r for r in manual if minute(r.at) > t), None)
            if nxt is not None and minute(nxt.at) <= auto and minute(nxt.at) <= at:
                r_at = minute(nxt.at)
                keep = self.preserve_overage if nxt.preserve_overage is None else nxt.preserve_overage
                out.append((r_at, keep))
                if not nxt.retain_anchor:
                    period = Period(period.interval, r_at, period.zone)
                t = r_at
            elif auto <= at:
                out.append((auto, self.preserve_overage))
                t = auto
            else:
                return out, period


@dataclass(frozen=True)
class State:
    balance: Decimal
    usage: Decimal
    overage: Decimal
    total_available: Decimal
    has_access: bool
    #: The current usage period: from the last reset (or the start of measuring) to the next boundary.
    period_start: datetime
    period_end: datetime


def value(ent: Metered, events: Sequence[Sent], at: datetime) -> State:
    """The entitlement's value at ``at`` (usage up to that exact instant, events at ``at`` excluded)."""
    if at < ent.start:
        period_end = ent.period.next_after(ent.start)
        return State(ZERO, ZERO, ZERO, ZERO, ent.soft_limit or ent.unlimited, ent.start, period_end)
    grants = ent.all_grants()
    order = sorted(range(len(grants)), key=lambda i: (grants[i].priority, grants[i].expires_at, i))
    resets, period = ent.reset_times(at)
    reset_at = dict(resets)

    points = {ent.start, at, *reset_at}
    for g in grants:
        points.update(t for t in (g.start, g.end) if ent.start <= t <= at)
        if g.recurrence is not None:
            t = g.recurrence.next_after(g.start)
            while t <= min(at, g.end):
                points.add(t)
                t = g.recurrence.next_after(t)
    usage_events = sorted((e for e in events if ent.counts(e) and ent.start <= e.time < at), key=lambda e: e.time)

    balances: dict[int, Decimal] = {}
    overage = usage = taken = ZERO
    last_reset = ent.start

    def burn(amount: Decimal) -> Decimal:
        for i in order:
            if amount <= 0:
                break
            have = balances.get(i, ZERO)
            if have > 0:
                take = min(have, amount)
                balances[i] = have - take
                amount -= take
        return amount

    next_event = 0
    for t in sorted(points):
        while next_event < len(usage_events) and usage_events[next_event].time < t:
            v = usage_events[next_event].value(ent.meter)
            uncovered = burn(v)
            overage += uncovered
            usage += v
            taken += v - uncovered
            next_event += 1
        for i in list(balances):
            if grants[i].end <= t:
                del balances[i]
        if t in reset_at:
            for i, g in enumerate(grants):
                if g.start < t < g.end:
                    balances[i] = min(g.max_rollover, max(g.min_rollover, balances.get(i, ZERO)))
            if not reset_at[t]:
                overage = ZERO
            usage = taken = ZERO
            last_reset = t
        for i, g in enumerate(grants):
            if g.end <= t:
                continue
            recurs = g.recurrence is not None and t > g.start and g.recurrence.containing(t)[0] == t
            if g.start == t or recurs:
                balances[i] = g.amount
        if overage > 0:
            left = burn(overage)
            taken += overage - left
            overage = left
    balance = sum(balances.values(), ZERO)
    return State(
        balance=balance,
        usage=usage,
        overage=overage,
        total_available=balance + taken,
        has_access=ent.soft_limit or ent.unlimited or balance > 0,
        period_start=last_reset,
        period_end=period.next_after(max(last_reset, at)),
    )


def unpriced(ent: Metered, events: Sequence[Sent], at: datetime) -> Decimal:
    """Calls in the current period whose price is unknown (a cost feature's ``unpricedRequests``)."""
    start = value(ent, events, at).period_start
    return Decimal(sum(1 for e in events if ent.counts(e) and e.cost is None and start <= e.time < at))


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime
    usage: Decimal
    balance_at_start: Decimal


def day_windows(frm: datetime, to: datetime, zone: str) -> list[tuple[datetime, datetime]]:
    """Local days of ``zone`` covering ``[frm, to)``, clipped to it."""
    tz = ZoneInfo(zone)
    day = frm.astimezone(tz).date()
    out = []
    lo = frm
    while lo < to:
        day += timedelta(days=1)
        hi = min(local_midnight(day.year, day.month, day.day, zone), to)
        out.append((lo, hi))
        lo = hi
    return out


def history(ent: Metered, events: Sequence[Sent], frm: datetime, to: datetime, zone: str) -> list[Window]:
    """``windowedHistory`` with DAY windows in ``zone``: each window's usage and the balance at its start."""
    return [
        Window(lo, hi, ent.usage_between(events, lo, hi), value(ent, events, lo).balance)
        for lo, hi in day_windows(frm, to, zone)
    ]


def last_transition(zone: str, before: datetime, *, forward: bool, within_days: int = 400) -> datetime:
    """The latest DST change of ``zone`` before ``before`` that moves clocks forward (or back), to the
    minute, in UTC."""
    tz = ZoneInfo(zone)
    hi = minute(before)
    for _ in range(within_days * 24):
        lo = hi - timedelta(hours=1)
        off_lo, off_hi = lo.astimezone(tz).utcoffset(), hi.astimezone(tz).utcoffset()
        assert off_lo is not None and off_hi is not None
        if off_lo != off_hi and (off_hi > off_lo) == forward:
            while hi - lo > timedelta(minutes=1):
                mid = lo + (hi - lo) / 2
                mid = mid.replace(second=0, microsecond=0)
                if mid.astimezone(tz).utcoffset() == off_lo:
                    lo = mid
                else:
                    hi = mid
            return hi
        hi = lo
    raise AssertionError(f"no DST change in {zone} within {within_days} days before {before}")

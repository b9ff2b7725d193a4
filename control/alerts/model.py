"""Notification channels, rules, events and deliveries (OpenMeter's v1 notification API), and the pure
rules of when a threshold is crossed.

Times are timezone-aware UTC; amounts are Decimal.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final

ZERO: Final = Decimal(0)
HUNDRED: Final = Decimal(100)

BALANCE_THRESHOLD: Final = "entitlements.balance.threshold"
RESET: Final = "entitlements.reset"
#: Meterstream's addition: a threshold that was crossed is no longer (a grant raised the limit). A type of
#: its own, so a receiver written for OpenMeter ignores it rather than reading it as another crossing.
RESOLVED: Final = "entitlements.balance.threshold.resolved"
RULE_TYPES: Final = (BALANCE_THRESHOLD, RESET)

#: OpenMeter's threshold types; ``NUMBER`` and ``PERCENT`` are its legacy names of the usage kinds.
USAGE_VALUE: Final = "usage_value"
USAGE_PERCENTAGE: Final = "usage_percentage"
BALANCE_VALUE: Final = "balance_value"
_CANONICAL: Final = {
    "usage_value": USAGE_VALUE,
    "NUMBER": USAGE_VALUE,
    "usage_percentage": USAGE_PERCENTAGE,
    "PERCENT": USAGE_PERCENTAGE,
    "balance_value": BALANCE_VALUE,
}
THRESHOLD_TYPES: Final = tuple(_CANONICAL)


class DeliveryState(StrEnum):
    PENDING = "PENDING"
    SENDING = "SENDING"
    RESENDING = "RESENDING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"


#: States a delivery is still being worked on in.
OPEN_STATES: Final = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.RESENDING)


@dataclass(frozen=True, slots=True)
class Channel:
    id: str
    name: str
    url: str
    custom_headers: Mapping[str, str]
    signing_secret: str
    disabled: bool
    metadata: Mapping[str, str] | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Threshold:
    #: As the rule was given (legacy names included: they are echoed back exactly).
    type: str
    value: Decimal

    @property
    def kind(self) -> str:
        return _CANONICAL[self.type]

    @property
    def key(self) -> str:
        """What identifies the threshold in a crossing: ``NUMBER`` 80 and ``usage_value`` 80 are the same."""
        return f"{self.kind}:{_plain(self.value)}"


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    type: str
    name: str
    disabled: bool
    thresholds: tuple[Threshold, ...]
    #: Feature ids the rule is limited to (empty: every feature).
    feature_ids: tuple[str, ...]
    channel_ids: tuple[str, ...]
    metadata: Mapping[str, str] | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None

    def applies_to(self, feature_id: str) -> bool:
        return (
            not self.disabled and self.deleted_at is None and (not self.feature_ids or feature_id in self.feature_ids)
        )


@dataclass(frozen=True, slots=True)
class Attempt:
    at: datetime
    state: DeliveryState
    status_code: int | None
    body: str
    duration_ms: int
    url: str | None


@dataclass(frozen=True, slots=True)
class Delivery:
    event_id: str
    channel_id: str
    state: DeliveryState
    reason: str
    next_attempt_at: datetime | None
    give_up_at: datetime
    attempts: int
    updated_at: datetime
    history: tuple[Attempt, ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    rule_id: str
    subject_key: str | None
    feature_id: str | None
    #: The JSON body (the webhook's and the API's ``payload``), a snapshot taken when the event was made.
    payload: str
    annotations: Mapping[str, Any] | None
    created_at: datetime
    deliveries: tuple[Delivery, ...] = ()


@dataclass(frozen=True, slots=True)
class Crossing:
    """The state of one (rule, subject, feature, period, threshold): crossed, or crossed once and resolved."""

    rule_id: str
    subject_key: str
    feature_id: str
    period_start: datetime
    threshold: str
    crossed: bool
    usage_at_cross: Decimal
    event_id: str


@dataclass(frozen=True, slots=True)
class Level:
    """What thresholds are judged on: usage in the period (stored windows and committed reservations; live
    holds are not usage), the grants available in it, and the balance left (before holds)."""

    usage: Decimal
    total: Decimal
    balance: Decimal


def is_crossed(t: Threshold, level: Level) -> bool:
    """Whether ``level`` has reached ``t``. Reaching counts (usage exactly at 100% has crossed 100%; OpenMeter
    compares strictly); percentages and balances need grants, an absolute usage value does not."""
    if t.kind == USAGE_VALUE:
        return level.usage >= t.value
    if t.kind == USAGE_PERCENTAGE:
        return level.total > 0 and level.usage * HUNDRED >= level.total * t.value
    return level.total > 0 and level.balance <= t.value


def threshold_amount(t: Threshold, level: Level) -> Decimal | None:
    """The threshold in the meter's units (usage for the usage kinds, balance for ``balance_value``)."""
    if t.kind in (USAGE_VALUE, BALANCE_VALUE):
        return t.value
    return level.total * t.value / HUNDRED if level.total > 0 else None


def crossing_order(t: Threshold, level: Level) -> Decimal:
    """The usage at which ``t`` is reached, so thresholds crossed together are reported in the order a
    steadily growing usage would have crossed them."""
    if t.kind == USAGE_VALUE:
        return t.value
    if t.kind == USAGE_PERCENTAGE:
        return level.total * t.value / HUNDRED
    return level.usage + level.balance - t.value


@dataclass(frozen=True, slots=True)
class Transition:
    threshold: Threshold
    #: True: crossed now (fire); False: no longer crossed (report it resolved).
    crossed: bool
    previous: Crossing | None


def transitions(thresholds: Sequence[Threshold], level: Level, known: Mapping[str, Crossing]) -> list[Transition]:
    """What changed for one rule's thresholds (``known``: their crossings in the current period, by key).

    A threshold fires once while it stays crossed; it is resolved only when it is no longer crossed *and*
    usage has not gone down since it fired (the limit moved: a grant), so a read older than the one that
    fired can never resolve it. Crossed again after that, it fires again."""
    out: list[Transition] = []
    seen: set[str] = set()
    for t in sorted(thresholds, key=lambda t: crossing_order(t, level)):
        if t.key in seen:
            continue
        seen.add(t.key)
        before = known.get(t.key)
        now = is_crossed(t, level)
        if now and (before is None or not before.crossed):
            out.append(Transition(t, True, before))
        elif not now and before is not None and before.crossed and level.usage >= before.usage_at_cross:
            out.append(Transition(t, False, before))
    return out


def backoff(attempt: int, initial_s: float, max_s: float, rng: random.Random | None = None) -> timedelta:
    """The wait after failed attempt number ``attempt`` (1, 2, ...): exponential, capped, jittered ×0.5-1.5
    so that receivers coming back are not hit by every sender at once."""
    base = min(max_s, initial_s * 2 ** min(attempt - 1, 60))
    return timedelta(seconds=min(max_s, base * (rng or random).uniform(0.5, 1.5)))


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")

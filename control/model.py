"""The control plane's records: features, subjects, entitlements, grants, usage resets and plans.

Times are timezone-aware UTC; amounts are Decimal. Records are immutable values: a change is a new record
(an override ends one entitlement and starts another; voiding ends a grant), never an edit of history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from control.periods import RecurringPeriod


class EntitlementType(StrEnum):
    METERED = "metered"
    BOOLEAN = "boolean"
    STATIC = "static"


@dataclass(frozen=True, slots=True)
class Feature:
    id: str
    key: str
    name: str
    #: The built-in meter whose usage this feature counts (None: a feature without usage, for boolean and
    #: static entitlements).
    meter_slug: str | None
    #: Only usage with these group-by values counts (``{"model": "gpt-4o"}``).
    filters: Mapping[str, str]
    metadata: Mapping[str, str] | None
    created_at: datetime
    updated_at: datetime
    archived_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Subject:
    id: str
    key: str
    display_name: str | None
    metadata: Mapping[str, Any] | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    stripe_customer_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Entitlement:
    id: str
    subject_key: str
    feature_id: str
    feature_key: str
    type: EntitlementType
    #: Metered: when usage resets. Boolean and static: optional, informational.
    usage_period: RecurringPeriod | None
    #: Metered: usage before this time does not count (minute-aligned).
    measure_usage_from: datetime | None
    is_soft_limit: bool
    is_unlimited: bool
    issue_after_reset: Decimal | None
    issue_after_reset_priority: int
    preserve_overage_at_reset: bool
    #: Static: the JSON configuration, as given.
    config: str | None
    metadata: Mapping[str, str] | None
    #: Set when the entitlement was made by assigning a plan (it is then the plan's to change).
    plan_key: str | None
    #: The plan's template this entitlement was made from (canonical JSON), to tell whether it changed.
    plan_template: str | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    id: str
    entitlement_id: str
    amount: Decimal
    #: Lower numbers burn first.
    priority: int
    effective_at: datetime
    expiration_duration: str
    expiration_count: int
    expires_at: datetime
    max_rollover_amount: Decimal
    min_rollover_amount: Decimal
    #: The balance goes back to ``amount`` at each boundary of this period after ``effective_at``.
    recurrence: RecurringPeriod | None
    metadata: Mapping[str, str] | None
    annotations: Mapping[str, Any] | None
    created_at: datetime
    updated_at: datetime
    voided_at: datetime | None = None

    def ends_at(self) -> datetime:
        """When the grant stops counting: expiry, or voiding if that came first."""
        return min(self.expires_at, self.voided_at) if self.voided_at is not None else self.expires_at


@dataclass(frozen=True, slots=True)
class UsageReset:
    entitlement_id: str
    at: datetime
    retain_anchor: bool
    preserve_overage: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    key: str
    name: str
    description: str | None
    #: Bumped at each change; a subject's entitlements follow the version it was last assigned.
    version: int
    #: Entitlement templates: entitlement create inputs (OpenMeter's shapes) with a ``featureKey`` each.
    entitlements: tuple[Mapping[str, Any], ...]
    metadata: Mapping[str, str] | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SubjectPlan:
    subject_key: str
    plan_key: str
    plan_version: int
    assigned_at: datetime
    #: Applied because the subject had no plan (the configured default), not assigned explicitly.
    is_default: bool = False


class ReservationStatus(StrEnum):
    HELD = "held"
    COMMITTED = "committed"
    RELEASED = "released"
    #: A hold whose time ran out before a commit or a release (a commit may still come and record usage).
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class HoldLine:
    """What one reservation holds on one entitlement."""

    entitlement_id: str
    feature_key: str
    amount: Decimal
    is_soft_limit: bool
    #: Set at commit: the amount the call actually used on this entitlement (None if it cannot be priced).
    actual: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    subject_key: str
    status: ReservationStatus
    provider: str | None
    model: str | None
    #: Digest of the reserve request, to tell a retry (same digest) from another use of the same id.
    request_digest: str
    #: The bound the hold was sized by: ``{"inputTokens", "outputTokens", "costUsd"}`` (None: amounts given).
    estimate: Mapping[str, Any] | None
    lines: tuple[HoldLine, ...]
    created_at: datetime
    expires_at: datetime
    committed_at: datetime | None = None
    released_at: datetime | None = None
    #: The usage event a commit recorded (its id is the reservation's id) and a digest of the usage given.
    event: Mapping[str, Any] | None = None
    usage_digest: str | None = None
    #: Where the broker acknowledged the event: it is in the windows once the sink applied that offset.
    event_position: tuple[str, int, int] | None = None

    def state_at(self, now: datetime) -> ReservationStatus:
        if self.status is ReservationStatus.HELD and self.expires_at <= now:
            return ReservationStatus.EXPIRED
        return self.status

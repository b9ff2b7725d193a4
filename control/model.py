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

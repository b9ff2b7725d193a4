"""Request bodies of the control-plane API, in OpenMeter's v1 shapes, validated by pydantic.

Numbers are parsed as exact decimals (never through a float). Unknown fields are refused, so a typo is a
400 naming the field rather than a setting silently ignored; ``timeZone`` inside a usage period is
Meterstream's addition (periods are calendar-correct in that IANA zone; UTC when absent).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from control.periods import Interval
from schemas.problems import FieldError, Problem

KEY_PATTERN = r"^[a-z0-9]+(?:_[a-z0-9]+)*$"
Key = Annotated[str, Field(pattern=KEY_PATTERN, max_length=64)]
Priority = Annotated[int, Field(ge=1, le=255)]
Amount = Annotated[Decimal, Field(ge=0, allow_inf_nan=False, max_digits=60, decimal_places=18)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False)


def utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class PeriodIn(_In):
    """``RecurringPeriodCreateInput``: an interval and an optional anchor (default: chosen by the caller)."""

    interval: str
    anchor: AwareDatetime | None = None
    timeZone: str = "UTC"

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: str) -> str:
        Interval.parse(value)  # ValueError -> a 400 naming usagePeriod.interval
        return value

    @field_validator("timeZone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone: {value}") from None
        return value


class FeatureIn(_In):
    key: Key
    name: Annotated[str, Field(min_length=1, max_length=256)]
    metadata: dict[str, str] | None = None
    meterSlug: Key | None = None
    meterGroupByFilters: dict[str, str] | None = None
    advancedMeterGroupByFilters: dict[str, Any] | None = None
    unitCost: dict[str, Any] | None = None


class _EntitlementIn(_In):
    featureKey: Key | None = None
    featureId: str | None = None
    metadata: dict[str, str] | None = None


class MeteredIn(_EntitlementIn):
    type: Literal["metered"]
    isSoftLimit: bool = False
    isUnlimited: bool = False
    usagePeriod: PeriodIn
    measureUsageFrom: Literal["CURRENT_PERIOD_START", "NOW"] | AwareDatetime | None = None
    issueAfterReset: Amount | None = None
    issueAfterResetPriority: Priority = 1
    preserveOverageAtReset: bool = False


class StaticIn(_EntitlementIn):
    type: Literal["static"]
    config: str
    usagePeriod: PeriodIn | None = None

    @field_validator("config")
    @classmethod
    def _json(cls, value: str) -> str:
        try:
            json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON document in a string, e.g. '{\"seats\": 5}'") from None
        return value


class BooleanIn(_EntitlementIn):
    type: Literal["boolean"]
    usagePeriod: PeriodIn | None = None


EntitlementIn = Annotated[MeteredIn | StaticIn | BooleanIn, Field(discriminator="type")]


class ExpirationIn(_In):
    duration: Literal["HOUR", "DAY", "WEEK", "MONTH", "YEAR"]
    count: Annotated[int, Field(ge=1, le=1000)]


class GrantIn(_In):
    amount: Amount
    priority: Priority = 1
    effectiveAt: AwareDatetime
    expiration: ExpirationIn
    maxRolloverAmount: Amount = Decimal(0)
    minRolloverAmount: Amount = Decimal(0)
    metadata: dict[str, str] | None = None
    recurrence: PeriodIn | None = None


class ResetIn(_In):
    effectiveAt: AwareDatetime | None = None
    retainAnchor: bool = False
    preserveOverage: bool | None = None


class SubjectIn(_In):
    key: Annotated[str, Field(min_length=1, max_length=256)]
    displayName: str | None = None
    metadata: dict[str, Any] | None = None
    currentPeriodStart: AwareDatetime | None = None
    currentPeriodEnd: AwareDatetime | None = None
    stripeCustomerId: str | None = None


class PlanIn(_In):
    """A plan: entitlement templates (entitlement create inputs, each naming its feature by key)."""

    key: Key
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    metadata: dict[str, str] | None = None
    entitlements: Annotated[list[EntitlementIn], Field(max_length=100)]


class PlanAssignmentIn(_In):
    planKey: Key


_M = TypeVar("_M", bound=BaseModel)
_ENTITLEMENT: TypeAdapter[MeteredIn | StaticIn | BooleanIn] = TypeAdapter(EntitlementIn)
_SUBJECTS: TypeAdapter[list[SubjectIn]] = TypeAdapter(Annotated[list[SubjectIn], Field(max_length=1000)])


def decode(body: bytes) -> Any:
    """JSON with exact decimal numbers."""
    if not body:
        raise Problem(400, "a JSON body is required")
    try:
        return json.loads(body, parse_float=Decimal)
    except ValueError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}") from None


def _problem(exc: ValidationError, prefix: str = "") -> Problem:
    errors = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p in ("metered", "static", "boolean"))]
        # Union members show up as "function-after[...]" / class names in locations: keep field names only.
        loc = [p for p in loc if not p.startswith(("function-", "literal[", "datetime", "str", "lax-"))]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = [*loc, "type"]
        field = ".".join([prefix, *loc] if prefix else loc) or "body"
        message = str(err["msg"]).removeprefix("Value error, ")
        errors.append(FieldError(field, message))
    summary = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
    return Problem(400, f"invalid request: {summary}", errors)


def parse(model: type[_M], raw: Any) -> _M:
    """``raw`` (decoded JSON) as ``model``, or a 400 naming each bad field."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _problem(exc) from None


def parse_entitlement(raw: Any) -> MeteredIn | StaticIn | BooleanIn:
    try:
        return _ENTITLEMENT.validate_python(raw)
    except ValidationError as exc:
        raise _problem(exc) from None


def parse_subjects(raw: Any) -> list[SubjectIn]:
    try:
        return _SUBJECTS.validate_python(raw)
    except ValidationError as exc:
        raise _problem(exc) from None


class KeyIn(_In):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    scopes: Annotated[list[Literal["admin", "read", "ingest"]], Field(min_length=1, max_length=3)]


class PortalTokenIn(_In):
    """OpenMeter's ``PortalToken`` as a request (its read-only fields are ignored if a client sends them)."""

    model_config = ConfigDict(extra="ignore")

    subject: Annotated[str, Field(min_length=1, max_length=256)]
    allowedMeterSlugs: Annotated[list[str], Field(max_length=100)] | None = None
    expiresAt: AwareDatetime | None = None


class InvalidateIn(_In):
    id: str | None = None
    subject: str | None = None

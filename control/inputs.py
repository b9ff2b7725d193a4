"""Request bodies of the control-plane API, in OpenMeter's v1 shapes, validated by pydantic.

Numbers are parsed as exact decimals (never through a float). Unknown fields are refused, so a typo is a
400 naming the field rather than a setting silently ignored; ``timeZone`` inside a usage period is
Meterstream's addition (periods are calendar-correct in that IANA zone; UTC when absent).
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from control.periods import Interval
from schemas.problems import FieldError, Problem
from schemas.times import is_time_zone

KEY_PATTERN = r"^[a-z0-9]+(?:_[a-z0-9]+)*$"
Key = Annotated[str, Field(pattern=KEY_PATTERN, max_length=64)]
Priority = Annotated[int, Field(ge=1, le=255)]
Amount = Annotated[Decimal, Field(ge=0, allow_inf_nan=False, max_digits=60, decimal_places=18)]
#: Every time the rules compute with lies in the range of stored usage (1970 to 2106): beyond it period and
#: expiry arithmetic would leave the calendar Python can represent.
EARLIEST: Final = datetime(1970, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(2106, 1, 1, tzinfo=UTC)
#: The longest recurring period, in months (100 years).
MAX_PERIOD_MONTHS: Final = 1200
#: How deeply a request body may nest.
MAX_DEPTH: Final = 64


def in_range(value: datetime) -> datetime:
    """``value`` if it lies in ``[EARLIEST, LATEST)``, else ValueError."""
    if not EARLIEST <= value < LATEST:
        raise ValueError("must be from 1970-01-01T00:00:00Z to 2106-01-01T00:00:00Z (exclusive)")
    return value


Time = Annotated[AwareDatetime, AfterValidator(in_range)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False)


def utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class PeriodIn(_In):
    """``RecurringPeriodCreateInput``: an interval and an optional anchor (default: chosen by the caller)."""

    interval: str
    anchor: Time | None = None
    timeZone: str = "UTC"

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: str) -> str:
        interval = Interval.parse(value)  # ValueError -> a 400 naming usagePeriod.interval
        if interval.months + (interval.days + interval.minutes / 1440) / 31 > MAX_PERIOD_MONTHS:
            raise ValueError(f"{value!r}: a period is at most 100 years")
        return value

    @field_validator("timeZone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if not is_time_zone(value):
            raise ValueError(f"unknown IANA time zone: {value[:100]}")
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
    measureUsageFrom: Literal["CURRENT_PERIOD_START", "NOW"] | Time | None = None
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
    amount: Annotated[Decimal, Field(gt=0, allow_inf_nan=False, max_digits=60, decimal_places=18)]
    priority: Priority = 1
    effectiveAt: Time
    expiration: ExpirationIn
    maxRolloverAmount: Amount = Decimal(0)
    minRolloverAmount: Amount = Decimal(0)
    metadata: dict[str, str] | None = None
    recurrence: PeriodIn | None = None


class ResetIn(_In):
    effectiveAt: Time | None = None
    retainAnchor: bool = False
    preserveOverage: bool | None = None


class SubjectIn(_In):
    key: Annotated[str, Field(min_length=1, max_length=256)]
    displayName: str | None = None
    metadata: dict[str, Any] | None = None
    currentPeriodStart: Time | None = None
    currentPeriodEnd: Time | None = None
    stripeCustomerId: str | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _plain_json(value)


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


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unstorable(value: Any) -> str | None:
    """Why a decoded body cannot be stored (PostgreSQL text takes neither NUL nor unpaired surrogates), or
    None. Iterative, so a deeply nested body is refused rather than overflowing the stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "a string contains a NUL character (\\u0000)"
            try:
                item.encode()
            except UnicodeEncodeError:
                return "a string contains an unpaired surrogate"
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                return f"nested more than {MAX_DEPTH} levels deep"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def _plain_json(value: Any) -> Any:
    """``value`` with its exact decimals as JSON numbers (floats), for free-form JSON that is stored."""
    if isinstance(value, Decimal):
        number = float(value)
        if number in (float("inf"), float("-inf")):
            raise ValueError(f"the number {value} is out of range")
        return number
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


def decode(body: bytes) -> Any:
    """JSON with exact decimal numbers."""
    if not body:
        raise Problem(400, "a JSON body is required")
    try:
        value = json.loads(body, parse_float=Decimal, parse_constant=_not_a_number)
    except (ValueError, RecursionError) as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}") from None
    reason = _unstorable(value)
    if reason is not None:
        raise Problem(400, f"the body cannot be stored: {reason}")
    return value


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


PositiveAmount = Annotated[Decimal, Field(gt=0, allow_inf_nan=False, max_digits=60, decimal_places=18)]
ReservationId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]


class ReserveIn(_In):
    """A reservation before a call: an estimate of its usage (upper bounds), the request itself (the server
    bounds it), or amounts per feature; exactly one of them."""

    id: ReservationId | None = None
    provider: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    estimate: dict[str, Annotated[int, Field(ge=0, le=10**12)]] | None = None
    request: dict[str, Any] | None = None
    amounts: (
        dict[str, Annotated[Decimal, Field(gt=0, allow_inf_nan=False, max_digits=60, decimal_places=18)]] | None
    ) = None
    ttlSeconds: Annotated[int, Field(ge=1)] | None = None
    #: Input the request's bound cannot see (files, audio, server-side state), added to it.
    extraInputTokens: Annotated[int, Field(ge=0, le=10**9)] = 0

    @field_validator("estimate")
    @classmethod
    def _estimate(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is not None:
            unknown = sorted(set(value) - {"input_tokens", "output_tokens"})
            if unknown:
                raise ValueError(f"an estimate gives input_tokens and output_tokens (upper bounds), not {unknown}")
        return value


class CommitIn(_In):
    """What the call used: canonical counts or the provider's usage object, as ingest's ``data`` takes them."""

    usage: dict[str, Any]


class EstimateIn(_In):
    provider: Annotated[str, Field(min_length=1, max_length=128)]
    model: Annotated[str, Field(min_length=1, max_length=256)]
    request: dict[str, Any]
    extraInputTokens: Annotated[int, Field(ge=0, le=10**9)] = 0


# -- notifications (OpenMeter's v1 shapes) -----------------------------------------------------------------

Name = Annotated[str, Field(min_length=1, max_length=256)]
#: OpenMeter's pattern; the part after ``whsec_`` must also decode as base64 (checked below).
SECRET_PATTERN: Final = r"^(whsec_)?[a-zA-Z0-9+/=]{32,100}$"


class ChannelIn(_In):
    """``NotificationChannelWebhookCreateRequest`` (the read-only fields a client may echo are ignored)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["WEBHOOK"]
    name: Name
    url: Annotated[str, Field(min_length=1, max_length=2048)]
    customHeaders: Annotated[dict[str, Annotated[str, Field(max_length=4096)]], Field(max_length=50)] | None = None
    signingSecret: Annotated[str, Field(pattern=SECRET_PATTERN)] | None = None
    disabled: bool = False
    metadata: dict[str, str] | None = None

    @field_validator("signingSecret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                base64.b64decode(value.removeprefix("whsec_"), validate=True)
            except ValueError:
                raise ValueError("must be base64 (optionally after whsec_)") from None
        return value

    @field_validator("customHeaders")
    @classmethod
    def _headers(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name, text in (value or {}).items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}", name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if not text.isascii() or any(not c.isprintable() for c in text):
                raise ValueError(f"the value of {name} must be printable ASCII (no line breaks or control characters)")
        return value


class ThresholdIn(_In):
    type: Literal["usage_value", "usage_percentage", "balance_value", "NUMBER", "PERCENT"]
    value: Annotated[Decimal, Field(ge=0, allow_inf_nan=False, max_digits=60, decimal_places=18)]

    @model_validator(mode="after")
    def _positive(self) -> ThresholdIn:
        if self.type != "balance_value" and self.value <= 0:
            raise ValueError(f"a {self.type} threshold must be greater than 0")
        return self


ChannelIds = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(min_length=1, max_length=5)]
FeatureRefs = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(min_length=1, max_length=100)]


class _RuleIn(_In):
    model_config = ConfigDict(extra="ignore")

    name: Name
    channels: ChannelIds
    features: FeatureRefs | None = None
    disabled: bool = False
    metadata: dict[str, str] | None = None


class ThresholdRuleIn(_RuleIn):
    type: Literal["entitlements.balance.threshold"]
    thresholds: Annotated[list[ThresholdIn], Field(min_length=1, max_length=10)]


class ResetRuleIn(_RuleIn):
    type: Literal["entitlements.reset"]


_RULE: TypeAdapter[ThresholdRuleIn | ResetRuleIn] = TypeAdapter(
    Annotated[ThresholdRuleIn | ResetRuleIn, Field(discriminator="type")]
)
_UNSUPPORTED_RULES: Final = ("invoice.created", "invoice.updated")


def parse_rule(raw: Any) -> ThresholdRuleIn | ResetRuleIn:
    if isinstance(raw, dict) and raw.get("type") in _UNSUPPORTED_RULES:
        raise Problem(400, f"rule type {raw['type']} is not supported", [FieldError("type", "not supported")])
    try:
        return _RULE.validate_python(raw)
    except ValidationError as exc:
        raise _problem(exc) from None


class ResendIn(_In):
    channels: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=100)] | None = None

"""The control plane's records as OpenMeter's v1 API shows them (JSON-able dicts).

Amounts are written as the exact decimals they are (an ``orjson.Fragment``), never rounded through a float.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from control.access import ApiKey, PortalToken
from control.holds import LineView
from control.model import Entitlement, EntitlementType, Feature, Grant, Plan, Reservation, Subject, SubjectPlan
from control.periods import RecurringPeriod
from control.service import EntitlementView, History, Value
from schemas.estimate import TokenBound
from schemas.money import format_usd


def iso(value: datetime, time_zone: str = "UTC") -> str:
    """RFC 3339 (``Z`` in UTC), microseconds only when present."""
    if time_zone == "UTC":
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return value.astimezone(ZoneInfo(time_zone)).isoformat()


def number(value: Decimal) -> orjson.Fragment:
    return orjson.Fragment(format_usd(value))


def _set(body: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        body[key] = value


def feature(f: Feature) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f.id,
        "key": f.key,
        "name": f.name,
        "createdAt": iso(f.created_at),
        "updatedAt": iso(f.updated_at),
    }
    _set(body, "meterSlug", f.meter_slug)
    if f.meter_slug is not None:
        body["meterGroupByFilters"] = dict(f.filters)
    _set(body, "metadata", dict(f.metadata) if f.metadata is not None else None)
    _set(body, "archivedAt", iso(f.archived_at) if f.archived_at else None)
    return body


def _free_json(value: Any) -> Any:
    """Free-form JSON (a subject's metadata) as orjson can write it: integers beyond 64 bits (PostgreSQL gives
    large numbers back as integers) written out as they are."""
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return orjson.Fragment(str(value))
    if isinstance(value, dict):
        return {k: _free_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_free_json(v) for v in value]
    return value


def subject(s: Subject) -> dict[str, Any]:
    body: dict[str, Any] = {"id": s.id, "key": s.key, "createdAt": iso(s.created_at), "updatedAt": iso(s.updated_at)}
    _set(body, "displayName", s.display_name)
    _set(body, "metadata", _free_json(dict(s.metadata)) if s.metadata is not None else None)
    _set(body, "currentPeriodStart", iso(s.current_period_start) if s.current_period_start else None)
    _set(body, "currentPeriodEnd", iso(s.current_period_end) if s.current_period_end else None)
    _set(body, "stripeCustomerId", s.stripe_customer_id)
    return body


def period(p: RecurringPeriod) -> dict[str, Any]:
    body = {"interval": p.interval.name, "intervalISO": p.interval.iso, "anchor": iso(p.anchor)}
    if p.time_zone != "UTC":
        body["timeZone"] = p.time_zone
    return body


def entitlement(view: EntitlementView) -> dict[str, Any]:
    e: Entitlement = view.entitlement
    body: dict[str, Any] = {
        "id": e.id,
        "type": e.type.value,
        "subjectKey": e.subject_key,
        "featureKey": e.feature_key,
        "featureId": e.feature_id,
        "createdAt": iso(e.created_at),
        "updatedAt": iso(e.updated_at),
        "activeFrom": iso(e.created_at),
    }
    _set(body, "deletedAt", iso(e.deleted_at) if e.deleted_at else None)
    _set(body, "activeTo", iso(e.deleted_at) if e.deleted_at else None)
    _set(body, "metadata", dict(e.metadata) if e.metadata is not None else None)
    if e.usage_period is not None:
        body["usagePeriod"] = period(e.usage_period)
    if view.current_period is not None:
        body["currentUsagePeriod"] = {"from": iso(view.current_period[0]), "to": iso(view.current_period[1])}
    if e.type is EntitlementType.METERED:
        assert e.measure_usage_from is not None
        assert view.last_reset is not None
        body |= {
            "isSoftLimit": e.is_soft_limit,
            "isUnlimited": e.is_unlimited,
            "preserveOverageAtReset": e.preserve_overage_at_reset,
            "measureUsageFrom": iso(e.measure_usage_from),
            "lastReset": iso(view.last_reset),
        }
        if e.issue_after_reset is not None:
            body["issueAfterReset"] = number(e.issue_after_reset)
            body["issueAfterResetPriority"] = e.issue_after_reset_priority
    if e.type is EntitlementType.STATIC:
        body["config"] = e.config
    if e.plan_key is not None:
        body["annotations"] = {"meterstream.plan": e.plan_key}
    return body


def grant(g: Grant, now: datetime) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": g.id,
        "entitlementId": g.entitlement_id,
        "amount": number(g.amount),
        "priority": g.priority,
        "effectiveAt": iso(g.effective_at),
        "expiration": {"duration": g.expiration_duration, "count": g.expiration_count},
        "expiresAt": iso(g.expires_at),
        "maxRolloverAmount": number(g.max_rollover_amount),
        "minRolloverAmount": number(g.min_rollover_amount),
        "createdAt": iso(g.created_at),
        "updatedAt": iso(g.updated_at),
    }
    _set(body, "metadata", dict(g.metadata) if g.metadata is not None else None)
    _set(body, "annotations", dict(g.annotations) if g.annotations is not None else None)
    _set(body, "voidedAt", iso(g.voided_at) if g.voided_at else None)
    if g.recurrence is not None:
        body["recurrence"] = period(g.recurrence)
        after = max(now, g.effective_at)
        body["nextRecurrence"] = iso(g.recurrence.containing(after)[1])
    return body


def value(v: Value) -> dict[str, Any]:
    body: dict[str, Any] = {"hasAccess": v.has_access}
    for key, amount in (
        ("balance", v.balance),
        ("usage", v.usage),
        ("overage", v.overage),
        ("totalAvailableGrantAmount", v.total_available),
        ("unpricedRequests", v.unpriced_requests),
        ("reserved", v.reserved),
    ):
        if amount is not None:
            body[key] = number(amount)
    _set(body, "config", v.config)
    return body


def _balances(balances: Mapping[str, Decimal]) -> dict[str, Any]:
    return {k: number(v) for k, v in balances.items()}


def history(h: History, time_zone: str) -> dict[str, Any]:
    return {
        "windowedHistory": [
            {
                "period": {"from": iso(w.start, time_zone), "to": iso(w.end, time_zone)},
                "usage": number(w.usage),
                "balanceAtStart": number(w.balance_at_start),
            }
            for w in h.windows
        ],
        "burndownHistory": [
            {
                "period": {"from": iso(s.start), "to": iso(s.end)},
                "usage": number(s.usage),
                "overage": number(s.overage),
                "balanceAtStart": number(sum(s.balances_at_start.values(), Decimal(0))),
                "grantBalancesAtStart": _balances(s.balances_at_start),
                "balanceAtEnd": number(sum(s.balances_at_end.values(), Decimal(0))),
                "grantBalancesAtEnd": _balances(s.balances_at_end),
                "grantUsages": [{"grantId": k, "usage": number(v)} for k, v in s.grant_usage.items()],
            }
            for s in h.segments
        ],
    }


def plan(p: Plan) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": p.id,
        "key": p.key,
        "name": p.name,
        "version": p.version,
        "entitlements": [_template(t) for t in p.entitlements],
        "createdAt": iso(p.created_at),
        "updatedAt": iso(p.updated_at),
    }
    _set(body, "description", p.description)
    _set(body, "metadata", dict(p.metadata) if p.metadata is not None else None)
    return body


def _template(t: Mapping[str, Any]) -> dict[str, Any]:
    """A stored template: its amounts back as exact numbers."""
    out = dict(t)
    if out.get("issueAfterReset") is not None:
        out["issueAfterReset"] = number(Decimal(str(out["issueAfterReset"])))
    return out


def subject_plan(sp: SubjectPlan, entitlements: list[EntitlementView] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subjectKey": sp.subject_key,
        "planKey": sp.plan_key,
        "planVersion": sp.plan_version,
        "isDefault": sp.is_default,
        "assignedAt": iso(sp.assigned_at),
    }
    if entitlements is not None:
        body["entitlements"] = [entitlement(v) for v in entitlements]
    return body


def paginated(items: list[dict[str, Any]], total: int, page: int, page_size: int) -> dict[str, Any]:
    return {"totalCount": total, "page": page, "pageSize": page_size, "items": items}


def api_key(k: ApiKey, token: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": k.id,
        "name": k.name,
        "scopes": sorted(s.value for s in k.scopes),
        "createdAt": iso(k.created_at),
    }
    _set(body, "revokedAt", iso(k.revoked_at) if k.revoked_at else None)
    _set(body, "key", token)
    return body


def portal_token(t: PortalToken, now: datetime, token: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": t.id,
        "subject": t.subject,
        "expiresAt": iso(t.expires_at),
        "expired": t.expires_at <= now or t.invalidated_at is not None,
        "createdAt": iso(t.created_at),
    }
    if t.allowed_meter_slugs is not None:
        body["allowedMeterSlugs"] = list(t.allowed_meter_slugs)
    _set(body, "token", token)
    return body


def reservation(r: Reservation, now: datetime, views: Sequence[LineView] | None = None) -> dict[str, Any]:
    """A reservation; with ``views`` (a reserve's answer), also what is left on each feature."""
    state = r.state_at(now)
    by_ent = {v.line.entitlement_id: v for v in views or ()}
    features = []
    for ln in r.lines:
        item: dict[str, Any] = {
            "featureKey": ln.feature_key,
            "entitlementId": ln.entitlement_id,
            "amount": number(ln.amount),
            "actual": number(ln.actual) if ln.actual is not None else None,
            "isSoftLimit": ln.is_soft_limit,
        }
        view = by_ent.get(ln.entitlement_id)
        if view is not None:
            item["balance"] = number(view.balance) if view.balance is not None else None
            item["overLimit"] = view.over_limit
        features.append(item)
    return {
        "id": r.id,
        "subject": r.subject_key,
        "status": state.value,
        "allowed": True,
        "provider": r.provider,
        "model": r.model,
        "createdAt": iso(r.created_at),
        "expiresAt": iso(r.expires_at),
        "committedAt": iso(r.committed_at) if r.committed_at else None,
        "releasedAt": iso(r.released_at) if r.released_at else None,
        "estimate": _estimate(r.estimate),
        "features": features,
    }


def denial(views: Sequence[LineView], fit: int | None) -> dict[str, Any]:
    """The extension members of a 429 answer to a reserve."""
    return {
        "allowed": False,
        "features": [
            {
                "featureKey": v.line.feature_key,
                "entitlementId": v.line.entitlement_id,
                "amount": number(v.line.amount),
                "balance": number(v.balance) if v.balance is not None else None,
                "isSoftLimit": v.line.is_soft_limit,
                "overLimit": v.over_limit,
                "fits": v.fits,
            }
            for v in views
        ],
        "fit": {"maxOutputTokens": fit} if fit is not None else None,
    }


def estimate(tokens: TokenBound, cost: Decimal | None) -> dict[str, Any]:
    return {
        "inputTokens": tokens.input_tokens,
        "outputTokens": tokens.output_tokens,
        "costUsd": number(cost) if cost is not None else None,
        "notes": list(tokens.notes),
    }


def _estimate(e: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The bound a reservation was sized by (its cost stored as an exact decimal string), cost as a number."""
    if e is None:
        return None
    body = dict(e)
    if body.get("costUsd") is not None:
        body["costUsd"] = number(Decimal(str(body["costUsd"])))
    return body

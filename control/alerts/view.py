"""Channels, rules, events and webhook payloads as OpenMeter's v1 notification API shows them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from control import render
from control.alerts.model import BALANCE_THRESHOLD, Channel, Delivery, Event, Rule, Threshold
from control.model import Feature, Subject
from control.service import EntitlementView, Value


def channel(c: Channel) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": c.id,
        "type": "WEBHOOK",
        "name": c.name,
        "url": c.url,
        "disabled": c.disabled,
        "signingSecret": c.signing_secret,
        "createdAt": render.iso(c.created_at),
        "updatedAt": render.iso(c.updated_at),
    }
    if c.custom_headers:
        body["customHeaders"] = dict(c.custom_headers)
    if c.metadata is not None:
        body["metadata"] = dict(c.metadata)
    if c.deleted_at is not None:
        body["deletedAt"] = render.iso(c.deleted_at)
    return body


def threshold(t: Threshold) -> dict[str, Any]:
    return {"value": render.number(t.value), "type": t.type}


def rule(r: Rule, feature_keys: Mapping[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": r.id,
        "type": r.type,
        "name": r.name,
        "disabled": r.disabled,
        "channels": [{"id": c, "type": "WEBHOOK"} for c in r.channel_ids],
        "createdAt": render.iso(r.created_at),
        "updatedAt": render.iso(r.updated_at),
    }
    if r.type == BALANCE_THRESHOLD:
        body["thresholds"] = [threshold(t) for t in r.thresholds]
    if r.feature_ids:  # minItems 1 in OpenMeter's schema: left out when the rule covers every feature
        body["features"] = [{"id": f, "key": feature_keys.get(f, "")} for f in r.feature_ids]
    if r.metadata is not None:
        body["metadata"] = dict(r.metadata)
    if r.deleted_at is not None:
        body["deletedAt"] = render.iso(r.deleted_at)
    return body


def delivery(d: Delivery) -> dict[str, Any]:
    body: dict[str, Any] = {
        "state": d.state.value,
        "reason": d.reason,
        "updatedAt": render.iso(d.updated_at),
        "channel": {"id": d.channel_id, "type": "WEBHOOK"},
        "attempts": [
            {
                "state": a.state.value,
                "timestamp": render.iso(a.at),
                "response": {
                    **({"statusCode": a.status_code} if a.status_code is not None else {}),
                    "body": a.body,
                    "durationMs": a.duration_ms,
                    **({"url": a.url} if a.url else {}),
                },
            }
            for a in d.history
        ],
        "nextAttempt": render.iso(d.next_attempt_at)
        if d.next_attempt_at is not None
        and d.state.value
        in (
            "PENDING",
            "SENDING",
            "RESENDING",
        )
        else None,
    }
    return body


def event(e: Event, r: Rule, feature_keys: Mapping[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": e.id,
        "type": e.type,
        "createdAt": render.iso(e.created_at),
        "rule": rule(r, feature_keys),
        "deliveryStatus": [delivery(d) for d in e.deliveries],
        "payload": orjson.Fragment(e.payload),
    }
    if e.annotations:
        body["annotations"] = dict(e.annotations)
    return body


def payload(  # noqa: PLR0917 (the parts of one snapshot)
    event_id: str,
    kind: str,
    at: datetime,
    ev: EntitlementView,
    f: Feature,
    s: Subject,
    v: Value,
    t: Threshold | None,
    extra: Mapping[str, Any],
) -> str:
    """The webhook body (also the event's ``payload``): a snapshot of the entitlement when it was made.
    The value's balance is the one thresholds are judged on (before holds; ``reserved`` beside it)."""
    value = render.value(replace(v, balance=v.settled_balance if v.settled_balance is not None else v.balance))
    data: dict[str, Any] = {
        "entitlement": render.entitlement(ev),
        "feature": render.feature(f),
        "subject": render.subject(s),
        "value": value,
    }
    if t is not None:
        data["threshold"] = threshold(t)
    data.update(extra)
    return orjson.dumps({"id": event_id, "type": kind, "timestamp": render.iso(at), "data": data}).decode()


def sample_payload(event_id: str, r: Rule, at: datetime) -> str:
    """A made-up payload of the rule's type (``POST /rules/{id}/test``), in the shape of a real one."""
    iso = render.iso(at)
    t = r.thresholds[0] if r.thresholds else None
    data: dict[str, Any] = {
        "entitlement": {
            "id": "01J00000000000000000000000",
            "type": "metered",
            "subjectKey": "test-subject",
            "featureKey": "test_feature",
            "featureId": "01J00000000000000000000001",
            "createdAt": iso,
            "updatedAt": iso,
            "activeFrom": iso,
            "isSoftLimit": False,
            "isUnlimited": False,
            "preserveOverageAtReset": False,
            "measureUsageFrom": iso,
            "lastReset": iso,
            "usagePeriod": {"interval": "MONTH", "intervalISO": "P1M", "anchor": iso},
            "currentUsagePeriod": {"from": iso, "to": iso},
        },
        "feature": {
            "id": "01J00000000000000000000001",
            "key": "test_feature",
            "name": "Test feature",
            "createdAt": iso,
            "updatedAt": iso,
        },
        "subject": {"id": "01J00000000000000000000002", "key": "test-subject", "createdAt": iso, "updatedAt": iso},
        "value": {
            "hasAccess": True,
            "balance": render.number(Decimal(20)),
            "usage": render.number(Decimal(80)),
            "overage": render.number(Decimal(0)),
            "totalAvailableGrantAmount": render.number(Decimal(100)),
        },
    }
    if t is not None:
        data["threshold"] = threshold(t)
    return orjson.dumps({"id": event_id, "type": r.type, "timestamp": iso, "data": data}).decode()

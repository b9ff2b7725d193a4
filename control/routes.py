"""HTTP routes of the control plane, OpenMeter v1 compatible: features, subjects, entitlements, grants,
values, history and resets; plus Meterstream's plans.

Status codes are OpenMeter's exactly (its official client accepts nothing else): 201 for creates and
overrides, 200 for the subject upsert, 204 for deletes, voids and resets. Errors are problem+json: 400
naming the field, 404, 409, and 503 with ``Retry-After`` while PostgreSQL is unreachable (ingest and usage
queries do not depend on it and keep working).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from control import render
from control.alerts import view as alert_view
from control.alerts.service import AlertService
from control.alerts.store import EventFilter
from control.holds import LimitReached, ReservationService
from control.inputs import (
    ChannelIn,
    CommitIn,
    EstimateIn,
    FeatureIn,
    GrantIn,
    InvalidateIn,
    KeyIn,
    PlanAssignmentIn,
    PlanIn,
    PortalTokenIn,
    ResendIn,
    ReserveIn,
    ResetIn,
    decode,
    in_range,
    parse,
    parse_entitlement,
    parse_rule,
    parse_subjects,
)
from control.keys import KeyService
from control.meters import MeterService
from control.service import ControlService
from control.store import Conflict, Listing, StoreUnavailable
from schemas.problems import PROBLEM_JSON, Problem, bad
from schemas.times import parse_time, parse_time_zone

log = logging.getLogger(__name__)

#: Seconds a client is told to wait while PostgreSQL is away.
RETRY_AFTER_S: Final = 5
MAX_BODY_BYTES: Final = 1024 * 1024
MAX_PAGE_SIZE: Final = 1000

Handler = Callable[[Request], Awaitable[Response]]


def problem(p: Problem) -> Response:
    return Response(orjson.dumps(p.to_dict()), status_code=p.status, media_type=PROBLEM_JSON, headers=p.headers)


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _guard(handler: Handler) -> Handler:
    """Errors as problem+json: the rules' own, conflicts, and an unreachable store (503, Retry-After)."""

    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        if any("\x00" in str(v) for v in request.path_params.values()):  # stored text never holds NUL
            return problem(Problem(404, "not found: the path contains a NUL character"))
        try:
            return await handler(request)
        except Problem as p:
            return problem(p)
        except Conflict as exc:
            return problem(Problem(409, str(exc)))
        except StoreUnavailable as exc:
            log.warning("control plane: %s", exc)
            return problem(Problem(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}))

    return guarded


async def _body(request: Request, optional: bool = False) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise Problem(413, "the body is larger than 1 MiB")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise Problem(413, "the body is larger than 1 MiB")
    if optional and not body.strip():
        return {}
    return decode(body)


def _time(request: Request, name: str) -> datetime | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    return parse_time(name, value, in_range)


def _bool(request: Request, name: str, default: bool = False) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return default
    if value.lower() not in ("true", "false", "1", "0"):
        raise bad(name, "must be true or false")
    return value.lower() in ("true", "1")


def _int(request: Request, name: str, low: int, high: int) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise bad(name, f"must be an integer from {low} to {high}")
    return int(value)


def _list(request: Request, name: str) -> list[str]:
    values = [v for v in request.query_params.getlist(name) if v]
    if any("\x00" in v for v in values):
        raise bad(name, "must not contain a NUL character")
    return values


def _choice(request: Request, name: str, choices: tuple[str, ...], default: str) -> str:
    value = request.query_params.get(name, default)
    if value not in choices:
        raise bad(name, f"must be one of {', '.join(choices)}")
    return value


class _Page:
    """OpenMeter's list paging: ``page``/``pageSize`` gives a paginated object, otherwise a plain array
    (``offset``/``limit`` optional)."""

    def __init__(self, request: Request, order_by: tuple[str, ...], default_order_by: str) -> None:
        self.page = _int(request, "page", 1, 1_000_000)
        self.page_size = _int(request, "pageSize", 1, MAX_PAGE_SIZE)
        self.paginated = self.page is not None or self.page_size is not None
        self.offset: int = 0
        self.limit: int | None = None
        if self.paginated:
            self.page, self.page_size = self.page or 1, self.page_size or 100
            self.offset, self.limit = (self.page - 1) * self.page_size, self.page_size
        else:
            self.offset = _int(request, "offset", 0, 1_000_000_000) or 0
            self.limit = _int(request, "limit", 1, MAX_PAGE_SIZE)
        self.desc = _choice(request, "order", ("ASC", "DESC"), "ASC") == "DESC"
        self.order_by = _choice(request, "orderBy", order_by, default_order_by)

    def listing(self) -> Listing:
        return Listing(self.order_by, self.desc, self.offset, self.limit)

    def answer(self, items: list[dict[str, Any]], total: int) -> Response:
        if self.paginated:
            assert self.page is not None
            assert self.page_size is not None
            return _json(render.paginated(items, total, self.page, self.page_size))
        return _json(items)


def control_routes(service: ControlService) -> list[Route]:
    """The control plane's routes, answering from ``service``."""

    # -- features --------------------------------------------------------------------------------------

    async def list_features(request: Request) -> Response:
        page = _Page(request, ("id", "key", "name", "createdAt", "updatedAt"), "createdAt")
        features, total = await service.list_features(
            meter_slugs=_list(request, "meterSlug"),
            include_archived=_bool(request, "includeArchived"),
            listing=page.listing(),
        )
        return page.answer([render.feature(f) for f in features], total)

    async def create_feature(request: Request) -> Response:
        inp = parse(FeatureIn, await _body(request))
        return _json(render.feature(await service.create_feature(inp)), 201)

    async def get_feature(request: Request) -> Response:
        return _json(render.feature(await service.get_feature(request.path_params["featureId"])))

    async def delete_feature(request: Request) -> Response:
        await service.delete_feature(request.path_params["featureId"])
        return Response(status_code=204)

    # -- subjects --------------------------------------------------------------------------------------

    async def list_subjects(request: Request) -> Response:
        return _json([render.subject(s) for s in await service.list_subjects()])

    async def upsert_subjects(request: Request) -> Response:
        inputs = parse_subjects(await _body(request))
        return _json([render.subject(s) for s in await service.upsert_subjects(inputs)])

    async def get_subject(request: Request) -> Response:
        return _json(render.subject(await service.get_subject(request.path_params["subject"])))

    async def delete_subject(request: Request) -> Response:
        await service.delete_subject(request.path_params["subject"])
        return Response(status_code=204)

    # -- entitlements ----------------------------------------------------------------------------------

    async def list_entitlements(request: Request) -> Response:
        page = _Page(request, ("createdAt", "updatedAt"), "createdAt")
        types = _list(request, "entitlementType")
        for t in types:
            if t not in ("metered", "boolean", "static"):
                raise bad("entitlementType", "must be metered, boolean or static")
        views, total = await service.list_entitlements(
            features=_list(request, "feature"), subjects=_list(request, "subject"), types=types, listing=page.listing()
        )
        return page.answer([render.entitlement(v) for v in views], total)

    async def get_entitlement_by_id(request: Request) -> Response:
        return _json(render.entitlement(await service.get_entitlement(None, request.path_params["entitlementId"])))

    async def create_entitlement(request: Request) -> Response:
        inp = parse_entitlement(await _body(request))
        view = await service.create_entitlement(request.path_params["subject"], inp)
        return _json(render.entitlement(view), 201)

    async def list_subject_entitlements(request: Request) -> Response:
        views = await service.subject_entitlements(request.path_params["subject"], _bool(request, "includeDeleted"))
        return _json([render.entitlement(v) for v in views])

    async def get_entitlement(request: Request) -> Response:
        p = request.path_params
        return _json(render.entitlement(await service.get_entitlement(p["subject"], p["entitlementId"])))

    async def delete_entitlement(request: Request) -> Response:
        p = request.path_params
        await service.delete_entitlement(p["subject"], p["entitlementId"])
        return Response(status_code=204)

    async def override_entitlement(request: Request) -> Response:
        p = request.path_params
        inp = parse_entitlement(await _body(request))
        view = await service.override_entitlement(p["subject"], p["ref"], inp)
        return _json(render.entitlement(view), 201)

    async def entitlement_value(request: Request) -> Response:
        p = request.path_params
        value = await service.value(p["subject"], p["ref"], _time(request, "time"))
        return _json(render.value(value))

    async def entitlement_history(request: Request) -> Response:
        p = request.path_params
        if "windowSize" not in request.query_params:
            raise bad("windowSize", "is required (MINUTE, HOUR, DAY or MONTH)")
        window_size = _choice(request, "windowSize", ("MINUTE", "HOUR", "DAY", "MONTH"), "DAY")
        zone = parse_time_zone("windowTimeZone", request.query_params.get("windowTimeZone") or "UTC")
        history = await service.history(
            p["subject"],
            p["entitlementId"],
            start=_time(request, "from"),
            end=_time(request, "to"),
            window_size=window_size,
            time_zone=zone,
        )
        return _json(render.history(history, zone))

    async def reset_entitlement(request: Request) -> Response:
        p = request.path_params
        inp = parse(ResetIn, await _body(request, optional=True))
        await service.reset(p["subject"], p["entitlementId"], inp)
        return Response(status_code=204)

    # -- grants ----------------------------------------------------------------------------------------

    async def list_grants(request: Request) -> Response:
        page = _Page(request, ("id", "createdAt", "updatedAt"), "createdAt")
        rows, total = await service.list_grants(
            features=_list(request, "feature"),
            subjects=_list(request, "subject"),
            include_voided=_bool(request, "includeDeleted"),
            listing=page.listing(),
        )
        now = datetime.now(UTC)
        return page.answer([render.grant(g, now) for g, _ in rows], total)

    async def create_grant(request: Request) -> Response:
        p = request.path_params
        inp = parse(GrantIn, await _body(request))
        grant = await service.create_grant(p["subject"], p["ref"], inp)
        return _json(render.grant(grant, datetime.now(UTC)), 201)

    async def entitlement_grants(request: Request) -> Response:
        p = request.path_params
        grants = await service.entitlement_grants(p["subject"], p["ref"], _bool(request, "includeDeleted"))
        now = datetime.now(UTC)
        return _json([render.grant(g, now) for g in grants])

    async def void_grant(request: Request) -> Response:
        await service.void_grant(request.path_params["grantId"], _time(request, "at"))
        return Response(status_code=204)

    # -- plans -----------------------------------------------------------------------------------------

    async def list_plans(request: Request) -> Response:
        return _json([render.plan(p) for p in await service.list_plans()])

    async def put_plan(request: Request) -> Response:
        key = request.path_params["planKey"]
        raw = await _body(request)
        if isinstance(raw, dict):
            raw.setdefault("key", key)
        plan, created = await service.put_plan(key, parse(PlanIn, raw))
        return _json(render.plan(plan), 201 if created else 200)

    async def get_plan(request: Request) -> Response:
        return _json(render.plan(await service.get_plan(request.path_params["planKey"])))

    async def delete_plan(request: Request) -> Response:
        await service.delete_plan(request.path_params["planKey"])
        return Response(status_code=204)

    async def assign_plan(request: Request) -> Response:
        inp = parse(PlanAssignmentIn, await _body(request))
        assignment, views = await service.assign_plan(request.path_params["subject"], inp.planKey)
        return _json(render.subject_plan(assignment, views))

    async def get_subject_plan(request: Request) -> Response:
        return _json(render.subject_plan(await service.subject_plan(request.path_params["subject"])))

    async def unassign_plan(request: Request) -> Response:
        await service.unassign_plan(request.path_params["subject"])
        return Response(status_code=204)

    s = "/api/v1/subjects/{subject}"
    table: list[tuple[str, str, Handler]] = [
        ("/api/v1/features", "GET", list_features),
        ("/api/v1/features", "POST", create_feature),
        ("/api/v1/features/{featureId}", "GET", get_feature),
        ("/api/v1/features/{featureId}", "DELETE", delete_feature),
        ("/api/v1/entitlements", "GET", list_entitlements),
        ("/api/v1/entitlements/{entitlementId}", "GET", get_entitlement_by_id),
        ("/api/v1/grants", "GET", list_grants),
        ("/api/v1/grants/{grantId}", "DELETE", void_grant),
        ("/api/v1/subjects", "GET", list_subjects),
        ("/api/v1/subjects", "POST", upsert_subjects),
        (s, "GET", get_subject),
        (s, "DELETE", delete_subject),
        (f"{s}/entitlements", "GET", list_subject_entitlements),
        (f"{s}/entitlements", "POST", create_entitlement),
        (f"{s}/entitlements/{{ref}}/grants", "GET", entitlement_grants),
        (f"{s}/entitlements/{{ref}}/grants", "POST", create_grant),
        (f"{s}/entitlements/{{ref}}/override", "PUT", override_entitlement),
        (f"{s}/entitlements/{{ref}}/value", "GET", entitlement_value),
        (f"{s}/entitlements/{{entitlementId}}", "GET", get_entitlement),
        (f"{s}/entitlements/{{entitlementId}}", "DELETE", delete_entitlement),
        (f"{s}/entitlements/{{entitlementId}}/history", "GET", entitlement_history),
        (f"{s}/entitlements/{{entitlementId}}/reset", "POST", reset_entitlement),
        (f"{s}/plan", "GET", get_subject_plan),
        (f"{s}/plan", "PUT", assign_plan),
        (f"{s}/plan", "DELETE", unassign_plan),
        ("/api/v1/plans", "GET", list_plans),
        ("/api/v1/plans/{planKey}", "GET", get_plan),
        ("/api/v1/plans/{planKey}", "PUT", put_plan),
        ("/api/v1/plans/{planKey}", "DELETE", delete_plan),
    ]
    # One Route per path with all its methods (a Route per method would answer 405 for the others).
    by_path: dict[str, dict[str, Handler]] = {}
    for path, method, handler in table:
        # (The subject's own routes look ids up themselves.)
        keyed = _by_subject_id(service.subject_key, handler) if path.startswith(f"{s}/") else handler
        by_path.setdefault(path, {})[method] = _guard(keyed)
    return [Route(path, _dispatch(methods), methods=list(methods)) for path, methods in by_path.items()]


def _by_subject_id(resolve: Callable[[str], Awaitable[str]], handler: Handler) -> Handler:
    """``handler`` with its ``{subject}`` path parameter, an id or a key (OpenMeter's ``subjectIdOrKey``),
    made the subject's key."""

    @functools.wraps(handler)
    async def by_key(request: Request) -> Response:
        params = request.scope["path_params"]
        params["subject"] = await resolve(params["subject"])
        return await handler(request)

    return by_key


def _dispatch(methods: dict[str, Handler]) -> Handler:
    async def dispatch(request: Request) -> Response:
        handler = methods.get(request.method) or methods["GET"]  # HEAD is answered as GET
        return await handler(request)

    return dispatch


def access_routes(keys: KeyService) -> list[Route]:
    """Managing API keys (Meterstream's) and portal tokens (OpenMeter's ``/api/v1/portal/tokens``)."""

    async def create_key(request: Request) -> Response:
        inp = parse(KeyIn, await _body(request))
        key, token = await keys.create_key(inp.name, inp.scopes)
        return _json(render.api_key(key, token), 201)

    async def list_keys(request: Request) -> Response:
        return _json([render.api_key(k) for k in await keys.keys()])

    async def revoke_key(request: Request) -> Response:
        await keys.revoke_key(request.path_params["keyId"])
        return Response(status_code=204)

    async def create_portal_token(request: Request) -> Response:
        inp = parse(PortalTokenIn, await _body(request))
        token, secret = await keys.create_portal_token(inp.subject, inp.allowedMeterSlugs, inp.expiresAt)
        return _json(render.portal_token(token, datetime.now(UTC), secret))  # 200, as OpenMeter's client expects

    async def list_portal_tokens(request: Request) -> Response:
        limit = _int(request, "limit", 1, 1000) or 25
        now = datetime.now(UTC)
        return _json([render.portal_token(t, now) for t in await keys.portal_tokens(limit)])

    async def invalidate_portal_tokens(request: Request) -> Response:
        raw = await request.body()
        inp = parse(InvalidateIn, decode(raw) if raw.strip() else {})
        await keys.invalidate_portal_tokens(inp.id, inp.subject)
        return Response(status_code=204)

    table: list[tuple[str, str, Handler]] = [
        ("/api/v1/keys", "GET", list_keys),
        ("/api/v1/keys", "POST", create_key),
        ("/api/v1/keys/{keyId}", "DELETE", revoke_key),
        ("/api/v1/portal/tokens", "GET", list_portal_tokens),
        ("/api/v1/portal/tokens", "POST", create_portal_token),
        ("/api/v1/portal/tokens/invalidate", "POST", invalidate_portal_tokens),
    ]
    by_path: dict[str, dict[str, Handler]] = {}
    for path, method, handler in table:
        by_path.setdefault(path, {})[method] = _guard(handler)
    return [Route(path, _dispatch(methods), methods=list(methods)) for path, methods in by_path.items()]


def reservation_routes(holds: ReservationService) -> list[Route]:
    """Reservations (Meterstream's): reserve before a call, commit or release after it; and the estimate."""

    async def reserve(request: Request) -> Response:
        inp = parse(ReserveIn, await _body(request))
        try:
            outcome = await holds.reserve(request.path_params["subject"], inp)
        except LimitReached as denied:
            body = denied.to_dict() | render.denial(denied.lines, denied.fit)
            return Response(orjson.dumps(body), status_code=429, media_type=PROBLEM_JSON, headers=denied.headers)
        now = datetime.now(UTC)
        return _json(render.reservation(outcome.reservation, now, outcome.lines), 201 if outcome.created else 200)

    async def get_reservation(request: Request) -> Response:
        r = await holds.get(request.path_params["reservationId"])
        return _json(render.reservation(r, datetime.now(UTC)))

    async def commit(request: Request) -> Response:
        inp = parse(CommitIn, await _body(request))
        r = await holds.commit(request.path_params["reservationId"], inp)
        return _json(render.reservation(r, datetime.now(UTC)))

    async def release(request: Request) -> Response:
        r = await holds.release(request.path_params["reservationId"])
        return _json(render.reservation(r, datetime.now(UTC)))

    async def estimate(request: Request) -> Response:
        tokens, cost = holds.estimate(parse(EstimateIn, await _body(request)))
        return _json(render.estimate(tokens, cost))

    table: list[tuple[str, str, Handler]] = [
        ("/api/v1/subjects/{subject}/reservations", "POST", _by_subject_id(holds.subject_key, reserve)),
        ("/api/v1/reservations/{reservationId}", "GET", get_reservation),
        ("/api/v1/reservations/{reservationId}/commit", "POST", commit),
        ("/api/v1/reservations/{reservationId}/release", "POST", release),
        ("/api/v1/estimate", "POST", estimate),
    ]
    by_path: dict[str, dict[str, Handler]] = {}
    for path, method, handler in table:
        by_path.setdefault(path, {})[method] = _guard(handler)
    return [Route(path, _dispatch(methods), methods=list(methods)) for path, methods in by_path.items()]


def alert_routes(alerts: AlertService) -> list[Route]:
    """Notification channels, rules and events (OpenMeter's ``/api/v1/notification/...``)."""

    async def _rules_json(rules: list[Any]) -> list[dict[str, Any]]:
        keys = await alerts.feature_keys(rules)
        return [alert_view.rule(r, keys) for r in rules]

    async def list_channels(request: Request) -> Response:
        page = _always_paged(request, ("id", "type", "createdAt", "updatedAt"), "id")
        channels, total = await alerts.list_channels(
            include_deleted=_bool(request, "includeDeleted"),
            include_disabled=_bool(request, "includeDisabled"),
            listing=page.listing(),
        )
        return page.answer([alert_view.channel(c) for c in channels], total)

    async def create_channel(request: Request) -> Response:
        inp = parse(ChannelIn, await _body(request))
        return _json(alert_view.channel(await alerts.create_channel(inp)), 201)

    async def get_channel(request: Request) -> Response:
        return _json(alert_view.channel(await alerts.get_channel(request.path_params["channelId"])))

    async def update_channel(request: Request) -> Response:
        inp = parse(ChannelIn, await _body(request))
        return _json(alert_view.channel(await alerts.update_channel(request.path_params["channelId"], inp)))

    async def delete_channel(request: Request) -> Response:
        await alerts.delete_channel(request.path_params["channelId"])
        return Response(status_code=204)

    async def list_rules(request: Request) -> Response:
        page = _always_paged(request, ("id", "type", "createdAt", "updatedAt"), "id")
        rules, total = await alerts.list_rules(
            include_deleted=_bool(request, "includeDeleted"),
            include_disabled=_bool(request, "includeDisabled"),
            features=_list(request, "feature"),
            channels=_list(request, "channel"),
            listing=page.listing(),
        )
        return page.answer(await _rules_json(rules), total)

    async def create_rule(request: Request) -> Response:
        inp = parse_rule(await _body(request))
        return _json((await _rules_json([await alerts.create_rule(inp)]))[0], 201)

    async def get_rule(request: Request) -> Response:
        return _json((await _rules_json([await alerts.get_rule(request.path_params["ruleId"])]))[0])

    async def update_rule(request: Request) -> Response:
        inp = parse_rule(await _body(request))
        return _json((await _rules_json([await alerts.update_rule(request.path_params["ruleId"], inp)]))[0])

    async def delete_rule(request: Request) -> Response:
        await alerts.delete_rule(request.path_params["ruleId"])
        return Response(status_code=204)

    async def test_rule(request: Request) -> Response:
        e = await alerts.test_rule(request.path_params["ruleId"])
        return _json((await _events_json([e]))[0], 201)  # 201: what OpenMeter's client accepts

    async def _events_json(events: list[Any]) -> list[dict[str, Any]]:
        rules = await alerts.rules_by_id([e.rule_id for e in events])
        keys = await alerts.feature_keys(list(rules.values()))
        return [alert_view.event(e, rules[e.rule_id], keys) for e in events if e.rule_id in rules]

    async def list_events(request: Request) -> Response:
        page = _always_paged(request, ("id", "createdAt"), "createdAt", descending=True)
        where = EventFilter(
            start=_time(request, "from"),
            end=_time(request, "to"),
            features=_list(request, "feature"),
            subjects=_list(request, "subject"),
            rules=[r.upper() for r in _list(request, "rule")],
            channels=[c.upper() for c in _list(request, "channel")],
        )
        events, total = await alerts.list_events(where, page.listing())
        return page.answer(await _events_json(events), total)

    async def get_event(request: Request) -> Response:
        return _json((await _events_json([await alerts.get_event(request.path_params["eventId"])]))[0])

    async def resend_event(request: Request) -> Response:
        inp = parse(ResendIn, await _body(request, optional=True))
        await alerts.resend(request.path_params["eventId"], inp)
        return Response(status_code=202)

    n = "/api/v1/notification"
    table: list[tuple[str, str, Handler]] = [
        (f"{n}/channels", "GET", list_channels),
        (f"{n}/channels", "POST", create_channel),
        (f"{n}/channels/{{channelId}}", "GET", get_channel),
        (f"{n}/channels/{{channelId}}", "PUT", update_channel),
        (f"{n}/channels/{{channelId}}", "DELETE", delete_channel),
        (f"{n}/rules", "GET", list_rules),
        (f"{n}/rules", "POST", create_rule),
        (f"{n}/rules/{{ruleId}}", "GET", get_rule),
        (f"{n}/rules/{{ruleId}}", "PUT", update_rule),
        (f"{n}/rules/{{ruleId}}", "DELETE", delete_rule),
        (f"{n}/rules/{{ruleId}}/test", "POST", test_rule),
        (f"{n}/events", "GET", list_events),
        (f"{n}/events/{{eventId}}", "GET", get_event),
        (f"{n}/events/{{eventId}}/resend", "POST", resend_event),
    ]
    by_path: dict[str, dict[str, Handler]] = {}
    for path, method, handler in table:
        by_path.setdefault(path, {})[method] = _guard(handler)
    return [Route(path, _dispatch(methods), methods=list(methods)) for path, methods in by_path.items()]


def _always_paged(request: Request, order_by: tuple[str, ...], default: str, descending: bool = False) -> _Page:
    """The notification lists are always paginated objects (OpenMeter's), ordered ``order`` (default given)."""
    page = _Page(request, order_by, default)
    page.paginated = True
    page.page, page.page_size = page.page or 1, page.page_size or 100
    page.offset, page.limit = (page.page - 1) * page.page_size, page.page_size
    if "order" not in request.query_params:
        page.desc = descending
    return page


def meter_routes(meters: MeterService) -> list[Route]:
    """Creating, updating and deleting user-defined meters (OpenMeter's ``/api/v1/meters``; reading and
    querying them are the query API's)."""

    async def create_meter(request: Request) -> Response:
        return _json((await meters.create(await _body(request))).to_api(), 201)

    async def update_meter(request: Request) -> Response:
        return _json((await meters.update(request.path_params["meter"], await _body(request))).to_api())

    async def delete_meter(request: Request) -> Response:
        await meters.delete(request.path_params["meter"])
        return Response(status_code=204)

    return [
        Route("/api/v1/meters", _guard(create_meter), methods=["POST"]),
        Route(
            "/api/v1/meters/{meter}",
            _dispatch({"PUT": _guard(update_meter), "DELETE": _guard(delete_meter)}),
            methods=["PUT", "DELETE"],
        ),
    ]

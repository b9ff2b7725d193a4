"""HTTP routes of the read path, OpenMeter v1 compatible: meters, meter queries, the event list; plus
Meterstream's own: the price in effect for a model, and reconciliation of stored totals."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from query.cache import QueryCache
from query.params import build_query, from_query_string
from query.render import rfc3339, to_csv, to_json, wants_csv
from schemas.events import has_float
from schemas.meters import METERS, Meter, UserMeter, find_meter
from schemas.money import format_usd
from schemas.problems import PROBLEM_JSON, Problem, bad
from schemas.query import AcceptedGap, Difference, EventFilter, MeterQuery, QueryRow
from schemas.times import parse_time

log = logging.getLogger(__name__)

MAX_QUERY_BODY_BYTES = 1024 * 1024
#: The event list looks back this far when no ``from`` is given (as OpenMeter).
DEFAULT_EVENTS_LOOKBACK = timedelta(days=32)


class Reader(Protocol):
    def query_meter(self, query: MeterQuery) -> list[QueryRow]: ...

    def query_meters(self, query: MeterQuery, meters: list[Meter]) -> list[list[QueryRow]]: ...

    def list_events(self, f: EventFilter, meters: Sequence[UserMeter] = ()) -> list[dict[str, Any]]: ...

    def reconcile(self, start: datetime, end: datetime) -> list[Difference]: ...

    def group_values(
        self, meter: Meter | UserMeter, key: str, start: datetime | None, end: datetime | None
    ) -> list[str]: ...

    def accepted_gaps(self) -> list[AcceptedGap]: ...

    def accept_gap(self, topic_id: str, partition: int, first: int, last: int, reason: str) -> None: ...

    def states_ready(self, meter: UserMeter) -> bool: ...

    def backfill_progress(self, meter: UserMeter) -> tuple[int, int]: ...


class Catalog(Protocol):
    """Where the user-defined meters come from (the built-in ones are always there)."""

    async def user_meters(self) -> list[UserMeter]: ...

    async def find(self, id_or_slug: str) -> Meter | UserMeter | None: ...


class BuiltInMeters:
    """A catalog of the built-in meters only."""

    async def user_meters(self) -> list[UserMeter]:
        return []

    async def find(self, id_or_slug: str) -> Meter | UserMeter | None:
        return find_meter(id_or_slug)


#: (provider, model, at, price context) -> quote as a JSON-able dict; raises LookupError when unknown.
PriceQuoter = Callable[[str, str, datetime, Mapping[str, str]], Mapping[str, Any]]


def problem_response(problem: Problem) -> Response:
    return Response(
        orjson.dumps(problem.to_dict()),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def query_routes(
    reader: Reader,
    usage_event_type: str,
    quote: PriceQuoter | None = None,
    catalog: Catalog | None = None,
    cache: QueryCache | None = None,
) -> list[Route]:
    """Routes answering from ``reader``. Storage calls run in worker threads (the engine releases the GIL).
    ``catalog`` adds the user-defined meters to the built-in ones; ``cache`` (in the process that writes
    the windows) answers a query again while no write has touched its subjects."""

    def answer(query: MeterQuery, csv: bool) -> bytes | str:
        def render(rows: list[QueryRow]) -> bytes | str:
            return to_csv(query, rows) if csv else to_json(query, rows)

        if cache is None:
            return render(reader.query_meter(query))
        return cache.answer(query, lambda: reader.query_meter(query), "csv" if csv else "json", render)

    meters = catalog or BuiltInMeters()

    def describe(meter: Meter | UserMeter) -> dict[str, Any]:
        return meter.to_api(usage_event_type) if isinstance(meter, Meter) else meter.to_api()

    async def list_meters(request: Request) -> Response:
        listed: list[Meter | UserMeter] = [*METERS, *await meters.user_meters()]
        return _json([describe(m) for m in listed])

    async def get_meter(request: Request) -> Response:
        meter = await meters.find(request.path_params["meter"])
        if meter is None:
            return problem_response(Problem(404, f"meter not found: {request.path_params['meter']}"))
        body = describe(meter)
        if isinstance(meter, UserMeter):
            # How its queries are answered: from its states kept by the sink, or from the audit log while
            # they are backfilled (events in the states / events stored).
            annotations = body["annotations"]
            if await asyncio.to_thread(reader.states_ready, meter):
                annotations["meterstream.states"] = "ready"
            else:
                done, total = await asyncio.to_thread(reader.backfill_progress, meter)
                annotations["meterstream.states"] = "backfilling"
                annotations["meterstream.backfill"] = f"{done}/{total}"
        return _json(body)

    async def group_values(request: Request) -> Response:
        """OpenMeter's discovery: the subjects, or one group-by key's values, of a meter's events."""
        meter = await meters.find(request.path_params["meter"])
        if meter is None:
            return problem_response(Problem(404, f"meter not found: {request.path_params['meter']}"))
        key = request.path_params.get("key", "subject")
        if key not in meter.group_keys:
            keys = ", ".join(meter.group_keys)
            return problem_response(Problem(404, f"meter {meter.slug} has no group-by key {key} (its keys: {keys})"))
        params = request.query_params
        try:
            start = parse_time("from", params["from"]) if params.get("from") else None
            end = parse_time("to", params["to"]) if params.get("to") else None
            if start is not None and end is not None and end <= start:
                raise bad("to", "to must be after from")
        except Problem as problem:
            return problem_response(problem)
        return _json(await asyncio.to_thread(reader.group_values, meter, key, start, end))

    async def query_meter(request: Request) -> Response:
        meter = await meters.find(request.path_params["meter"])
        if meter is None:
            return problem_response(Problem(404, f"meter not found: {request.path_params['meter']}"))
        try:
            if request.method == "POST":
                raw = await _json_body(request)
            else:
                raw = from_query_string(request.query_params.multi_items())
            query = build_query(meter, raw)
        except Problem as problem:
            return problem_response(problem)
        csv = wants_csv(request.headers.get("accept"))
        body = await asyncio.to_thread(answer, query, csv)
        if csv:
            return Response(
                body,
                media_type="text/csv",
                headers={"Content-Disposition": f"attachment; filename={meter.slug}.csv"},
            )
        return Response(body, media_type="application/json")

    async def query_built_in(request: Request) -> Response:
        """Meterstream's addition: several built-in meters over the same range and groups in one scan of
        the windows (a dashboard's dozen queries cost one); each answer is exactly its own meter query's."""
        try:
            items = request.query_params.multi_items()
            raw = from_query_string([(k, v) for k, v in items if k != "meter"])
            names = list(dict.fromkeys(v for k, v in items if k == "meter"))
            if not names:
                raise bad("meter", "name one built-in meter or more: meter=requests&meter=cost_usd")
            chosen = []
            for name in names:
                meter = find_meter(name)
                if meter is None:
                    known = await meters.find(name)
                    detail = "is user-defined: query it on its own" if known is not None else "is not a meter"
                    raise bad("meter", f"{name} {detail} (built-in: {', '.join(m.slug for m in METERS)})")
                chosen.append(meter)
            query = build_query(chosen[0], raw)
        except Problem as problem:
            return problem_response(problem)
        answers = await asyncio.to_thread(reader.query_meters, query, chosen)
        results = {
            meter.slug: orjson.Fragment(to_json(dataclasses.replace(query, meter=meter), rows))
            for meter, rows in zip(chosen, answers, strict=True)
        }
        return Response(orjson.dumps({"results": results}), media_type="application/json")

    async def portal_me(request: Request) -> Response:
        """Meterstream's addition: whom a portal token speaks for (its subject, and the meters it may read;
        null: all), so that a page given only the token can ask for that subject's entitlements."""
        subject = getattr(request.state, "portal_subject", None)
        if subject is None:
            return problem_response(Problem(403, "this endpoint takes a portal token (POST /api/v1/portal/tokens)"))
        allowed = getattr(request.state, "portal_meters", None)
        return _json({"subject": subject, "allowedMeterSlugs": sorted(allowed) if allowed is not None else None})

    async def portal_query(request: Request) -> Response:
        """OpenMeter's portal query: a portal token's own subject's usage, whatever the parameters say (any
        subject in them is replaced by the token's). The access check in front sets who is asking."""
        subject = getattr(request.state, "portal_subject", None)
        if subject is None:
            return problem_response(Problem(403, "this endpoint takes a portal token (POST /api/v1/portal/tokens)"))
        meter = await meters.find(request.path_params["meter"])
        if meter is None:
            return problem_response(Problem(404, f"meter not found: {request.path_params['meter']}"))
        allowed = getattr(request.state, "portal_meters", None)
        if allowed is not None and meter.slug not in allowed:
            return problem_response(Problem(403, f"this portal token may not read meter {meter.slug}"))
        try:
            raw = from_query_string(request.query_params.multi_items())
            # As the same query by subject answers (and OpenMeter's portal): rows name the subject.
            raw["subject"] = [subject]
            query = build_query(meter, raw)
        except Problem as problem:
            return problem_response(problem)
        query = dataclasses.replace(
            query,
            include={**query.include, "subject": (subject,)},
            exclude={k: v for k, v in query.exclude.items() if k != "subject"},
        )
        csv = wants_csv(request.headers.get("accept"))
        body = await asyncio.to_thread(answer, query, csv)
        return Response(body, media_type="text/csv" if csv else "application/json")

    async def list_events(request: Request) -> Response:
        params = request.query_params
        try:
            now = datetime.now(UTC)
            start = parse_time("from", params["from"]) if "from" in params else now - DEFAULT_EVENTS_LOOKBACK
            end = parse_time("to", params["to"]) if "to" in params else None
            if end is not None and end <= start:
                raise bad("to", "to must be after from")
            limit_text = params.get("limit", "100")
            if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
                raise bad("limit", "must be an integer from 1 to 100")
            event_list = EventFilter(
                start=start,
                end=end,
                subject=params.get("subject"),
                id_contains=params.get("id"),
                limit=int(limit_text),
            )
        except Problem as problem:
            return problem_response(problem)
        try:
            user_meters: Sequence[UserMeter] = await meters.user_meters()
        except Problem:  # never read, and PostgreSQL away: the events are listed without the meters' statuses
            user_meters = ()
        rows = await asyncio.to_thread(reader.list_events, event_list, user_meters)
        return _json([_ingested_event(row) for row in rows])

    async def get_price(request: Request) -> Response:
        params = request.query_params
        if quote is None:
            return problem_response(Problem(404, "price lookup is not enabled on this service"))
        try:
            provider, model = params.get("provider"), params.get("model")
            if not provider or not model:
                raise bad("model", "provider and model are required")
            at = parse_time("at", params["at"]) if "at" in params else datetime.now(UTC)
            context = {k: v for k, v in params.items() if k in ("service_tier", "processing", "speed")}
        except Problem as problem:
            return problem_response(problem)
        try:
            return _json(quote(provider, model, at, context))
        except LookupError as exc:
            return problem_response(Problem(404, str(exc).strip("'\"")))

    async def reconcile(request: Request) -> Response:
        params = request.query_params
        try:
            if "from" not in params or "to" not in params:
                raise bad("from", "from and to are required")
            start, end = parse_time("from", params["from"]), parse_time("to", params["to"])
            if end <= start:
                raise bad("to", "to must be after from")
            if end - start > timedelta(days=400):
                raise bad("to", "at most 400 days at a time")
        except Problem as problem:
            return problem_response(problem)
        differences = await asyncio.to_thread(reader.reconcile, start, end)
        gaps = await asyncio.to_thread(reader.accepted_gaps)
        return _json(
            {
                "from": rfc3339(start),
                "to": rfc3339(end),
                "acceptedGaps": [_gap(g) for g in gaps],
                "differences": [
                    {
                        "subject": d.subject,
                        "provider": d.provider,
                        "model": d.model,
                        "windowStart": rfc3339(d.window_start),
                        "values": {
                            k: {"recomputed": format_usd(a), "stored": format_usd(b)}
                            for k, (a, b) in d.values.items()
                            if a != b
                        },
                    }
                    for d in differences
                ],
            }
        )

    async def gaps(request: Request) -> Response:
        if request.method == "GET":
            return _json([_gap(g) for g in await asyncio.to_thread(reader.accepted_gaps)])
        try:
            body = await _json_body(request)
            topic_id = body.get("topicId")
            reason = body.get("reason")
            if not isinstance(topic_id, str) or not topic_id:
                raise bad("topicId", "the events topic's id, as the sink's readiness names it")
            partition, first, last = (_offset(body, name) for name in ("partition", "firstOffset", "lastOffset"))
            if last < first:
                raise bad("lastOffset", "lastOffset must not be below firstOffset")
            if not isinstance(reason, str) or not reason.strip() or len(reason) > 1000:
                raise bad("reason", "say why the offsets are gone (at most 1,000 characters)")
        except Problem as problem:
            return problem_response(problem)
        await asyncio.to_thread(reader.accept_gap, topic_id, partition, first, last, reason.strip())
        log.warning(
            "admin: offsets %d..%d of events topic %s partition %d accepted as lost (%s)",
            first,
            last,
            topic_id,
            partition,
            reason,
        )
        return _json(
            {"topicId": topic_id, "partition": partition, "firstOffset": first, "lastOffset": last, "reason": reason},
            201,
        )

    return [
        Route("/api/v1/meters", _answering(list_meters), methods=["GET"]),
        Route("/api/v1/meters/{meter}", _answering(get_meter), methods=["GET"]),
        Route("/api/v1/meters/{meter}/query", _answering(query_meter), methods=["GET", "POST"]),
        Route("/api/v1/query", _answering(query_built_in), methods=["GET"]),
        Route("/api/v1/meters/{meter}/subjects", _answering(group_values), methods=["GET"]),
        Route("/api/v1/meters/{meter}/group-by/{key}/values", _answering(group_values), methods=["GET"]),
        Route("/api/v1/portal/meters/{meter}/query", _answering(portal_query), methods=["GET"]),
        Route("/api/v1/portal/me", portal_me, methods=["GET"]),
        Route("/api/v1/events", list_events, methods=["GET"]),
        Route("/api/v1/prices", get_price, methods=["GET"]),
        Route("/api/v1/admin/reconcile", reconcile, methods=["GET"]),
        Route("/api/v1/admin/gaps", gaps, methods=["GET", "POST"]),
    ]


def _answering(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A problem raised while answering (the catalog's store away: 503) as problem+json."""

    @functools.wraps(handler)
    async def answering(request: Request) -> Response:
        try:
            return await handler(request)
        except Problem as problem:
            return problem_response(problem)

    return answering


def _offset(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise bad(name, f"{name} must be a non-negative integer")
    return value


def _gap(gap: AcceptedGap) -> dict[str, Any]:
    return {
        "topicId": gap.topic_id,
        "partition": gap.partition,
        "firstOffset": gap.first_offset,
        "lastOffset": gap.last_offset,
        "reason": gap.reason,
        "acceptedAt": rfc3339(gap.accepted_at),
    }


async def _json_body(request: Request) -> dict[str, Any]:
    # Refused before it is read when the client says how large it is; read at most the cap otherwise.
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_QUERY_BODY_BYTES:
        raise Problem(413, "the query body is larger than 1 MiB")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_QUERY_BODY_BYTES:
            raise Problem(413, "the query body is larger than 1 MiB")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        raw = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise Problem(400, "the body must be a JSON object (MeterQueryRequest)")
    return raw


def _ingested_event(row: Mapping[str, Any]) -> dict[str, Any]:
    data = orjson.loads(row["data"])
    if has_float(data):
        # As it was written (the audit log keeps the text): a float would show 1234567890.123456789 rounded.
        data = json.loads(row["data"], parse_float=orjson.Fragment)
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": row["id"],
        "source": row["source"],
        "type": row["type"],
        "subject": row["subject"],
        "time": rfc3339(_aware(row["time"])),
    }
    if data is not None:
        event["datacontenttype"] = "application/json"
        event["data"] = data
    body: dict[str, Any] = {
        "event": event,
        "ingestedAt": rfc3339(_aware(row["received_at"])),
        "storedAt": rfc3339(_aware(row["stored_at"])),
        "meterstream": {
            "status": row["status"],
            "provider": row["provider"],
            "model": row["model"],
            "usage": orjson.loads(row["usage"]),
            "costUsd": format_usd(row["cost_usd"]) if row["cost_usd"] is not None else None,
            "priceSource": row["price_source"],
        },
    }
    missing = list(row.get("values_missing") or ())
    if missing:
        body["meterstream"]["valueMissing"] = missing
    if row["status"] == "late":
        body["validationError"] = "not counted: later than the allowed lateness (dead-lettered)"
    elif missing:
        body["validationError"] = (
            f"left out of meter(s) {', '.join(missing)}: no value at their valueProperty, or not a number "
            "where one is needed (never counted as 0)"
        )
    return body


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value

"""HTTP routes of the write path: ``POST /api/v1/events``."""

from __future__ import annotations

import logging

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingest.producer import BrokerUnavailable
from ingest.service import REASONS, REJECTED, IngestService
from schemas.problems import PROBLEM_JSON, Problem

log = logging.getLogger(__name__)

#: Seconds a client is asked to wait before retrying when the broker is unreachable.
RETRY_AFTER_S = 2


def ingest_routes(service: IngestService, max_body_bytes: int) -> list[Route]:
    async def ingest_events(request: Request) -> Response:
        try:
            body = await _read_body(request, max_body_bytes)
            await service.ingest(request.headers, body)
        except Problem as problem:
            REJECTED.labels(REASONS.get(problem.status, str(problem.status))).inc()
            return problem_response(problem)
        except BrokerUnavailable as exc:
            log.warning("ingest: answering 503: %s", exc)
            REJECTED.labels(REASONS[503]).inc()
            return problem_response(
                Problem(
                    503,
                    f"events were not stored: {exc}; retry later",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            )
        return Response(status_code=204)

    return [Route("/api/v1/events", ingest_events, methods=["POST"])]


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"the body is {declared} bytes; at most {limit} are accepted")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def problem_response(problem: Problem) -> Response:
    return Response(
        orjson.dumps(problem.to_dict()),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )

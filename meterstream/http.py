"""The HTTP application of a service: its routes, health, readiness, metrics and problem+json errors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from query.routes import problem_response
from schemas.problems import Problem

log = logging.getLogger(__name__)

OPENAPI = Path(__file__).with_name("openapi.yaml")

#: name -> check that raises (or returns False) when the dependency is not usable.
Checks = dict[str, Callable[[], Any]]


def build_app(
    routes: Sequence[BaseRoute],
    readiness: Checks,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    """A Starlette app serving ``routes`` plus ``/healthz`` (the process answers), ``/readyz`` (every
    readiness check passes: broker, storage...), ``/metrics`` (Prometheus) and ``/api/v1/openapi.yaml``."""

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        failures = {}
        for name, check in readiness.items():
            try:
                if check() is False:
                    failures[name] = "not ready"
            except Exception as exc:
                failures[name] = str(exc)[:200]
        if failures:
            return Response(
                orjson.dumps({"status": "unavailable", "failures": failures}),
                status_code=503,
                media_type="application/json",
            )
        return Response(b'{"status":"ready"}', media_type="application/json")

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return Response(OPENAPI.read_bytes(), media_type="application/yaml")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = {404: "no such endpoint", 405: f"method {request.method} is not allowed here"}.get(
            exc.status_code, str(exc.detail)
        )
        return problem_response(Problem(exc.status_code, detail, headers=dict(exc.headers or {})))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(Problem(500, "internal error; the request may be retried"))

    all_routes: list[BaseRoute] = [
        *routes,
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/api/v1/openapi.yaml", openapi, methods=["GET"]),
    ]
    return Starlette(
        routes=all_routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )

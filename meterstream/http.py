"""The HTTP application of a service: its routes, health, readiness, metrics and problem+json errors, and
who may call each route (API keys and portal tokens, checked before the route runs)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control import access as acl
from control.access import Authenticator, FailedAuthLimiter, Need, RateLimiter
from control.store import StoreUnavailable
from query.routes import problem_response
from schemas.problems import Problem

log = logging.getLogger(__name__)

OPENAPI = Path(__file__).with_name("openapi.yaml")
#: How long a readiness check may take before it counts as failed.
READY_TIMEOUT_S = 3.0

#: name -> check that raises (or returns False) when the dependency is not usable.
Checks = dict[str, Callable[[], Any]]


@dataclass
class Access:
    """How a service checks its callers. ``authenticator`` None: authentication is off (an explicit
    setting, logged at start)."""

    authenticator: Authenticator | None
    metrics: Literal["loopback", "key", "open"] = "loopback"
    cors_origins: list[str] = field(default_factory=list)
    rate: RateLimiter = field(default_factory=lambda: RateLimiter(0, 1))
    failures: FailedAuthLimiter = field(default_factory=lambda: FailedAuthLimiter(0))


OPEN = Access(authenticator=None, metrics="open")


def _too_many(detail: str, wait_s: float) -> Response:
    return problem_response(Problem(429, detail, headers={"Retry-After": str(max(1, int(wait_s + 0.999)))}))


def _guarded(
    endpoint: Callable[[Request], Any], path: str, methods: Sequence[str], access: Access
) -> Callable[[Request], Any]:
    """``endpoint`` behind the check its route needs: 401 without or with a bad key, 403 with one that may
    not do this; the key itself is never echoed. (On every request: kept to a few dictionary lookups when
    the key was checked within the last second.)"""
    authenticator = access.authenticator
    needs = {m: acl.need(m, path) for m in (*methods, "HEAD")}
    metrics = path == "/metrics"

    async def guarded(request: Request) -> Response:
        required = needs.get(request.method) or acl.need(request.method, path)
        if metrics:
            open_ = access.metrics == "open" or (
                access.metrics == "loopback" and acl.is_loopback(request.client.host if request.client else None)
            )
            required = Need.PUBLIC if open_ else Need.READ
        if authenticator is None or required is Need.PUBLIC:
            response: Response = await endpoint(request)
            return response
        header = request.headers.get("authorization")
        address = request.client.host if request.client else "-"
        blocked = access.failures.blocked_for(address)
        # A blocked address (behind a gateway, many clients share one) still serves keys known good a
        # moment ago; only unknown ones are refused, without costing a lookup.
        if blocked > 0 and not authenticator.known_good(header):
            return _too_many("too many failed authentications from this address; retry later", blocked)
        try:
            principal = await authenticator.authenticate(header)
            acl.check(principal, required, request.path_params.get("subject"))
        except Problem as problem:
            if problem.status == 401 and header:
                access.failures.failed(address)  # a wrong guess; a request without a key guesses nothing
            return problem_response(problem)
        except StoreUnavailable as exc:
            return problem_response(Problem(503, f"keys cannot be checked now: {exc}", headers={"Retry-After": "5"}))
        assert principal is not None
        wait = access.rate.retry_after(principal.id)
        if wait > 0:
            return _too_many("this key's request rate limit is reached", wait)
        if principal.is_portal:  # what the portal query needs to know (query/routes.py reads it)
            request.state.portal_subject = principal.subject
            request.state.portal_meters = principal.allowed_meter_slugs
        allowed: Response = await endpoint(request)
        return allowed

    return guarded


def _protect(routes: Sequence[BaseRoute], access: Access) -> list[BaseRoute]:
    out: list[BaseRoute] = []
    for route in routes:
        if isinstance(route, Route):
            methods = sorted(route.methods - {"HEAD"}) if route.methods else ["GET"]
            out.append(Route(route.path, _guarded(route.endpoint, route.path, methods, access), methods=methods))
        else:
            out.append(route)
    return out


def _render_metrics() -> bytes:
    """This process's metrics; with several worker processes (ingest's ``WORKERS``: Prometheus's
    multiprocess mode), every worker's, summed, whichever worker answers."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


def build_app(
    routes: Sequence[BaseRoute],
    readiness: Checks,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
    access: Access = OPEN,
) -> Starlette:
    """A Starlette app serving ``routes`` plus ``/healthz`` (the process answers), ``/readyz`` (every
    readiness check passes: broker, storage...), ``/metrics`` (Prometheus) and ``/api/v1/openapi.yaml``,
    each behind the access its route needs (``access``)."""

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        # The checks may wait on the network (a ClickHouse ping): in threads, never on the loop, and bounded.
        failures = {}
        for name, check in readiness.items():
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    if await asyncio.to_thread(check) is False:
                        failures[name] = "not ready"
            except TimeoutError:
                failures[name] = f"no answer within {READY_TIMEOUT_S:g}s"
            except Exception as exc:
                failures[name] = str(exc)[:1000]
        if failures:
            return Response(
                orjson.dumps({"status": "unavailable", "failures": failures}),
                status_code=503,
                media_type="application/json",
            )
        return Response(b'{"status":"ready"}', media_type="application/json")

    async def metrics(request: Request) -> Response:
        # Some collectors query storage (the engine's memory accounting): off the loop.
        return Response(await asyncio.to_thread(_render_metrics), media_type=CONTENT_TYPE_LATEST)

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
    middleware = []
    if access.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=access.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "Accept"],
                max_age=600,
            )
        )
    return Starlette(
        routes=_protect(all_routes, access),
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
        middleware=middleware,
    )

"""The service's own endpoints never block the event loop: a readiness check that waits (a storage ping
timing out) holds up neither other requests nor ``/metrics``."""

from __future__ import annotations

import asyncio
import time

import httpx

from meterstream.http import build_app


async def test_a_slow_readiness_check_does_not_hold_up_other_requests() -> None:
    def slow() -> bool:
        time.sleep(1.0)  # a blocking ping, as a driver's is
        return True

    app = build_app([], {"storage": slow})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        ready = asyncio.create_task(client.get("/readyz"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        health = await client.get("/healthz")
        metrics = await client.get("/metrics")
        took = time.monotonic() - started
        assert health.status_code == 200
        assert metrics.status_code == 200
        assert took < 0.5, took
        assert (await ready).status_code == 200


async def test_a_check_that_never_answers_fails_readiness_in_bounded_time() -> None:
    import meterstream.http as http

    http.READY_TIMEOUT_S = 0.3
    try:
        app = build_app([], {"storage": lambda: time.sleep(2.0)})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            started = time.monotonic()
            r = await client.get("/readyz")
            assert r.status_code == 503
            assert "no answer within" in r.json()["failures"]["storage"]
            assert time.monotonic() - started < 1.5
    finally:
        http.READY_TIMEOUT_S = 3.0

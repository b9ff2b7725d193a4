"""The control plane's HTTP layer on a real PostgreSQL and a real ClickHouse engine, in process: bad input
is a 400 problem+json naming the field (and changes nothing), conflicts are 409, unknown things 404, and the
status codes are exactly OpenMeter's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from control.postgres.store import PostgresStore
from control.routes import control_routes
from control.service import ControlService
from sinks.clickhouse.connection import ClickHouse
from sinks.clickhouse.reader import MeterReader

pytestmark = pytest.mark.integration

METERED = {"type": "metered", "featureKey": "tokens", "usagePeriod": {"interval": "MONTH"}}
GRANT = {"amount": 100, "effectiveAt": "2099-01-01T00:00:00Z", "expiration": {"duration": "MONTH", "count": 1}}


@pytest.fixture
async def api(postgres_dsn: str, ch: ClickHouse) -> AsyncIterator[httpx.AsyncClient]:
    store = PostgresStore(postgres_dsn)
    await store.open()
    app = Starlette(routes=control_routes(ControlService(store, MeterReader(ch))))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://control") as client:
        r = await client.post("/api/v1/features", json={"key": "tokens", "name": "T", "meterSlug": "tokens_total"})
        assert r.status_code == 201, r.text
        r = await client.post("/api/v1/features", json={"key": "sso", "name": "SSO"})
        assert r.status_code == 201, r.text
        yield client
    await store.close()


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    return body


def fields(body: dict[str, Any]) -> list[str]:
    return [e["field"] for e in body.get("errors", [])]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"key": "t2", "name": "x", "meterSlug": "no_such_meter"}, "meterSlug"),
        (
            {"key": "t2", "name": "x", "meterSlug": "tokens_total", "meterGroupByFilters": {"colour": "red"}},
            "meterGroupByFilters.colour",
        ),
        ({"key": "Not A Key", "name": "x"}, "key"),
        ({"key": "01J5Z3T0E6G9K3J6V9K6Y3S8QH", "name": "x"}, "key"),
        ({"name": "x"}, "key"),
        ({"key": "t2", "name": "x", "surprise": 1}, "surprise"),
    ],
)
async def test_bad_features_name_the_field(api: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    assert field in fields(problem(await api.post("/api/v1/features", json=body), 400))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**METERED, "usagePeriod": {"interval": "FORTNIGHT"}}, "usagePeriod.interval"),
        ({**METERED, "usagePeriod": {"interval": "PT5M"}}, "usagePeriod.interval"),
        ({**METERED, "usagePeriod": {"interval": "MONTH", "timeZone": "Mars/Olympus_Mons"}}, "usagePeriod.timeZone"),
        ({**METERED, "usagePeriod": {"interval": "MONTH", "timeZone": "A" * 300}}, "usagePeriod.timeZone"),
        ({**METERED, "usagePeriod": {"interval": "MONTH", "anchor": "2026-01-01T00:00:00"}}, "usagePeriod.anchor"),
        ({**METERED, "issueAfterReset": -5}, "issueAfterReset"),
        ({**METERED, "issueAfterResetPriority": 3}, "issueAfterResetPriority"),
        ({**METERED, "measureUsageFrom": "YESTERDAY"}, "measureUsageFrom"),
        ({"type": "metered", "featureKey": "tokens"}, "usagePeriod"),
        ({**METERED, "featureKey": "sso"}, "featureKey"),
        ({"type": "static", "featureKey": "sso", "config": "{not json"}, "config"),
        ({"type": "gold", "featureKey": "sso"}, "type"),
    ],
)
async def test_bad_entitlements_name_the_field(api: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    body_ = problem(await api.post("/api/v1/subjects/alice/entitlements", json=body), 400)
    assert field in fields(body_), body_
    assert (await api.get("/api/v1/subjects/alice/entitlements")).json() == []


async def test_bad_grants_and_grants_on_boolean_entitlements(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/v1/subjects/alice/entitlements", json={**METERED, "measureUsageFrom": "NOW"})
    assert r.status_code == 201, r.text
    url = "/api/v1/subjects/alice/entitlements/tokens/grants"
    for body, field in [
        ({**GRANT, "amount": -1}, "amount"),
        ({**GRANT, "amount": 0}, "amount"),
        ({**GRANT, "priority": 0}, "priority"),
        ({**GRANT, "expiration": {"duration": "DECADE", "count": 1}}, "expiration.duration"),
        ({**GRANT, "expiration": {"duration": "DAY", "count": 0}}, "expiration.count"),
        ({**GRANT, "effectiveAt": "2020-01-01T00:00:00Z"}, "effectiveAt"),
        ({**GRANT, "effectiveAt": "not a time"}, "effectiveAt"),
        ({**GRANT, "recurrence": {"interval": "EVERY_TUESDAY"}}, "recurrence.interval"),
    ]:
        assert field in fields(problem(await api.post(url, json=body), 400)), body
    assert (await api.get(url)).json() == []
    assert (
        await api.post("/api/v1/subjects/alice/entitlements", json={"type": "boolean", "featureKey": "sso"})
    ).status_code == 201
    body = problem(await api.post("/api/v1/subjects/alice/entitlements/sso/grants", json=GRANT), 400)
    assert "expected entitlement type metered but got boolean" in body["detail"]
    assert problem(await api.post("/api/v1/subjects/alice/entitlements/nope/grants", json=GRANT), 404)


async def test_status_codes_conflicts_and_not_found(api: httpx.AsyncClient) -> None:
    assert problem(await api.post("/api/v1/features", json={"key": "tokens", "name": "again"}), 409)
    r = await api.post("/api/v1/subjects/bob/entitlements", json=METERED)
    assert r.status_code == 201
    ent = r.json()
    assert "already exists" in problem(await api.post("/api/v1/subjects/bob/entitlements", json=METERED), 409)["detail"]
    assert (await api.post("/api/v1/subjects", json=[{"key": "bob", "displayName": "Bob"}])).status_code == 200
    override = await api.put("/api/v1/subjects/bob/entitlements/tokens/override", json={**METERED, "isSoftLimit": True})
    assert override.status_code == 201
    assert override.json()["id"] != ent["id"]
    assert problem(await api.get(f"/api/v1/subjects/bob/entitlements/{ent['id']}"), 404)
    assert (
        await api.post(f"/api/v1/subjects/bob/entitlements/{override.json()['id']}/reset", json={})
    ).status_code == 400
    assert (await api.delete(f"/api/v1/subjects/bob/entitlements/{override.json()['id']}")).status_code == 204
    assert problem(await api.get("/api/v1/subjects/bob/entitlements/tokens/value"), 404)
    assert problem(await api.get("/api/v1/features/nope"), 404)
    assert problem(await api.delete("/api/v1/grants/01J5Z3T0E6G9K3J6V9K6Y3S8QH"), 404)
    assert problem(await api.get("/api/v1/subjects/nobody"), 404)
    assert problem(
        await api.post("/api/v1/features", content=b"{oops", headers={"content-type": "application/json"}), 400
    )
    assert problem(await api.post("/api/v1/features", content=b"x" * (1024 * 1024 + 1)), 413)
    assert (await api.delete("/api/v1/features/sso")).status_code == 204
    assert problem(await api.delete("/api/v1/features/sso"), 404)
    history = await api.get("/api/v1/subjects/bob/entitlements/x/history")
    assert "windowSize" in fields(problem(history, 400))
    for zone in ("Europe/Atlantis", "A" * 300):
        history = await api.get(
            "/api/v1/subjects/bob/entitlements/x/history", params={"windowSize": "DAY", "windowTimeZone": zone}
        )
        assert "windowTimeZone" in fields(problem(history, 400))


async def test_bad_plans_name_the_field(api: httpx.AsyncClient) -> None:
    plan = {"name": "Free", "entitlements": [{**METERED, "featureKey": "nope"}]}
    assert problem(await api.put("/api/v1/plans/free", json=plan), 404)
    plan = {"name": "Free", "entitlements": [METERED, METERED]}
    assert "entitlements.1.featureKey" in fields(problem(await api.put("/api/v1/plans/free", json=plan), 400))
    plan = {"name": "Free", "entitlements": [{**METERED, "usagePeriod": {"interval": "SOMETIMES"}}]}
    assert "entitlements.0.usagePeriod.interval" in fields(problem(await api.put("/api/v1/plans/free", json=plan), 400))
    assert problem(await api.put("/api/v1/subjects/alice/plan", json={"planKey": "free"}), 404)
    assert (await api.get("/api/v1/plans")).json() == []

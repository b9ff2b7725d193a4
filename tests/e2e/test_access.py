"""Who may do what, on the real stack with authentication on: every route of the OpenAPI document with no
key, a bad key, a revoked key, each scope and a portal token; a portal token sees its own subject only,
whatever it sends; revocation and invalidation take effect within a second, across processes; OpenMeter's
official client works with a key and with a portal token."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openmeter import Client

from tests.helpers.stack import LocalStack, MultiProcessStack, wait_ready

pytestmark = pytest.mark.e2e

# What each route needs (its path with every parameter as {}). A route in the document without an entry
# here fails the walk: a new route must say who may call it.
PUBLIC, READ, INGEST, ADMIN, PORTAL, OWN = "public", "read", "ingest", "admin", "portal", "portal-or-read"
NEEDS: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/api/v1/openapi.yaml"): READ,
    ("POST", "/api/v1/events"): INGEST,
    ("GET", "/api/v1/events"): READ,
    ("GET", "/api/v1/meters"): READ,
    ("GET", "/api/v1/meters/{}"): READ,
    ("GET", "/api/v1/meters/{}/query"): READ,
    ("POST", "/api/v1/meters"): ADMIN,
    ("PUT", "/api/v1/meters/{}"): ADMIN,
    ("DELETE", "/api/v1/meters/{}"): ADMIN,
    ("GET", "/api/v1/meters/{}/subjects"): READ,
    ("GET", "/api/v1/meters/{}/group-by/{}/values"): READ,
    ("POST", "/api/v1/meters/{}/query"): READ,
    ("GET", "/api/v1/prices"): READ,
    ("GET", "/api/v1/admin/reconcile"): ADMIN,
    ("GET", "/api/v1/admin/gaps"): ADMIN,
    ("POST", "/api/v1/admin/gaps"): ADMIN,
    ("GET", "/api/v1/portal/meters/{}/query"): PORTAL,
    ("GET", "/api/v1/portal/me"): PORTAL,
    ("GET", "/api/v1/query"): READ,
    ("GET", "/api/v1/portal/tokens"): ADMIN,
    ("POST", "/api/v1/portal/tokens"): ADMIN,
    ("POST", "/api/v1/portal/tokens/invalidate"): ADMIN,
    ("GET", "/api/v1/keys"): ADMIN,
    ("POST", "/api/v1/keys"): ADMIN,
    ("DELETE", "/api/v1/keys/{}"): ADMIN,
    ("GET", "/api/v1/features"): READ,
    ("POST", "/api/v1/features"): ADMIN,
    ("GET", "/api/v1/features/{}"): READ,
    ("DELETE", "/api/v1/features/{}"): ADMIN,
    ("GET", "/api/v1/entitlements"): READ,
    ("GET", "/api/v1/entitlements/{}"): READ,
    ("GET", "/api/v1/grants"): READ,
    ("DELETE", "/api/v1/grants/{}"): ADMIN,
    ("GET", "/api/v1/subjects"): READ,
    ("POST", "/api/v1/subjects"): ADMIN,
    ("GET", "/api/v1/subjects/{}"): READ,
    ("DELETE", "/api/v1/subjects/{}"): ADMIN,
    ("GET", "/api/v1/subjects/{}/entitlements"): OWN,
    ("POST", "/api/v1/subjects/{}/entitlements"): ADMIN,
    ("GET", "/api/v1/subjects/{}/entitlements/{}"): READ,
    ("DELETE", "/api/v1/subjects/{}/entitlements/{}"): ADMIN,
    ("GET", "/api/v1/subjects/{}/entitlements/{}/grants"): READ,
    ("POST", "/api/v1/subjects/{}/entitlements/{}/grants"): ADMIN,
    ("PUT", "/api/v1/subjects/{}/entitlements/{}/override"): ADMIN,
    ("GET", "/api/v1/subjects/{}/entitlements/{}/value"): OWN,
    ("GET", "/api/v1/subjects/{}/entitlements/{}/history"): READ,
    ("POST", "/api/v1/subjects/{}/entitlements/{}/reset"): ADMIN,
    ("GET", "/api/v1/subjects/{}/plan"): READ,
    ("PUT", "/api/v1/subjects/{}/plan"): ADMIN,
    ("DELETE", "/api/v1/subjects/{}/plan"): ADMIN,
    ("GET", "/api/v1/plans"): READ,
    ("GET", "/api/v1/plans/{}"): READ,
    ("PUT", "/api/v1/plans/{}"): ADMIN,
    ("DELETE", "/api/v1/plans/{}"): ADMIN,
    ("POST", "/api/v1/subjects/{}/reservations"): INGEST,
    ("GET", "/api/v1/reservations/{}"): INGEST,
    ("POST", "/api/v1/reservations/{}/commit"): INGEST,
    ("POST", "/api/v1/reservations/{}/release"): INGEST,
    ("POST", "/api/v1/estimate"): INGEST,
    ("GET", "/api/v1/notification/channels"): ADMIN,  # signing secrets and headers are credentials
    ("POST", "/api/v1/notification/channels"): ADMIN,
    ("GET", "/api/v1/notification/channels/{}"): ADMIN,
    ("PUT", "/api/v1/notification/channels/{}"): ADMIN,
    ("DELETE", "/api/v1/notification/channels/{}"): ADMIN,
    ("GET", "/api/v1/notification/rules"): READ,
    ("POST", "/api/v1/notification/rules"): ADMIN,
    ("GET", "/api/v1/notification/rules/{}"): READ,
    ("PUT", "/api/v1/notification/rules/{}"): ADMIN,
    ("DELETE", "/api/v1/notification/rules/{}"): ADMIN,
    ("POST", "/api/v1/notification/rules/{}/test"): ADMIN,
    ("GET", "/api/v1/notification/events"): READ,
    ("GET", "/api/v1/notification/events/{}"): READ,
    ("POST", "/api/v1/notification/events/{}/resend"): ADMIN,
}
#: credential -> the needs it satisfies (for a portal token: of its own subject, "alice").
GRANTS = {
    "none": {PUBLIC},
    "bad": {PUBLIC},
    "revoked": {PUBLIC},
    "ingest": {PUBLIC, INGEST},
    "read": {PUBLIC, READ, OWN},
    "admin": {PUBLIC, READ, INGEST, ADMIN, OWN},
    "portal": {PUBLIC, PORTAL, OWN},
}


def shape(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def concrete(path: str) -> str:
    """A route's shape with sample values: the subject is the portal token's own (alice)."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if part == "{}":
            before = parts[i - 1]
            parts[i] = (
                "alice"
                if before == "subjects"
                else "tokens_total"
                if before == "meters"
                else "01J5Z3T0E6G9K3J6V9K6Y3S8QH"
            )
    return "/".join(parts)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    # The walk presents bad keys hundreds of times from one address: the failed-authentication limit (tested
    # below, on a stack of its own) is off here.
    env = {
        "METERSTREAM_LOCAL_AUTH__ENABLED": "true",
        "METERSTREAM_LOCAL_AUTH__FAILED_AUTH_PER_MINUTE": "0",
        "METERSTREAM_LOCAL_AUTH__CORS_ORIGINS": '["https://app.example"]',
    }
    stack = LocalStack(tmp_path_factory.mktemp("access") / "data", env=env)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def creds(stack: LocalStack) -> dict[str, str | None]:
    admin = (stack.data_dir / "admin.key").read_text().strip()
    assert (stack.data_dir / "admin.key").stat().st_mode & 0o077 == 0, "the key file is for its owner only"
    h = {"Authorization": f"Bearer {admin}"}

    def key(scope: str) -> str:
        r = httpx.post(f"{stack.url}/api/v1/keys", json={"name": scope, "scopes": [scope]}, headers=h, timeout=30)
        assert r.status_code == 201, r.text
        token: str = r.json()["key"]
        return token

    revoked = key("read")
    revoked_id = revoked.split("_")[2]
    assert httpx.delete(f"{stack.url}/api/v1/keys/{revoked_id}", headers=h, timeout=30).status_code == 204
    r = httpx.post(f"{stack.url}/api/v1/portal/tokens", json={"subject": "alice"}, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    return {
        "none": None,
        "bad": "ms_admin_01J5Z3T0E6G9K3J6V9K6Y3S8QH_" + "x" * 43,
        "revoked": revoked,
        "ingest": key("ingest"),
        "read": key("read"),
        "admin": admin,
        "portal": r.json()["token"],
    }


def call(url: str, method: str, path: str, credential: str | None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    body = {"json": {}} if method in ("POST", "PUT") else {}
    return httpx.request(method, url + path, headers=headers, timeout=30, **body, **kw)


def test_every_route_of_the_document_with_every_credential(stack: LocalStack, creds: dict[str, str | None]) -> None:
    admin = {"Authorization": f"Bearer {creds['admin']}"}
    document = yaml.safe_load(httpx.get(f"{stack.url}/api/v1/openapi.yaml", headers=admin, timeout=30).text)
    documented = {(m.upper(), shape(p)) for p, ops in document["paths"].items() for m in ops if m != "parameters"}
    assert documented - NEEDS.keys() == set(), "routes without an entry in NEEDS"
    time.sleep(1.1)  # past the revoked key's cache horizon
    failures = []
    for (method, path), required in sorted(NEEDS.items()):
        for name, credential in creds.items():
            r = call(stack.url, method, concrete(path), credential)
            allowed = required in GRANTS[name]
            expected = "any but 401/403" if allowed else ("401" if name in ("none", "bad", "revoked") else "403")
            ok = r.status_code not in (401, 403) if allowed else str(r.status_code) == expected
            if r.status_code in (401, 403):
                assert r.headers["content-type"] == "application/problem+json"
                assert not credential or credential not in r.text, "a problem must never echo the key"
            if not ok:
                failures.append(f"{method} {path} with {name}: {r.status_code} (expected {expected}) {r.text[:100]}")
    assert not failures, "\n".join(failures)


def test_a_portal_token_sees_only_its_own_subject(stack: LocalStack, creds: dict[str, str | None]) -> None:
    admin = {"Authorization": f"Bearer {creds['admin']}"}
    now = datetime.now(UTC).replace(microsecond=0)
    events = [
        {"specversion": "1.0", "id": f"portal-{s}-{i}", "source": "access-test", "type": "llm.usage", "subject": s,
         "time": (now - timedelta(minutes=i)).isoformat().replace("+00:00", "Z"),
         "data": {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 100 * (i + 1), "output_tokens": 1}}
        for s in ("alice", "bob") for i in range(3)
    ]  # fmt: skip
    r = httpx.post(f"{stack.url}/api/v1/events", json=events, headers=admin, timeout=30)
    assert r.status_code == 204, r.text
    deadline = time.monotonic() + 30
    while True:
        q = httpx.get(f"{stack.url}/api/v1/meters/requests/query?groupBy=subject", headers=admin, timeout=30).json()
        if sum(row["value"] for row in q["data"] if row["subject"] in ("alice", "bob")) >= 6:
            break
        assert time.monotonic() < deadline
        time.sleep(0.3)
    alice_tokens = sum(100 * (i + 1) + 1 for i in range(3))
    portal = {"Authorization": f"Bearer {creds['portal']}"}
    attempts: list[list[tuple[str, str]]] = [
        [],
        [("subject", "bob")],
        [("subject", "bob"), ("subject", "alice")],
        [("groupBy", "subject")],
        [("filterGroupBy[subject]", "bob")],
        [("filterGroupBy", '{"subject": "bob"}')],
        [("advancedMeterGroupByFilters", '{"subject": {"$eq": "bob"}}')],
        [("advancedMeterGroupByFilters", '{"subject": {"$ne": "alice"}}')],
        [("windowSize", "MINUTE"), ("groupBy", "subject"), ("subject", "bob")],
    ]
    for params in attempts:
        r = httpx.get(f"{stack.url}/api/v1/portal/meters/tokens_total/query", params=params, headers=portal, timeout=30)
        assert r.status_code == 200, (params, r.text)
        rows = r.json()["data"]
        assert {row["subject"] for row in rows} <= {"alice", None}, params
        assert "bob" not in r.text
        assert sum(row["value"] for row in rows) == alice_tokens, params
        csv = httpx.get(
            f"{stack.url}/api/v1/portal/meters/tokens_total/query",
            params=params,
            headers={**portal, "Accept": "text/csv"},
            timeout=30,
        )
        assert csv.status_code == 200
        assert "bob" not in csv.text
    me = httpx.get(f"{stack.url}/api/v1/portal/me", headers=portal, timeout=30)
    assert me.json() == {"subject": "alice", "allowedMeterSlugs": None}
    post = httpx.post(f"{stack.url}/api/v1/portal/meters/tokens_total/query", json={"subject": ["bob"]}, headers=portal)
    assert post.status_code == 405  # the portal query is GET only
    for path in ("/api/v1/subjects/bob/entitlements", "/api/v1/subjects/bob/entitlements/tokens/value",
                 "/api/v1/meters/tokens_total/query", "/api/v1/events", "/api/v1/subjects"):  # fmt: skip
        assert httpx.get(f"{stack.url}{path}", headers=portal, timeout=30).status_code == 403, path
    # A token limited to some meters reads only those.
    r = httpx.post(
        f"{stack.url}/api/v1/portal/tokens",
        json={"subject": "alice", "allowedMeterSlugs": ["requests"]},
        headers=admin,
        timeout=30,
    )
    limited = {"Authorization": f"Bearer {r.json()['token']}"}
    assert httpx.get(f"{stack.url}/api/v1/portal/meters/requests/query", headers=limited, timeout=30).status_code == 200
    me = httpx.get(f"{stack.url}/api/v1/portal/me", headers=limited, timeout=30)
    assert me.json() == {"subject": "alice", "allowedMeterSlugs": ["requests"]}
    assert (
        httpx.get(f"{stack.url}/api/v1/portal/meters/tokens_total/query", headers=limited, timeout=30).status_code
        == 403
    )


def test_cors_answers_configured_origins_only(stack: LocalStack, creds: dict[str, str | None]) -> None:
    url = f"{stack.url}/api/v1/portal/meters/tokens_total/query"
    ask = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    preflight = httpx.options(url, headers={"Origin": "https://app.example", **ask}, timeout=30)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    other = httpx.options(url, headers={"Origin": "https://elsewhere.example", **ask}, timeout=30)
    assert "access-control-allow-origin" not in other.headers
    portal = {"Authorization": f"Bearer {creds['portal']}", "Origin": "https://app.example"}
    answer = httpx.get(url, headers=portal, timeout=30)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "https://app.example"


def test_expired_and_invalidated_portal_tokens_are_refused(stack: LocalStack, creds: dict[str, str | None]) -> None:
    admin = {"Authorization": f"Bearer {creds['admin']}"}
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    r = httpx.post(
        f"{stack.url}/api/v1/portal/tokens", json={"subject": "carol", "expiresAt": soon}, headers=admin, timeout=30
    )
    expiring = {"Authorization": f"Bearer {r.json()['token']}"}
    url = f"{stack.url}/api/v1/portal/meters/requests/query"
    assert httpx.get(url, headers=expiring, timeout=30).status_code == 200
    time.sleep(3.2)
    assert httpx.get(url, headers=expiring, timeout=30).status_code == 401
    r = httpx.post(f"{stack.url}/api/v1/portal/tokens", json={"subject": "dave"}, headers=admin, timeout=30)
    dave = r.json()
    assert httpx.get(url, headers={"Authorization": f"Bearer {dave['token']}"}, timeout=30).status_code == 200
    listed = httpx.get(f"{stack.url}/api/v1/portal/tokens", headers=admin, timeout=30).json()
    assert dave["id"] in {t["id"] for t in listed}
    assert all("token" not in t for t in listed), "a listed token never shows its secret"
    r = httpx.post(f"{stack.url}/api/v1/portal/tokens/invalidate", json={"subject": "dave"}, headers=admin, timeout=30)
    assert r.status_code == 204
    time.sleep(1.1)
    assert httpx.get(url, headers={"Authorization": f"Bearer {dave['token']}"}, timeout=30).status_code == 401


def test_openmeter_client_with_a_key_and_a_portal_token(stack: LocalStack, creds: dict[str, str | None]) -> None:
    assert creds["admin"] is not None
    client = Client(endpoint=stack.url, token=creds["admin"], retry_total=0)
    assert {m.slug for m in client.meters.list()} >= {"tokens_total"}
    token = client.portal.portal_tokens.create({"subject": "alice", "allowedMeterSlugs": ["tokens_total"]})
    assert token.subject == "alice"
    assert token.token is not None
    portal = Client(endpoint=stack.url, token=token.token, retry_total=0)
    result = portal.portal.portal_meters.query_json("tokens_total")
    assert {row.subject for row in result.data} <= {"alice", None}
    assert any(t.id == token.id for t in client.portal.portal_tokens.list())
    client.portal.portal_tokens.invalidate(id=token.id)
    from corehttp.exceptions import ClientAuthenticationError

    with pytest.raises(ClientAuthenticationError):
        Client(endpoint=stack.url, retry_total=0).meters.list()


def test_repeated_failed_authentication_is_slowed_down(tmp_path: Path) -> None:
    stack = LocalStack(
        tmp_path / "data",
        env={"METERSTREAM_LOCAL_AUTH__ENABLED": "true", "METERSTREAM_LOCAL_AUTH__FAILED_AUTH_PER_MINUTE": "5",
             "METERSTREAM_LOCAL_AUTH__RATE_LIMIT_PER_S": "1", "METERSTREAM_LOCAL_AUTH__RATE_LIMIT_BURST": "3"},
    ).start()  # fmt: skip
    try:
        admin = (stack.data_dir / "admin.key").read_text().strip()
        burst = [call(stack.url, "GET", "/api/v1/meters", admin) for _ in range(12)]
        limited = [r for r in burst if r.status_code == 429]
        assert limited, "the key's rate limit (1/s, burst 3) must refuse part of a burst of 12"
        assert all(int(r.headers["retry-after"]) >= 1 for r in limited)
        assert burst[0].status_code == 200
        bad = "ms_read_01J5Z3T0E6G9K3J6V9K6Y3S8QH_" + "y" * 43
        codes = [call(stack.url, "GET", "/api/v1/meters", bad).status_code for _ in range(7)]
        assert codes[:5] == [401] * 5
        blocked = call(stack.url, "GET", "/api/v1/meters", "anything")
        assert blocked.status_code == 429
        assert int(blocked.headers["retry-after"]) > 0
        time.sleep(1.2)  # the key's bucket refills; the address stays blocked whatever it sends
        assert call(stack.url, "GET", "/api/v1/meters", admin).status_code == 429
    finally:
        stack.stop()


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[MultiProcessStack]:
    stack = MultiProcessStack(
        tmp_path / "stack",
        control=True,
        extra_env={
            "METERSTREAM_INGEST_AUTH__ENABLED": "true",
            "METERSTREAM_SINK_AUTH__ENABLED": "true",
            "METERSTREAM_INGEST_AUTH__ADMIN_KEY": "ms_admin_"
            + "0" * 26
            + "_bootstrap-secret-of-the-deployment-0123456789",
            "METERSTREAM_SINK_AUTH__ADMIN_KEY": "ms_admin_"
            + "0" * 26
            + "_bootstrap-secret-of-the-deployment-0123456789",
        },
    )
    yield from stack.running()


def test_a_revoked_key_stops_working_everywhere_within_a_second(topology: MultiProcessStack) -> None:
    bootstrap = {"Authorization": "Bearer ms_admin_" + "0" * 26 + "_bootstrap-secret-of-the-deployment-0123456789"}
    r = httpx.post(
        f"{topology.query_url}/api/v1/keys", json={"name": "app", "scopes": ["ingest"]}, headers=bootstrap, timeout=30
    )
    assert r.status_code == 201, r.text
    key = r.json()
    event = {"specversion": "1.0", "id": "rev-1", "source": "access", "type": "llm.usage", "subject": "s",
             "data": {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 1, "output_tokens": 1}}  # fmt: skip
    ingest = f"{topology.ingest_url}/api/v1/events"
    auth = {"Authorization": f"Bearer {key['key']}", "Content-Type": "application/cloudevents+json"}
    assert httpx.post(ingest, json=event, headers=auth, timeout=30).status_code == 204  # cached in ingest now
    assert httpx.post(ingest, json=event, timeout=30).status_code == 401
    revoked_at = time.monotonic()
    assert (
        httpx.delete(f"{topology.query_url}/api/v1/keys/{key['id']}", headers=bootstrap, timeout=30).status_code == 204
    )
    while (
        httpx.post(ingest, json={**event, "id": f"rev-{time.monotonic()}"}, headers=auth, timeout=30).status_code != 401
    ):
        assert time.monotonic() - revoked_at < 1.5, "a revoked key must stop working within a second"
        time.sleep(0.05)
    assert time.monotonic() - revoked_at <= 1.5
    wait_ready(f"{topology.query_url}/readyz", 10)

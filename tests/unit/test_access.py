"""Access rules (pure logic): key format, what each route needs, scope checks, the key cache and its
behaviour while the store is away, rate and failed-authentication limits."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from control.access import (
    ApiKey,
    Authenticator,
    FailedAuthLimiter,
    Need,
    PortalToken,
    Principal,
    RateLimiter,
    Scope,
    check,
    issue,
    need,
    parse_token,
)
from control.errors import StoreUnavailable
from schemas.problems import Problem

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_issued_keys_parse_and_keep_only_a_hash() -> None:
    issued = issue("read")
    kind, public, secret = parse_token(issued.token) or ("", "", "")
    assert (kind, public) == ("read", issued.id)
    assert secret not in issued.secret_sha256.hex()
    assert len(secret) >= 43  # 256 random bits, base64url
    for bad in (
        "",
        "ms_read",
        "ms_read_short_x",
        "xx_read_" + issued.id + "_" + secret,
        "ms_read_" + issued.id + "_abc",
    ):
        assert parse_token(bad) is None


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/healthz", Need.PUBLIC),
        ("POST", "/api/v1/events", Need.INGEST),
        ("GET", "/api/v1/events", Need.READ),
        ("POST", "/api/v1/meters/{meter}/query", Need.READ),
        ("GET", "/api/v1/admin/reconcile", Need.ADMIN),
        ("GET", "/api/v1/keys", Need.ADMIN),
        ("GET", "/api/v1/portal/tokens", Need.ADMIN),
        ("GET", "/api/v1/portal/meters/{meter}/query", Need.PORTAL),
        ("GET", "/api/v1/subjects/{subject}/entitlements/{ref}/value", Need.PORTAL_OR_READ),
        ("POST", "/api/v1/features", Need.ADMIN),
        ("DELETE", "/api/v1/grants/{grantId}", Need.ADMIN),
        ("PUT", "/api/v1/plans/{planKey}", Need.ADMIN),
        ("GET", "/api/v1/notification/channels", Need.ADMIN),
        ("POST", "/api/v1/notification/channels", Need.ADMIN),
        ("GET", "/api/v1/notification/channels/{channelId}", Need.ADMIN),
        ("PUT", "/api/v1/notification/channels/{channelId}", Need.ADMIN),
        ("DELETE", "/api/v1/notification/channels/{channelId}", Need.ADMIN),
        ("GET", "/api/v1/notification/rules", Need.READ),
        ("POST", "/api/v1/notification/rules", Need.ADMIN),
        ("GET", "/api/v1/notification/rules/{ruleId}", Need.READ),
        ("PUT", "/api/v1/notification/rules/{ruleId}", Need.ADMIN),
        ("DELETE", "/api/v1/notification/rules/{ruleId}", Need.ADMIN),
        ("POST", "/api/v1/notification/rules/{ruleId}/test", Need.ADMIN),
        ("GET", "/api/v1/notification/events", Need.READ),
        ("GET", "/api/v1/notification/events/{eventId}", Need.READ),
        ("POST", "/api/v1/notification/events/{eventId}/resend", Need.ADMIN),
    ],
)
def test_what_each_route_needs(method: str, path: str, expected: Need) -> None:
    assert need(method, path) is expected


def test_scopes_and_portal_tokens() -> None:
    admin = Principal("a", frozenset({Scope.ADMIN}))
    reader = Principal("r", frozenset({Scope.READ}))
    ingester = Principal("i", frozenset({Scope.INGEST}))
    portal = Principal("p", subject="alice")
    for principal in (admin, reader):
        check(principal, Need.READ, None)
    check(admin, Need.INGEST, None)
    check(ingester, Need.INGEST, None)
    check(portal, Need.PORTAL, None)
    check(portal, Need.PORTAL_OR_READ, "alice")
    check(reader, Need.PORTAL_OR_READ, "bob")
    for principal, required, subject, status in [
        (None, Need.READ, None, 401),
        (reader, Need.ADMIN, None, 403),
        (reader, Need.INGEST, None, 403),
        (ingester, Need.READ, None, 403),
        (portal, Need.READ, None, 403),
        (portal, Need.PORTAL_OR_READ, "bob", 403),
        (admin, Need.PORTAL, None, 403),
    ]:
        with pytest.raises(Problem) as raised:
            check(principal, required, subject)
        assert raised.value.status == status


class Keys:
    """A key store for the Authenticator: a dict, and a switch that makes it unreachable."""

    def __init__(self) -> None:
        self.records: dict[str, ApiKey | PortalToken] = {}
        self.lookups = 0
        self.down = False
        self.stall = False

    async def lookup(self, kind: str, public_id: str) -> ApiKey | PortalToken | None:
        self.lookups += 1
        if self.stall:
            await asyncio.sleep(60)
        if self.down:
            raise StoreUnavailable("down")
        return self.records.get(public_id)


def add_key(keys: Keys, scopes: frozenset[Scope]) -> str:
    issued = issue("admin")
    keys.records[issued.id] = ApiKey(issued.id, "k", scopes, issued.secret_sha256, NOW)
    return issued.token


async def test_positive_checks_are_cached_for_cache_s_and_revocation_then_applies() -> None:
    keys = Keys()
    token = add_key(keys, frozenset({Scope.READ}))
    auth = Authenticator(keys.lookup, cache_s=0.2)
    principal = await auth.authenticate(f"Bearer {token}")
    assert principal is not None
    assert principal.scopes == {Scope.READ}
    await auth.authenticate(f"Bearer {token}")
    assert keys.lookups == 1
    record = keys.records[principal.id]
    assert isinstance(record, ApiKey)
    keys.records[principal.id] = ApiKey(record.id, record.name, record.scopes, record.secret_sha256, NOW, NOW)
    await asyncio.sleep(0.25)
    with pytest.raises(Problem, match="revoked"):
        await auth.authenticate(f"Bearer {token}")
    wrong_secret = token[:-5] + "AAAAA"
    with pytest.raises(Problem) as raised:
        await auth.authenticate(f"Bearer {wrong_secret}")
    assert raised.value.status == 401
    assert await auth.authenticate(None) is None
    with pytest.raises(Problem):
        await auth.authenticate("Basic dXNlcjpwYXNz")


async def test_a_key_seen_recently_survives_a_store_outage_and_an_unseen_one_is_503() -> None:
    keys = Keys()
    seen = add_key(keys, frozenset({Scope.INGEST}))
    unseen = add_key(keys, frozenset({Scope.INGEST}))
    auth = Authenticator(keys.lookup, cache_s=0.05, lookup_timeout_s=0.1, grace_s=5)
    assert await auth.authenticate(f"Bearer {seen}") is not None
    await asyncio.sleep(0.06)
    keys.down = True
    assert await auth.authenticate(f"Bearer {seen}") is not None
    with pytest.raises(StoreUnavailable):
        await auth.authenticate(f"Bearer {unseen}")
    keys.down, keys.stall = False, True  # a server that does not answer at all: timed out, same rule
    assert await auth.authenticate(f"Bearer {seen}") is not None
    with pytest.raises(StoreUnavailable):
        await auth.authenticate(f"Bearer {unseen}")


async def test_portal_tokens_expire_and_are_invalidated() -> None:
    keys = Keys()
    issued = issue("portal")
    clock = [NOW]
    keys.records[issued.id] = PortalToken(issued.id, "alice", None, issued.secret_sha256, NOW, NOW + timedelta(hours=1))
    auth = Authenticator(keys.lookup, cache_s=0.01, clock=lambda: clock[0])
    principal = await auth.authenticate(f"Bearer {issued.token}")
    assert principal is not None
    assert principal.subject == "alice"
    clock[0] = NOW + timedelta(hours=2)
    await asyncio.sleep(0.02)
    with pytest.raises(Problem, match="expired"):
        await auth.authenticate(f"Bearer {issued.token}")


def test_bootstrap_admin_key() -> None:
    auth = Authenticator(Keys().lookup, bootstrap_admin_key="x" * 40)
    principal = asyncio.run(auth.authenticate("Bearer " + "x" * 40))
    assert principal is not None
    assert principal.allows(Scope.ADMIN)


def test_rate_limiter_token_bucket() -> None:
    limiter = RateLimiter(rate_per_s=2, burst=3)
    assert [limiter.retry_after("k", now=0.0) for _ in range(4)] == [0, 0, 0, pytest.approx(0.5)]
    assert limiter.retry_after("k", now=0.5) == 0  # one token back after half a second
    assert limiter.retry_after("other", now=0.5) == 0
    assert RateLimiter(0, 1).retry_after("k") == 0  # off


def test_failed_auth_limiter_blocks_for_the_rest_of_the_minute() -> None:
    limiter = FailedAuthLimiter(limit=3)
    for t in (0.0, 1.0, 2.0):
        assert limiter.blocked_for("1.2.3.4", now=t) == 0
        limiter.failed("1.2.3.4", now=t)
    assert limiter.blocked_for("1.2.3.4", now=10.0) == pytest.approx(50.0)
    assert limiter.blocked_for("5.6.7.8", now=10.0) == 0
    assert limiter.blocked_for("1.2.3.4", now=61.0) == 0  # the first failure left the window

"""Who may do what: API keys with scopes, per-subject portal tokens, and the scope each route needs.

A key or token is ``ms_<kind>_<public id>_<secret>``: the kind says what it is at a glance (``admin``,
``read``, ``ingest``, or ``portal``), the public id (a ULID) finds its record, and the secret (256 random
bits) proves it. Only the SHA-256 of the secret is stored (a random 256-bit secret needs no slow hash) and
it is compared in constant time. A positive check is remembered for at most ``cache_s`` (1 s), so a revoked
key stops working everywhere within that time, in every process.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final

from ulid import ULID

from control.errors import StoreUnavailable
from schemas.problems import Problem


class Scope(StrEnum):
    INGEST = "ingest"
    READ = "read"
    ADMIN = "admin"


#: What each scope may also do: admin everything, the others only themselves.
IMPLIES: Final = {
    Scope.ADMIN: frozenset(Scope),
    Scope.READ: frozenset({Scope.READ}),
    Scope.INGEST: frozenset({Scope.INGEST}),
}
PORTAL: Final = "portal"


@dataclass(frozen=True, slots=True)
class Issued:
    """A new key or token: the only moment its secret exists outside the caller's hands."""

    id: str
    token: str
    secret_sha256: bytes


def issue(kind: str) -> Issued:
    public = str(ULID())
    secret = secrets.token_urlsafe(32)
    return Issued(public, f"ms_{kind}_{public}_{secret}", sha256(secret))


def sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_token(token: str) -> tuple[str, str, str] | None:
    """``(kind, public id, secret)`` of a well-formed key or token, else None."""
    parts = token.split("_", 3)
    if len(parts) != 4 or parts[0] != "ms" or len(parts[2]) != 26 or len(parts[3]) < 32:
        return None
    return parts[1], parts[2], parts[3]


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    scopes: frozenset[Scope]
    secret_sha256: bytes
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PortalToken:
    id: str
    subject: str
    allowed_meter_slugs: tuple[str, ...] | None
    secret_sha256: bytes
    created_at: datetime
    expires_at: datetime
    invalidated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a key (its scopes) or a portal token (its subject and meters)."""

    id: str
    scopes: frozenset[Scope] = frozenset()
    #: Set for a portal token: the only subject it may see.
    subject: str | None = None
    allowed_meter_slugs: tuple[str, ...] | None = None

    @property
    def is_portal(self) -> bool:
        return self.subject is not None

    def allows(self, scope: Scope) -> bool:
        return any(scope in IMPLIES[s] for s in self.scopes)


#: The access the bootstrap admin key (a secret given in the configuration) has.
BOOTSTRAP = Principal(id="bootstrap", scopes=frozenset({Scope.ADMIN}))


class Need(StrEnum):
    """What a route needs."""

    PUBLIC = "public"
    INGEST = "ingest"
    READ = "read"
    ADMIN = "admin"
    #: A portal token (for its own subject), or a read key.
    PORTAL_OR_READ = "portal-or-read"
    #: A portal token only.
    PORTAL = "portal"


_PUBLIC: Final = frozenset({"/healthz", "/readyz"})
#: Routes a portal token may read, for the subject in the path, besides the portal's own.
_PORTAL_READABLE: Final = frozenset(
    {
        ("GET", "/api/v1/subjects/{subject}/entitlements"),
        ("GET", "/api/v1/subjects/{subject}/entitlements/{ref}/value"),
    }
)


#: Routes of reservations (and the estimate that sizes them), beside /api/v1/reservations/...
_RESERVING: Final = frozenset({"/api/v1/subjects/{subject}/reservations", "/api/v1/estimate"})


def need(method: str, path: str) -> Need:
    """The access ``method path`` (a route's path template) needs."""
    if path in _PUBLIC or path == "/ui" or path.startswith("/ui/"):
        return Need.PUBLIC  # the pages carry no data: they call the API with the visitor's credential
    if path.startswith("/api/v1/portal/meters/") or path == "/api/v1/portal/me":
        return Need.PORTAL
    if path.startswith(("/api/v1/admin/", "/api/v1/keys", "/api/v1/portal/tokens", "/api/v1/notification/channels")):
        return Need.ADMIN  # notification channels too: their signing secrets and headers are credentials
    if method == "POST" and path == "/api/v1/events":
        return Need.INGEST
    if path.startswith("/api/v1/reservations/") or path in _RESERVING:
        return Need.INGEST  # whoever records an app's usage may also reserve before its calls
    if (method, path) in _PORTAL_READABLE:
        return Need.PORTAL_OR_READ
    if method in ("GET", "HEAD"):
        return Need.READ
    if method == "POST" and path.endswith("/query"):
        return Need.READ  # a meter query sent as a POST body reads
    return Need.ADMIN


def check(principal: Principal | None, required: Need, path_subject: str | None) -> None:
    """Raise 401 (no or bad credentials) or 403 (valid ones without the access) as problem+json."""
    if required is Need.PUBLIC:
        return
    if principal is None:
        raise unauthorized("an API key is required: send Authorization: Bearer <key>")
    if principal.is_portal:
        if required is Need.PORTAL or (required is Need.PORTAL_OR_READ and path_subject == principal.subject):
            return
        raise Problem(403, "a portal token may only read its own subject's usage and entitlement values")
    if required is Need.PORTAL:
        raise Problem(403, "this endpoint takes a portal token (POST /api/v1/portal/tokens makes one)")
    scope = {Need.INGEST: Scope.INGEST, Need.ADMIN: Scope.ADMIN}.get(required, Scope.READ)
    if not principal.allows(scope):
        raise Problem(403, f"this key may not do this: it needs the {scope.value} scope")


def unauthorized(detail: str) -> Problem:
    return Problem(401, detail, headers={"WWW-Authenticate": 'Bearer realm="meterstream"'})


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class RateLimiter:
    """A token bucket per key: ``rate_per_s`` sustained, ``burst`` at once (0: no limit)."""

    rate_per_s: float
    burst: float
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def retry_after(self, key: str, now: float | None = None) -> float:
        """0 when the request may go now (and it is counted), else the seconds until it may."""
        if self.rate_per_s <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate_per_s)
        bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate_per_s


@dataclass(slots=True)
class FailedAuthLimiter:
    """Failed authentications per client address in a sliding minute; past ``limit`` the address is
    refused (429) without its credentials being looked at, until the minute has passed."""

    limit: int
    window_s: float = 60.0
    _failures: dict[str, list[float]] = field(default_factory=dict)

    def blocked_for(self, address: str, now: float | None = None) -> float:
        if self.limit <= 0 or address not in self._failures:
            return 0.0
        now = time.monotonic() if now is None else now
        recent = [t for t in self._failures.get(address, []) if now - t < self.window_s]
        if recent:
            self._failures[address] = recent
        else:
            self._failures.pop(address, None)
        return self.window_s - (now - recent[0]) if len(recent) >= self.limit else 0.0

    def failed(self, address: str, now: float | None = None) -> None:
        if self.limit > 0:
            self._failures.setdefault(address, []).append(time.monotonic() if now is None else now)
        if len(self._failures) > 100_000:  # bounded memory under a flood of addresses
            self._failures.clear()


#: Looks a key or portal token up by its public id (None: no such record).
KeyLookup = Callable[[str, str], Awaitable[ApiKey | PortalToken | None]]


class Authenticator:
    """Bearer keys and portal tokens checked against the store, positive answers reused for ``cache_s``.

    While the store cannot be reached (or does not answer within ``lookup_timeout_s``), a key that was
    valid at its last check within ``grace_s`` stays valid, so ingest and usage queries keep working
    through a PostgreSQL outage; a key never seen or seen only longer ago is answered 503. A revocation
    needs the store, so it takes effect within ``cache_s`` of its commit whenever the store answers.
    """

    def __init__(
        self,
        lookup: KeyLookup,
        *,
        bootstrap_admin_key: str | None = None,
        cache_s: float = 1.0,
        lookup_timeout_s: float = 2.0,
        grace_s: float = 600.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._lookup = lookup
        self._bootstrap = sha256(bootstrap_admin_key) if bootstrap_admin_key else None
        self._cache_s = cache_s
        self._lookup_timeout_s = lookup_timeout_s
        self._grace_s = grace_s
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._clock = clock

    def known_good(self, authorization: str | None) -> bool:
        """The header carries a key that passed a check within ``cache_s`` (no lookup made)."""
        token = (authorization or "").partition(" ")[2].strip()
        cached = self._cache.get(token)
        return cached is not None and time.monotonic() - cached[1] < self._cache_s

    async def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal of an ``Authorization`` header; None without one. Raises 401 for a bad one."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("send the key as Authorization: Bearer <key>")
        token = token.strip()
        if self._bootstrap is not None and hmac.compare_digest(sha256(token), self._bootstrap):
            return BOOTSTRAP
        cached = self._cache.get(token)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self._cache_s:
            return cached[0]
        try:
            principal = await asyncio.wait_for(self._verify(token), self._lookup_timeout_s)
        except (StoreUnavailable, TimeoutError):
            if cached is not None and now - cached[1] < self._grace_s:
                return cached[0]  # valid at its last check; the store is away (see the class docstring)
            raise StoreUnavailable("keys cannot be checked now (PostgreSQL is not reachable)") from None
        except Problem:
            self._cache.pop(token, None)
            raise
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token] = (principal, now)
        return principal

    async def _verify(self, token: str) -> Principal:
        parsed = parse_token(token)
        if parsed is None:
            raise unauthorized("the key is not valid")
        kind, public, secret = parsed
        record = await self._lookup(kind, public)
        if record is None or not hmac.compare_digest(sha256(secret), record.secret_sha256):
            raise unauthorized("the key is not valid")
        if isinstance(record, ApiKey):
            if record.revoked_at is not None:
                raise unauthorized("the key has been revoked")
            return Principal(id=record.id, scopes=record.scopes)
        now = self._clock() if self._clock else datetime.now(record.expires_at.tzinfo)
        if record.invalidated_at is not None:
            raise unauthorized("the portal token has been invalidated")
        if record.expires_at <= now:
            raise unauthorized("the portal token has expired")
        return Principal(id=record.id, subject=record.subject, allowed_meter_slugs=record.allowed_meter_slugs)


def scopes_of(names: Sequence[str]) -> frozenset[Scope]:
    """Scope names as scopes (ValueError for an unknown one)."""
    return frozenset(Scope(n) for n in names)

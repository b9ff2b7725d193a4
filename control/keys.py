"""Managing API keys and portal tokens (the records the :class:`control.access.Authenticator` checks)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from control.access import ApiKey, Issued, PortalToken, Scope, issue
from control.store import ControlStore
from schemas.problems import Problem, bad

#: A portal token lives this long unless asked otherwise (and at most MAX_PORTAL_TTL).
DEFAULT_PORTAL_TTL: Final = timedelta(hours=24)
MAX_PORTAL_TTL: Final = timedelta(days=365)


class KeyService:
    def __init__(self, store: ControlStore) -> None:
        self._store = store

    async def create_key(self, name: str, scopes: Sequence[str]) -> tuple[ApiKey, str]:
        """A new key and its secret token (shown this once, never stored)."""
        if not scopes:
            raise bad("scopes", "at least one of admin, read, ingest")
        try:
            chosen = frozenset(Scope(s) for s in scopes)
        except ValueError:
            raise bad("scopes", f"unknown scope in {list(scopes)}; use admin, read or ingest") from None
        kind = "admin" if Scope.ADMIN in chosen else "read" if Scope.READ in chosen else "ingest"
        issued: Issued = issue(kind)
        key = ApiKey(issued.id, name, chosen, issued.secret_sha256, datetime.now(UTC))
        async with self._store.tx() as tx:
            await tx.insert_key(key)
        return key, issued.token

    async def keys(self) -> list[ApiKey]:
        async with self._store.tx() as tx:
            return await tx.keys()

    async def revoke_key(self, key_id: str) -> None:
        async with self._store.tx() as tx:
            if await tx.key(key_id) is None:
                raise Problem(404, f"key {key_id} not found")
            await tx.revoke_key(key_id, datetime.now(UTC))

    async def create_portal_token(
        self, subject: str, allowed_meter_slugs: Sequence[str] | None, expires_at: datetime | None
    ) -> tuple[PortalToken, str]:
        now = datetime.now(UTC)
        expires = expires_at or now + DEFAULT_PORTAL_TTL
        if expires <= now:
            raise bad("expiresAt", "must be in the future")
        if expires - now > MAX_PORTAL_TTL:
            raise bad("expiresAt", "at most a year ahead")
        issued = issue("portal")
        slugs = tuple(allowed_meter_slugs) if allowed_meter_slugs is not None else None
        token = PortalToken(issued.id, subject, slugs, issued.secret_sha256, now, expires)
        async with self._store.tx() as tx:
            await tx.insert_portal_token(token)
        return token, issued.token

    async def portal_tokens(self, limit: int) -> list[PortalToken]:
        async with self._store.tx() as tx:
            return await tx.portal_tokens(limit)

    async def invalidate_portal_tokens(self, token_id: str | None, subject: str | None) -> int:
        if token_id is None and subject is None:
            raise bad("id", "give the id of a token, or a subject (all its tokens)")
        async with self._store.tx() as tx:
            return await tx.invalidate_portal_tokens(token_id, subject, datetime.now(UTC))

    async def lookup(self, kind: str, public_id: str) -> ApiKey | PortalToken | None:
        """The record behind a presented key or token (for the Authenticator)."""
        async with self._store.tx() as tx:
            if kind == "portal":
                return await tx.portal_token(public_id)
            return await tx.key(public_id)

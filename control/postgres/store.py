"""The control plane's store on PostgreSQL (psycopg 3, an async connection pool). The only code that
imports the PostgreSQL driver, besides the migrations beside it.

Every operation runs inside a transaction handed out by :meth:`PostgresStore.tx`; a unit of work that
must see and change several rows atomically (assigning a plan, creating a subject's first entitlements)
takes the subject's advisory lock first (:meth:`PgTx.lock_subject`), so concurrent requests for one subject
serialise while others run in parallel. A lost connection or an unreachable server raises
:class:`StoreUnavailable` (answered 503 with Retry-After); the pool reconnects on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from control.access import ApiKey, PortalToken, scopes_of
from control.listing import Listing
from control.model import (
    Entitlement,
    EntitlementType,
    Feature,
    Grant,
    HoldLine,
    Plan,
    Reservation,
    ReservationStatus,
    Subject,
    SubjectPlan,
    UsageReset,
)
from control.periods import Interval, RecurringPeriod
from control.postgres.alerts import AlertSql
from control.postgres.meters import MeterSql
from control.postgres.schema import migrate
from control.store import Conflict, ReserveState, StoreUnavailable

log = logging.getLogger(__name__)

_FEATURE_ORDER: Final = {"id": "id", "key": "key", "name": "name", "createdAt": "created_at", "updatedAt": "updated_at"}
_ENTITLEMENT_ORDER: Final = {"id": "id", "createdAt": "created_at", "updatedAt": "updated_at"}
_GRANT_ORDER: Final = {"id": "g.id", "createdAt": "g.created_at", "updatedAt": "g.updated_at"}


def apply_migrations(dsn: str, timeout_s: float = 10.0) -> list[int]:
    """Apply the schema migrations (synchronously: from the CLI, and from a store before its first use)."""
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(timeout_s))) as conn:
            return migrate(conn)
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"PostgreSQL is not reachable: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _period(interval: str | None, anchor: datetime | None, time_zone: str | None) -> RecurringPeriod | None:
    if interval is None or anchor is None:
        return None
    return RecurringPeriod(Interval.parse(interval), anchor, time_zone or "UTC")


def _feature(r: DictRow) -> Feature:
    return Feature(
        id=r["id"],
        key=r["key"],
        name=r["name"],
        meter_slug=r["meter_slug"],
        filters=r["meter_group_by_filters"] or {},
        metadata=r["metadata"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        archived_at=r["archived_at"],
    )


def _subject(r: DictRow) -> Subject:
    return Subject(
        id=r["id"],
        key=r["key"],
        display_name=r["display_name"],
        metadata=r["metadata"],
        current_period_start=r["current_period_start"],
        current_period_end=r["current_period_end"],
        stripe_customer_id=r["stripe_customer_id"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


def _entitlement(r: DictRow) -> Entitlement:
    return Entitlement(
        id=r["id"],
        subject_key=r["subject_key"],
        feature_id=r["feature_id"],
        feature_key=r["feature_key"],
        type=EntitlementType(r["type"]),
        usage_period=_period(r["usage_period_interval"], r["usage_period_anchor"], r["usage_period_time_zone"]),
        measure_usage_from=r["measure_usage_from"],
        is_soft_limit=r["is_soft_limit"],
        is_unlimited=r["is_unlimited"],
        issue_after_reset=r["issue_after_reset"],
        issue_after_reset_priority=r["issue_after_reset_priority"],
        preserve_overage_at_reset=r["preserve_overage_at_reset"],
        config=r["config"],
        metadata=r["metadata"],
        plan_key=r["plan_key"],
        plan_template=r["plan_template"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        deleted_at=r["deleted_at"],
    )


def _grant(r: DictRow) -> Grant:
    return Grant(
        id=r["id"],
        entitlement_id=r["entitlement_id"],
        amount=r["amount"],
        priority=r["priority"],
        effective_at=r["effective_at"],
        expiration_duration=r["expiration_duration"],
        expiration_count=r["expiration_count"],
        expires_at=r["expires_at"],
        max_rollover_amount=r["max_rollover_amount"],
        min_rollover_amount=r["min_rollover_amount"],
        recurrence=_period(r["recurrence_interval"], r["recurrence_anchor"], r["recurrence_time_zone"]),
        metadata=r["metadata"],
        annotations=r["annotations"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        voided_at=r["voided_at"],
    )


def _plan(r: DictRow) -> Plan:
    return Plan(
        id=r["id"],
        key=r["key"],
        name=r["name"],
        description=r["description"],
        version=r["version"],
        entitlements=tuple(r["entitlements"]),
        metadata=r["metadata"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        deleted_at=r["deleted_at"],
    )


def _json(value: Mapping[str, Any] | None) -> Jsonb | None:
    return None if value is None else Jsonb(dict(value))


class PgTx(AlertSql, MeterSql):
    """The store's operations inside one transaction."""

    async def lock_subject(self, subject_key: str) -> None:
        """Serialise this transaction with every other that locks the same subject (until it ends)."""
        await self._conn.execute(b"SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))", (subject_key,))

    # -- features --------------------------------------------------------------------------------------

    async def insert_feature(self, f: Feature) -> None:
        await self._write(
            "INSERT INTO features (id, key, name, meter_slug, meter_group_by_filters, metadata, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (f.id, f.key, f.name, f.meter_slug, Jsonb(dict(f.filters)), _json(f.metadata), f.created_at, f.updated_at),
            f"a feature with key {f.key} already exists",
        )

    async def feature(self, id_or_key: str, include_archived: bool = True) -> Feature | None:
        """By id, else the live feature with this key, else (if allowed) the latest archived one."""
        row = await self._one(
            "SELECT * FROM features WHERE id = %(k)s OR key = %(k)s "
            "ORDER BY id = %(k)s DESC, archived_at IS NULL DESC, archived_at DESC LIMIT 1",
            {"k": id_or_key},
        )
        if row is None or (row["archived_at"] is not None and not include_archived):
            return None
        return _feature(row)

    async def features(
        self,
        *,
        meter_slugs: Sequence[str],
        include_archived: bool,
        listing: Listing,
    ) -> tuple[list[Feature], int]:
        where, params = ["TRUE"], {}
        if meter_slugs:
            where.append("meter_slug = ANY(%(slugs)s)")
            params["slugs"] = list(meter_slugs)
        if not include_archived:
            where.append("archived_at IS NULL")
        rows, total = await self._page("* FROM features", where, params, _FEATURE_ORDER, listing)
        return [_feature(r) for r in rows], total

    async def archive_feature(self, feature_id: str, at: datetime) -> None:
        await self._conn.execute(
            b"UPDATE features SET archived_at = %s, updated_at = %s WHERE id = %s AND archived_at IS NULL",
            (at, at, feature_id),
        )

    # -- subjects --------------------------------------------------------------------------------------

    async def upsert_subject(self, s: Subject, fields: Sequence[str]) -> Subject:
        """Insert, or update only ``fields`` (API names mapped to columns) of an existing subject."""
        columns = {
            "displayName": "display_name",
            "metadata": "metadata",
            "currentPeriodStart": "current_period_start",
            "currentPeriodEnd": "current_period_end",
            "stripeCustomerId": "stripe_customer_id",
        }
        values = {
            "display_name": s.display_name,
            "metadata": _json(s.metadata),
            "current_period_start": s.current_period_start,
            "current_period_end": s.current_period_end,
            "stripe_customer_id": s.stripe_customer_id,
        }
        updates = "".join(f", {columns[f]} = EXCLUDED.{columns[f]}" for f in fields if f in columns)
        row = await self._one(
            "INSERT INTO subjects (id, key, display_name, metadata, current_period_start, current_period_end, "
            "stripe_customer_id, created_at, updated_at) VALUES (%(id)s, %(key)s, %(display_name)s, %(metadata)s, "
            "%(current_period_start)s, %(current_period_end)s, %(stripe_customer_id)s, %(now)s, %(now)s) "
            f"ON CONFLICT (key) DO UPDATE SET updated_at = EXCLUDED.updated_at{updates} RETURNING *",
            {"id": s.id, "key": s.key, "now": s.updated_at, **values},
        )
        assert row is not None
        return _subject(row)

    async def subject(self, id_or_key: str) -> Subject | None:
        row = await self._one(
            "SELECT * FROM subjects WHERE key = %(k)s OR id = %(k)s ORDER BY key = %(k)s DESC LIMIT 1", {"k": id_or_key}
        )
        return _subject(row) if row else None

    async def subjects(self) -> list[Subject]:
        return [_subject(r) for r in await self._all("SELECT * FROM subjects ORDER BY key")]

    async def delete_subject(self, key: str) -> bool:
        cur = await self._conn.execute(b"DELETE FROM subjects WHERE key = %s", (key,))
        return cur.rowcount > 0

    # -- entitlements ----------------------------------------------------------------------------------

    async def insert_entitlement(self, e: Entitlement) -> None:
        period = e.usage_period
        await self._write(
            "INSERT INTO entitlements (id, subject_key, feature_id, feature_key, type, usage_period_interval, "
            "usage_period_anchor, usage_period_time_zone, measure_usage_from, is_soft_limit, is_unlimited, "
            "issue_after_reset, issue_after_reset_priority, preserve_overage_at_reset, config, metadata, plan_key, "
            "plan_template, created_at, updated_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                e.id,
                e.subject_key,
                e.feature_id,
                e.feature_key,
                e.type.value,
                period.interval.iso if period else None,
                period.anchor if period else None,
                period.time_zone if period else None,
                e.measure_usage_from,
                e.is_soft_limit,
                e.is_unlimited,
                e.issue_after_reset,
                e.issue_after_reset_priority,
                e.preserve_overage_at_reset,
                e.config,
                _json(e.metadata),
                e.plan_key,
                e.plan_template,
                e.created_at,
                e.updated_at,
            ),
            f"subject {e.subject_key} already has an entitlement for feature {e.feature_key}",
        )

    async def entitlement(self, entitlement_id: str) -> Entitlement | None:
        row = await self._one("SELECT * FROM entitlements WHERE id = %s", (entitlement_id,))
        return _entitlement(row) if row else None

    async def live_entitlement(self, subject_key: str, id_or_feature_key: str) -> Entitlement | None:
        """The subject's live entitlement with this id or feature key (an id may also name a deleted one)."""
        row = await self._one(
            "SELECT * FROM entitlements WHERE subject_key = %(s)s AND ((feature_key = %(k)s AND deleted_at IS NULL) "
            "OR id = %(k)s) ORDER BY deleted_at IS NULL DESC LIMIT 1",
            {"s": subject_key, "k": id_or_feature_key},
        )
        return _entitlement(row) if row else None

    async def subject_entitlements(self, subject_key: str, include_deleted: bool) -> list[Entitlement]:
        cond = "" if include_deleted else " AND deleted_at IS NULL"
        rows = await self._all(
            f"SELECT * FROM entitlements WHERE subject_key = %s{cond} ORDER BY created_at, id", (subject_key,)
        )
        return [_entitlement(r) for r in rows]

    async def entitlements(
        self,
        *,
        features: Sequence[str],
        subjects: Sequence[str],
        types: Sequence[str],
        listing: Listing,
    ) -> tuple[list[Entitlement], int]:
        where, params = ["deleted_at IS NULL"], {}
        if features:
            where.append("(feature_key = ANY(%(f)s) OR feature_id = ANY(%(f)s))")
            params["f"] = list(features)
        if subjects:
            where.append("subject_key = ANY(%(s)s)")
            params["s"] = list(subjects)
        if types:
            where.append("type = ANY(%(t)s)")
            params["t"] = list(types)
        rows, total = await self._page("* FROM entitlements", where, params, _ENTITLEMENT_ORDER, listing)
        return [_entitlement(r) for r in rows], total

    async def delete_entitlement(self, entitlement_id: str, at: datetime) -> None:
        await self._conn.execute(
            b"UPDATE entitlements SET deleted_at = %s, updated_at = %s WHERE id = %s AND deleted_at IS NULL",
            (at, at, entitlement_id),
        )

    # -- grants ----------------------------------------------------------------------------------------

    async def insert_grant(self, g: Grant) -> None:
        r = g.recurrence
        await self._write(
            "INSERT INTO grants (id, entitlement_id, amount, priority, effective_at, expiration_duration, "
            "expiration_count, expires_at, max_rollover_amount, min_rollover_amount, recurrence_interval, "
            "recurrence_anchor, recurrence_time_zone, metadata, annotations, created_at, updated_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                g.id,
                g.entitlement_id,
                g.amount,
                g.priority,
                g.effective_at,
                g.expiration_duration,
                g.expiration_count,
                g.expires_at,
                g.max_rollover_amount,
                g.min_rollover_amount,
                r.interval.iso if r else None,
                r.anchor if r else None,
                r.time_zone if r else None,
                _json(g.metadata),
                _json(g.annotations),
                g.created_at,
                g.updated_at,
            ),
            f"grant {g.id} already exists",
        )

    async def grant(self, grant_id: str) -> Grant | None:
        row = await self._one("SELECT * FROM grants WHERE id = %s", (grant_id,))
        return _grant(row) if row else None

    async def grants_of(self, entitlement_ids: Sequence[str]) -> list[Grant]:
        rows = await self._all(
            "SELECT * FROM grants WHERE entitlement_id = ANY(%s) ORDER BY effective_at, created_at, id",
            (list(entitlement_ids),),
        )
        return [_grant(r) for r in rows]

    async def grants(
        self,
        *,
        features: Sequence[str],
        subjects: Sequence[str],
        include_voided: bool,
        listing: Listing,
    ) -> tuple[list[tuple[Grant, Entitlement]], int]:
        where, params = ["TRUE"], {}
        if features:
            where.append("(e.feature_key = ANY(%(f)s) OR e.feature_id = ANY(%(f)s))")
            params["f"] = list(features)
        if subjects:
            where.append("e.subject_key = ANY(%(s)s)")
            params["s"] = list(subjects)
        if not include_voided:
            where.append("g.voided_at IS NULL AND e.deleted_at IS NULL")
        source = (
            "row_to_json(g.*) AS g, row_to_json(e.*) AS e FROM grants g JOIN entitlements e ON e.id = g.entitlement_id"
        )
        rows, total = await self._page(source, where, params, _GRANT_ORDER, listing)
        return [(_grant(_typed(r["g"])), _entitlement(_typed(r["e"]))) for r in rows], total

    async def void_grant(self, grant_id: str, at: datetime) -> None:
        await self._conn.execute(
            b"UPDATE grants SET voided_at = %s, updated_at = %s WHERE id = %s AND voided_at IS NULL",
            (at, at, grant_id),
        )

    # -- resets ----------------------------------------------------------------------------------------

    async def insert_reset(self, r: UsageReset) -> None:
        await self._write(
            "INSERT INTO usage_resets (entitlement_id, reset_at, retain_anchor, preserve_overage, created_at) "
            "VALUES (%s, %s, %s, %s, %s)",
            (r.entitlement_id, r.at, r.retain_anchor, r.preserve_overage, r.created_at),
            "the entitlement was already reset at that time",
        )

    async def resets_of(self, entitlement_id: str) -> list[UsageReset]:
        rows = await self._all(
            "SELECT * FROM usage_resets WHERE entitlement_id = %s ORDER BY reset_at", (entitlement_id,)
        )
        return [_reset(r) for r in rows]

    # -- plans -----------------------------------------------------------------------------------------

    async def plan(self, key: str) -> Plan | None:
        row = await self._one(
            "SELECT * FROM plans WHERE (key = %(k)s OR id = %(k)s) AND deleted_at IS NULL", {"k": key}
        )
        return _plan(row) if row else None

    async def plans(self) -> list[Plan]:
        return [_plan(r) for r in await self._all("SELECT * FROM plans WHERE deleted_at IS NULL ORDER BY key")]

    async def save_plan(self, p: Plan) -> None:
        """Insert a new plan, or replace the live plan with this key (its version must be the next one)."""
        if p.version == 1:
            await self._write(
                "INSERT INTO plans (id, key, name, description, version, entitlements, metadata, created_at, "
                "updated_at) VALUES (%s, %s, %s, %s, 1, %s, %s, %s, %s)",
                (
                    p.id,
                    p.key,
                    p.name,
                    p.description,
                    Jsonb(list(p.entitlements)),
                    _json(p.metadata),
                    p.created_at,
                    p.updated_at,
                ),
                f"a plan with key {p.key} already exists",
            )
        else:
            await self._conn.execute(
                b"UPDATE plans SET name = %s, description = %s, version = %s, entitlements = %s, metadata = %s, "
                b"updated_at = %s WHERE id = %s",
                (p.name, p.description, p.version, Jsonb(list(p.entitlements)), _json(p.metadata), p.updated_at, p.id),
            )

    async def delete_plan(self, plan_id: str, at: datetime) -> None:
        await self._conn.execute(b"UPDATE plans SET deleted_at = %s WHERE id = %s", (at, plan_id))

    async def lock_plan(self, key: str) -> None:
        await self._conn.execute(b"SELECT pg_advisory_xact_lock(hashtextextended(%s, 11))", (key,))

    async def subject_plan(self, subject_key: str) -> SubjectPlan | None:
        row = await self._one("SELECT * FROM subject_plans WHERE subject_key = %s", (subject_key,))
        return _subject_plan(row) if row is not None else None

    async def set_subject_plan(self, sp: SubjectPlan) -> None:
        await self._conn.execute(
            b"INSERT INTO subject_plans (subject_key, plan_key, plan_version, is_default, assigned_at) "
            b"VALUES (%s, %s, %s, %s, %s) ON CONFLICT (subject_key) DO UPDATE SET plan_key = EXCLUDED.plan_key, "
            b"plan_version = EXCLUDED.plan_version, is_default = EXCLUDED.is_default, "
            b"assigned_at = EXCLUDED.assigned_at",
            (sp.subject_key, sp.plan_key, sp.plan_version, sp.is_default, sp.assigned_at),
        )

    async def clear_subject_plan(self, subject_key: str) -> None:
        await self._conn.execute(b"DELETE FROM subject_plans WHERE subject_key = %s", (subject_key,))

    # -- access ----------------------------------------------------------------------------------------

    async def insert_key(self, k: ApiKey) -> None:
        await self._conn.execute(
            b"INSERT INTO api_keys (id, name, scopes, secret_sha256, created_at) VALUES (%s, %s, %s, %s, %s)",
            (k.id, k.name, sorted(s.value for s in k.scopes), k.secret_sha256, k.created_at),
        )

    async def key(self, key_id: str) -> ApiKey | None:
        row = await self._one("SELECT * FROM api_keys WHERE id = %s", (key_id,))
        return _key(row) if row else None

    async def keys(self) -> list[ApiKey]:
        return [_key(r) for r in await self._all("SELECT * FROM api_keys ORDER BY created_at, id")]

    async def revoke_key(self, key_id: str, at: datetime) -> bool:
        cur = await self._conn.execute(
            b"UPDATE api_keys SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL", (at, key_id)
        )
        return cur.rowcount > 0

    async def insert_portal_token(self, t: PortalToken) -> None:
        await self._conn.execute(
            b"INSERT INTO portal_tokens (id, subject_key, allowed_meter_slugs, secret_sha256, created_at, expires_at) "
            b"VALUES (%s, %s, %s, %s, %s, %s)",
            (
                t.id,
                t.subject,
                list(t.allowed_meter_slugs) if t.allowed_meter_slugs is not None else None,
                t.secret_sha256,
                t.created_at,
                t.expires_at,
            ),
        )

    async def portal_token(self, token_id: str) -> PortalToken | None:
        row = await self._one("SELECT * FROM portal_tokens WHERE id = %s", (token_id,))
        return _portal(row) if row else None

    async def portal_tokens(self, limit: int) -> list[PortalToken]:
        rows = await self._all("SELECT * FROM portal_tokens ORDER BY created_at DESC, id LIMIT %s", (limit,))
        return [_portal(r) for r in rows]

    async def invalidate_portal_tokens(self, token_id: str | None, subject: str | None, at: datetime) -> int:
        where, params = ["invalidated_at IS NULL"], [at]
        if token_id is not None:
            where.append("id = %s")
            params.append(token_id)  # type: ignore[arg-type]
        if subject is not None:
            where.append("subject_key = %s")
            params.append(subject)  # type: ignore[arg-type]
        cur = await self._conn.execute(
            f"UPDATE portal_tokens SET invalidated_at = %s WHERE {' AND '.join(where)}".encode(), params
        )
        return cur.rowcount

    # -- reservations ----------------------------------------------------------------------------------

    async def insert_reservation(self, r: Reservation) -> None:
        """The reservation and its lines, in one round trip."""
        try:
            async with self._conn.pipeline():
                await self._conn.execute(
                    b"INSERT INTO reservations (id, subject_key, status, provider, model, request_digest, estimate, "
                    b"created_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        r.id,
                        r.subject_key,
                        r.status.value,
                        r.provider,
                        r.model,
                        r.request_digest,
                        _json(r.estimate),
                        r.created_at,
                        r.expires_at,
                    ),
                )
                if r.lines:
                    await self._conn.execute(
                        b"INSERT INTO reservation_lines (reservation_id, entitlement_id, feature_key, amount, "
                        b"is_soft_limit) SELECT %s, * "
                        b"FROM unnest(%s::text[], %s::text[], %s::numeric[], %s::boolean[])",
                        (
                            r.id,
                            [ln.entitlement_id for ln in r.lines],
                            [ln.feature_key for ln in r.lines],
                            [ln.amount for ln in r.lines],
                            [ln.is_soft_limit for ln in r.lines],
                        ),
                    )
        except psycopg.errors.UniqueViolation:
            raise Conflict(f"reservation {r.id} already exists") from None

    async def _reservations(
        self, where: str, params: Sequence[Any] | Mapping[str, Any], lock: str = ""
    ) -> list[Reservation]:
        rows = await self._all(f"SELECT * FROM reservations WHERE {where} ORDER BY created_at, id{lock}", params)
        if not rows:
            return []
        lines = _lines(
            await self._all(
                "SELECT * FROM reservation_lines WHERE reservation_id = ANY(%s) ORDER BY feature_key",
                ([r["id"] for r in rows],),
            )
        )
        return [_reservation(r, lines.get(r["id"], [])) for r in rows]

    async def reservation(self, reservation_id: str) -> Reservation | None:
        found = await self._reservations("id = %s", (reservation_id,))
        return found[0] if found else None

    async def open_reservations(
        self,
        subject_key: str,
        now: datetime,
        committed_since: datetime,
        applied: Mapping[tuple[str, int], int] | None = None,
    ) -> list[Reservation]:
        """Holds not expired at ``now``, and commits since ``committed_since`` (or never acknowledged by the
        broker) whose event is past ``applied`` (the windows' applied offsets; None: every such commit)."""
        return await self._reservations(*self._open_where(subject_key, now, committed_since, applied))

    async def reserve_state(
        self,
        subject_key: str,
        *,
        reservation_id: str,
        now: datetime,
        committed_since: datetime,
        applied: Mapping[tuple[str, int], int],
        default_plan: str | None,
    ) -> ReserveState:
        """Everything a reserve decides on, read with one round trip (a pipeline of independent reads, each
        seeing every transaction committed before it: call it after the subject's lock is held)."""
        where_open, params_open = self._open_where(subject_key, now, committed_since, applied)
        sql_open = f"SELECT * FROM reservations WHERE {where_open}"
        live = "SELECT id FROM entitlements WHERE subject_key = %s AND deleted_at IS NULL AND type = 'metered'"
        async with self._conn.pipeline() as pipeline:
            c_plan = await self._conn.execute(b"SELECT * FROM subject_plans WHERE subject_key = %s", (subject_key,))
            c_wanted = await self._conn.execute(
                b"SELECT * FROM plans WHERE deleted_at IS NULL AND key = COALESCE((SELECT plan_key FROM subject_plans "
                b"WHERE subject_key = %s AND NOT is_default), %s)",
                (subject_key, default_plan),
            )
            c_ents = await self._conn.execute(
                b"SELECT * FROM entitlements WHERE subject_key = %s AND deleted_at IS NULL AND type = 'metered' "
                b"ORDER BY created_at, id",
                (subject_key,),
            )
            c_features = await self._conn.execute(
                b"SELECT * FROM features WHERE id IN (SELECT feature_id FROM entitlements "
                b"WHERE subject_key = %s AND deleted_at IS NULL AND type = 'metered')",
                (subject_key,),
            )
            c_grants = await self._conn.execute(
                f"SELECT * FROM grants WHERE entitlement_id IN ({live}) ORDER BY effective_at, created_at, id".encode(),
                (subject_key,),
            )
            c_resets = await self._conn.execute(
                f"SELECT * FROM usage_resets WHERE entitlement_id IN ({live}) ORDER BY reset_at".encode(),
                (subject_key,),
            )
            c_open = await self._conn.execute(sql_open.encode(), params_open)
            c_lines = await self._conn.execute(
                f"SELECT * FROM reservation_lines WHERE reservation_id IN (SELECT id FROM ({sql_open}) o) "
                "ORDER BY feature_key".encode(),
                params_open,
            )
            c_existing = await self._conn.execute(b"SELECT * FROM reservations WHERE id = %s", (reservation_id,))
            c_existing_lines = await self._conn.execute(
                b"SELECT * FROM reservation_lines WHERE reservation_id = %s ORDER BY feature_key", (reservation_id,)
            )
            await pipeline.sync()
        sp = await c_plan.fetchone()
        wanted = await c_wanted.fetchone()
        grants: dict[str, list[Grant]] = {}
        for g in await c_grants.fetchall():
            grants.setdefault(g["entitlement_id"], []).append(_grant(g))
        resets: dict[str, list[UsageReset]] = {}
        for r in await c_resets.fetchall():
            resets.setdefault(r["entitlement_id"], []).append(_reset(r))
        open_rows = await c_open.fetchall()
        lines = _lines(await c_lines.fetchall())
        existing = await c_existing.fetchone()
        existing_lines = _lines(await c_existing_lines.fetchall())
        return ReserveState(
            subject_plan=_subject_plan(sp) if sp else None,
            wanted_plan=_plan(wanted) if wanted else None,
            entitlements=[_entitlement(e) for e in await c_ents.fetchall()],
            features={f["id"]: _feature(f) for f in await c_features.fetchall()},
            grants=grants,
            resets=resets,
            reservations=[_reservation(r, lines.get(r["id"], [])) for r in open_rows],
            existing=_reservation(existing, existing_lines.get(existing["id"], [])) if existing else None,
        )

    @staticmethod
    def _open_where(
        subject_key: str, now: datetime, committed_since: datetime, applied: Mapping[tuple[str, int], int] | None
    ) -> tuple[str, dict[str, Any]]:
        where = (
            "subject_key = %(s)s AND ((status = 'held' AND expires_at > %(now)s) OR (status = 'committed' "
            "AND (sent_at IS NULL OR (committed_at >= %(since)s{past}))))"
        )
        params: dict[str, Any] = {"s": subject_key, "now": now, "since": committed_since}
        past = ""
        if applied is not None:
            past = (
                " AND event_offset > COALESCE((SELECT a.o FROM unnest(%(t)s::text[], %(p)s::int[], %(o)s::bigint[]) "
                "AS a(t, p, o) WHERE a.t = event_topic AND a.p = event_partition), -1)"
            )
            params |= {"t": [k[0] for k in applied], "p": [k[1] for k in applied], "o": list(applied.values())}
        return where.format(past=past), params

    async def expire_holds(self, now: datetime, limit: int = 1000) -> int:
        """Tidy-up only: an expired hold stops counting by its time alone; marking it keeps the open set small."""
        cur = await self._conn.execute(
            b"UPDATE reservations SET status = 'expired' WHERE id IN (SELECT id FROM reservations "
            b"WHERE status = 'held' AND expires_at <= %s LIMIT %s FOR UPDATE SKIP LOCKED)",
            (now, limit),
        )
        return cur.rowcount

    async def commit_reservation(
        self,
        reservation_id: str,
        at: datetime,
        event: Mapping[str, Any],
        usage_digest: str,
        actual: Mapping[str, Decimal | None],
    ) -> None:
        await self._conn.execute(
            b"UPDATE reservations SET status = 'committed', committed_at = %s, event = %s, usage_digest = %s "
            b"WHERE id = %s",
            (at, Jsonb(dict(event)), usage_digest, reservation_id),
        )
        async with self._conn.cursor() as cur:
            await cur.executemany(
                b"UPDATE reservation_lines SET actual = %s WHERE reservation_id = %s AND entitlement_id = %s",
                [(amount, reservation_id, ent) for ent, amount in actual.items()],
            )

    async def release_reservation(self, reservation_id: str, at: datetime) -> None:
        await self._conn.execute(
            b"UPDATE reservations SET status = 'released', released_at = %s WHERE id = %s", (at, reservation_id)
        )

    async def mark_sent(self, reservation_id: str, position: tuple[str, int, int], at: datetime) -> None:
        """Record where the broker stored the commit's event. Sent twice (the request and the relay racing),
        its copies sit in one partition and the sink counts the first it applies, the lower offset: keep that
        one, so the commit stops counting as pending exactly when its usage is in the windows."""
        topic, partition, offset = position
        await self._conn.execute(
            b"UPDATE reservations SET sent_at = COALESCE(sent_at, %(at)s), event_offset = CASE "
            b"WHEN event_offset IS NULL OR event_topic <> %(t)s OR event_partition <> %(p)s THEN %(o)s "
            b"ELSE LEAST(event_offset, %(o)s) END, event_topic = %(t)s, event_partition = %(p)s WHERE id = %(id)s",
            {"at": at, "t": topic, "p": partition, "o": offset, "id": reservation_id},
        )

    async def unsent_commits(self, committed_before: datetime, limit: int) -> list[Reservation]:
        """Commits whose event the broker has not acknowledged, locked (skipping those another relay holds)."""
        return await self._reservations(
            "status = 'committed' AND sent_at IS NULL AND committed_at < %s",
            (committed_before,),
            f" LIMIT {int(limit)} FOR UPDATE SKIP LOCKED",
        )


def _key(r: DictRow) -> ApiKey:
    return ApiKey(
        id=r["id"],
        name=r["name"],
        scopes=scopes_of(r["scopes"]),
        secret_sha256=bytes(r["secret_sha256"]),
        created_at=r["created_at"],
        revoked_at=r["revoked_at"],
    )


def _portal(r: DictRow) -> PortalToken:
    slugs = r["allowed_meter_slugs"]
    return PortalToken(
        id=r["id"],
        subject=r["subject_key"],
        allowed_meter_slugs=tuple(slugs) if slugs is not None else None,
        secret_sha256=bytes(r["secret_sha256"]),
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        invalidated_at=r["invalidated_at"],
    )


def _typed(row: Mapping[str, Any]) -> DictRow:
    """A row read through ``row_to_json`` back in the driver's types (timestamps, numerics)."""
    out: dict[str, Any] = dict(row)
    for key, value in row.items():
        if value is None:
            continue
        if key.endswith(("_at", "_anchor", "_from", "_start", "_end")) and isinstance(value, str):
            out[key] = datetime.fromisoformat(value)
        elif key in ("amount", "max_rollover_amount", "min_rollover_amount", "issue_after_reset"):
            out[key] = Decimal(str(value))
    return out


class PostgresStore:
    """A pool of connections to the control plane's PostgreSQL."""

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 8, timeout_s: float = 2.0) -> None:
        self._dsn = dsn
        self._timeout_s = timeout_s
        self._migrated = False
        self._failed_at = -float("inf")
        self._migrating = asyncio.Lock()
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[DictRow]] = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            open=False,
            # A connection that went stale while the server was away is replaced before it is handed out.
            check=AsyncConnectionPool.check_connection,
            kwargs={"row_factory": dict_row, "connect_timeout": max(1, int(timeout_s))},
        )

    async def open(self) -> None:
        # Not waiting: the service starts (ingest and usage queries work) even while PostgreSQL is away.
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    async def _ensure_schema(self) -> None:
        """Migrations run before the first transaction, not at construction: the service starts (ingest and
        usage queries work) while PostgreSQL is away, and its schema is brought up to date once it is back."""
        if self._migrated:
            return
        async with self._migrating:
            if self._migrated:
                return
            # One attempt at a time, and none for a moment after a failure: requests queued behind a failed
            # attempt answer 503 at once instead of each waiting out a connection timeout in turn.
            if time.monotonic() - self._failed_at < self._timeout_s:
                raise StoreUnavailable("PostgreSQL is not reachable (the schema could not be checked)")
            try:
                applied = await asyncio.to_thread(apply_migrations, self._dsn, self._timeout_s)
            except StoreUnavailable:
                self._failed_at = time.monotonic()
                raise
            if applied:
                log.info("postgres: schema migrations applied: %s", applied)
            self._migrated = True

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[PgTx]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        await self._ensure_schema()
        try:
            async with self._pool.connection() as conn, conn.transaction():
                yield PgTx(conn)
        except PoolTimeout as exc:
            raise StoreUnavailable(f"PostgreSQL is not reachable (no connection within {self._timeout_s:g}s)") from exc
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"PostgreSQL is not reachable: {_first_line(exc)}") from exc


def _reset(r: DictRow) -> UsageReset:
    return UsageReset(r["entitlement_id"], r["reset_at"], r["retain_anchor"], r["preserve_overage"], r["created_at"])


def _subject_plan(row: DictRow) -> SubjectPlan:
    return SubjectPlan(row["subject_key"], row["plan_key"], row["plan_version"], row["assigned_at"], row["is_default"])


def _lines(rows: Sequence[DictRow]) -> dict[str, list[HoldLine]]:
    out: dict[str, list[HoldLine]] = {}
    for ln in rows:
        out.setdefault(ln["reservation_id"], []).append(
            HoldLine(ln["entitlement_id"], ln["feature_key"], ln["amount"], ln["is_soft_limit"], ln["actual"])
        )
    return out


def _reservation(r: DictRow, lines: Sequence[HoldLine]) -> Reservation:
    position = None
    if r["event_topic"] is not None:
        position = (r["event_topic"], r["event_partition"], r["event_offset"])
    return Reservation(
        id=r["id"],
        subject_key=r["subject_key"],
        status=ReservationStatus(r["status"]),
        provider=r["provider"],
        model=r["model"],
        request_digest=r["request_digest"],
        estimate=r["estimate"],
        lines=tuple(lines),
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        committed_at=r["committed_at"],
        released_at=r["released_at"],
        event=r["event"],
        usage_digest=r["usage_digest"],
        event_position=position,
    )

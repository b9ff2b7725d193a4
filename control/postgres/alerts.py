"""The alerts' statements (channels, rules, crossings, events and the webhook outbox) on PostgreSQL.

Delivery guarantee: an event and its deliveries are written in one transaction, so an event that exists
is delivered (at least once). A sender leases due deliveries (``FOR UPDATE SKIP LOCKED``: two senders never
take the same row) by pushing their next attempt past the request's timeout, posts outside any
transaction, then records the outcome only if its lease token still holds: a sender killed mid-request
leaves a row that falls due again when its lease runs out, and a sender that outlived its lease records
nothing (whoever holds the row now does).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from control.alerts.model import (
    OPEN_STATES,
    Attempt,
    Channel,
    Crossing,
    Delivery,
    DeliveryState,
    Event,
    Rule,
    Threshold,
)
from control.alerts.store import EventFilter, Lease
from control.listing import Listing
from control.postgres.sql import Sql

_CHANNEL_ORDER: Final = {"id": "id", "type": "id", "createdAt": "created_at", "updatedAt": "updated_at"}
_RULE_ORDER: Final = {"id": "id", "type": "type", "createdAt": "created_at", "updatedAt": "updated_at"}
_EVENT_ORDER: Final = {"id": "e.id", "createdAt": "e.created_at"}
_OPEN: Final = [s.value for s in OPEN_STATES]


class AlertSql(Sql):
    async def lock_alerts(self, subject_key: str) -> None:
        """Serialise evaluations of one subject (a lock of its own: evaluating never holds up a reserve)."""
        await self._conn.execute(b"SELECT pg_advisory_xact_lock(hashtextextended(%s, 11))", (subject_key,))

    # -- channels --------------------------------------------------------------------------------------

    async def insert_channel(self, c: Channel) -> None:
        await self._conn.execute(
            b"INSERT INTO notification_channels (id, name, url, custom_headers, signing_secret, disabled, metadata, "
            b"created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                c.id,
                c.name,
                c.url,
                Jsonb(dict(c.custom_headers)),
                c.signing_secret,
                c.disabled,
                _json(c.metadata),
                c.created_at,
                c.updated_at,
            ),
        )

    async def update_channel(self, c: Channel) -> None:
        await self._conn.execute(
            b"UPDATE notification_channels SET name = %s, url = %s, custom_headers = %s, signing_secret = %s, "
            b"disabled = %s, metadata = %s, updated_at = %s WHERE id = %s",
            (
                c.name,
                c.url,
                Jsonb(dict(c.custom_headers)),
                c.signing_secret,
                c.disabled,
                _json(c.metadata),
                c.updated_at,
                c.id,
            ),
        )

    async def channel(self, channel_id: str) -> Channel | None:
        row = await self._one("SELECT * FROM notification_channels WHERE id = %s", (channel_id,))
        return _channel(row) if row else None

    async def channels(
        self, *, include_deleted: bool, include_disabled: bool, listing: Listing
    ) -> tuple[list[Channel], int]:
        where = ["true"]
        if not include_deleted:
            where.append("deleted_at IS NULL")
        if not include_disabled:
            where.append("NOT disabled")
        rows, total = await self._page("* FROM notification_channels", where, {}, _CHANNEL_ORDER, listing)
        return [_channel(r) for r in rows], total

    async def delete_channel(self, channel_id: str, at: datetime) -> None:
        await self._conn.execute(
            b"UPDATE notification_channels SET deleted_at = %s, updated_at = %s WHERE id = %s", (at, at, channel_id)
        )

    async def rules_using(self, channel_id: str) -> list[str]:
        rows = await self._all(
            "SELECT id FROM notification_rules WHERE %s = ANY (channel_ids) AND deleted_at IS NULL ORDER BY id",
            (channel_id,),
        )
        return [r["id"] for r in rows]

    # -- rules -----------------------------------------------------------------------------------------

    async def insert_rule(self, r: Rule) -> None:
        await self._conn.execute(
            b"INSERT INTO notification_rules (id, type, name, disabled, thresholds, feature_ids, channel_ids, "
            b"metadata, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                r.id,
                r.type,
                r.name,
                r.disabled,
                _thresholds(r.thresholds),
                list(r.feature_ids),
                list(r.channel_ids),
                _json(r.metadata),
                r.created_at,
                r.updated_at,
            ),
        )

    async def update_rule(self, r: Rule) -> None:
        await self._conn.execute(
            b"UPDATE notification_rules SET name = %s, disabled = %s, thresholds = %s, feature_ids = %s, "
            b"channel_ids = %s, metadata = %s, updated_at = %s WHERE id = %s",
            (
                r.name,
                r.disabled,
                _thresholds(r.thresholds),
                list(r.feature_ids),
                list(r.channel_ids),
                _json(r.metadata),
                r.updated_at,
                r.id,
            ),
        )

    async def rule(self, rule_id: str) -> Rule | None:
        row = await self._one("SELECT * FROM notification_rules WHERE id = %s", (rule_id,))
        return _rule(row) if row else None

    async def rules(
        self,
        *,
        include_deleted: bool,
        include_disabled: bool,
        features: Sequence[str],
        channels: Sequence[str],
        listing: Listing,
    ) -> tuple[list[Rule], int]:
        where = ["true"]
        params: dict[str, Any] = {}
        if not include_deleted:
            where.append("deleted_at IS NULL")
        if not include_disabled:
            where.append("NOT disabled")
        if features:
            # By feature id or key (a key names every feature that ever had it).
            where.append("feature_ids && (ARRAY(SELECT id FROM features WHERE id = ANY (%(f)s) OR key = ANY (%(f)s)))")
            params["f"] = list(features)
        if channels:
            where.append("channel_ids && %(c)s::text[]")
            params["c"] = list(channels)
        rows, total = await self._page("* FROM notification_rules", where, params, _RULE_ORDER, listing)
        return [_rule(r) for r in rows], total

    async def live_rules(self, rule_type: str) -> list[Rule]:
        rows = await self._all(
            "SELECT * FROM notification_rules WHERE type = %s AND deleted_at IS NULL AND NOT disabled ORDER BY id",
            (rule_type,),
        )
        return [_rule(r) for r in rows]

    async def delete_rule(self, rule_id: str, at: datetime) -> None:
        await self._conn.execute(
            b"UPDATE notification_rules SET deleted_at = %s, updated_at = %s WHERE id = %s", (at, at, rule_id)
        )

    # -- crossings and events --------------------------------------------------------------------------

    async def crossings(self, subject_key: str, feature_id: str, period_start: datetime) -> list[Crossing]:
        rows = await self._all(
            "SELECT * FROM alert_crossings WHERE subject_key = %s AND feature_id = %s AND period_start = %s",
            (subject_key, feature_id, period_start),
        )
        return [
            Crossing(
                rule_id=r["rule_id"],
                subject_key=r["subject_key"],
                feature_id=r["feature_id"],
                period_start=r["period_start"],
                threshold=r["threshold"],
                crossed=r["crossed"],
                usage_at_cross=r["usage_at_cross"],
                event_id=r["event_id"],
            )
            for r in rows
        ]

    async def save_crossing(self, c: Crossing, at: datetime) -> bool:
        """Record a transition; False if the row already says so (another evaluation recorded it first): the
        primary key and this condition, not only the evaluation lock, make each crossing fire once."""
        row = await self._one(
            "INSERT INTO alert_crossings (rule_id, subject_key, feature_id, period_start, threshold, crossed, "
            "usage_at_cross, event_id, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (rule_id, subject_key, feature_id, period_start, threshold) DO UPDATE SET "
            "crossed = EXCLUDED.crossed, usage_at_cross = EXCLUDED.usage_at_cross, event_id = EXCLUDED.event_id, "
            "updated_at = EXCLUDED.updated_at, "
            "times_crossed = alert_crossings.times_crossed + CASE WHEN EXCLUDED.crossed THEN 1 ELSE 0 END "
            "WHERE alert_crossings.crossed IS DISTINCT FROM EXCLUDED.crossed RETURNING rule_id",
            (
                c.rule_id,
                c.subject_key,
                c.feature_id,
                c.period_start,
                c.threshold,
                c.crossed,
                c.usage_at_cross,
                c.event_id,
                at,
            ),
        )
        return row is not None

    async def insert_event(
        self, e: Event, feature_key: str | None, channel_ids: Sequence[str], give_up_at: datetime
    ) -> None:
        await self._conn.execute(
            b"INSERT INTO notification_events (id, type, rule_id, subject_key, feature_id, feature_key, payload, "
            b"annotations, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                e.id,
                e.type,
                e.rule_id,
                e.subject_key,
                e.feature_id,
                feature_key,
                e.payload,
                _json(e.annotations),
                e.created_at,
            ),
        )
        for channel_id in channel_ids:
            await self._conn.execute(
                b"INSERT INTO notification_deliveries (event_id, channel_id, state, next_attempt_at, give_up_at, "
                b"created_at, updated_at) VALUES (%s, %s, 'PENDING', %s, %s, %s, %s)",
                (e.id, channel_id, e.created_at, give_up_at, e.created_at, e.created_at),
            )

    async def event(self, event_id: str) -> Event | None:
        row = await self._one("SELECT * FROM notification_events e WHERE id = %s", (event_id,))
        if row is None:
            return None
        return (await self._with_deliveries([row]))[0]

    async def events(self, where: EventFilter, listing: Listing) -> tuple[list[Event], int]:
        cond = ["true"]
        params: dict[str, Any] = {}
        if where.start is not None:
            cond.append("e.created_at >= %(from)s")
            params["from"] = where.start
        if where.end is not None:
            cond.append("e.created_at <= %(to)s")
            params["to"] = where.end
        if where.features:
            cond.append("(e.feature_id = ANY (%(f)s) OR e.feature_key = ANY (%(f)s))")
            params["f"] = list(where.features)
        if where.subjects:
            cond.append("e.subject_key = ANY (%(s)s)")
            params["s"] = list(where.subjects)
        if where.rules:
            cond.append("e.rule_id = ANY (%(r)s)")
            params["r"] = list(where.rules)
        if where.channels:
            cond.append(
                "EXISTS (SELECT 1 FROM notification_deliveries d "
                "WHERE d.event_id = e.id AND d.channel_id = ANY (%(c)s))"
            )
            params["c"] = list(where.channels)
        rows, total = await self._page("e.* FROM notification_events e", cond, params, _EVENT_ORDER, listing)
        return await self._with_deliveries(rows), total

    async def _with_deliveries(self, rows: Sequence[DictRow]) -> list[Event]:
        ids = [r["id"] for r in rows]
        deliveries = await self._all(
            "SELECT * FROM notification_deliveries WHERE event_id = ANY (%s) ORDER BY created_at, channel_id", (ids,)
        )
        attempts = await self._all(
            "SELECT * FROM notification_attempts WHERE event_id = ANY (%s) ORDER BY n DESC", (ids,)
        )
        history: dict[tuple[str, str], list[Attempt]] = {}
        for a in attempts:
            history.setdefault((a["event_id"], a["channel_id"]), []).append(_attempt(a))
        by_event: dict[str, list[Delivery]] = {}
        for d in deliveries:
            key = (d["event_id"], d["channel_id"])
            by_event.setdefault(d["event_id"], []).append(_delivery(d, history.get(key, [])))
        return [_event(r, by_event.get(r["id"], [])) for r in rows]

    async def resend(self, event_id: str, channel_ids: Sequence[str], at: datetime, give_up_at: datetime) -> None:
        for channel_id in channel_ids:
            await self._conn.execute(
                b"INSERT INTO notification_deliveries (event_id, channel_id, state, next_attempt_at, give_up_at, "
                b"created_at, updated_at) VALUES (%(e)s, %(c)s, 'RESENDING', %(at)s, %(g)s, %(at)s, %(at)s) "
                b"ON CONFLICT (event_id, channel_id) DO UPDATE SET state = 'RESENDING', reason = '', "
                b"next_attempt_at = %(at)s, give_up_at = %(g)s, lease_token = NULL, updated_at = %(at)s",
                {"e": event_id, "c": channel_id, "at": at, "g": give_up_at},
            )

    # -- the outbox ------------------------------------------------------------------------------------

    async def lease_due(
        self, now: datetime, limit: int, in_flight: Mapping[str, int], per_channel: int, lease_until: datetime
    ) -> list[Lease]:
        token = uuid.uuid4().hex
        # At most ``per_channel`` per channel counting those already in flight, the earliest due first.
        rows = await self._all(
            "UPDATE notification_deliveries d SET lease_token = %(t)s, next_attempt_at = %(until)s, "
            "state = CASE WHEN d.state = 'PENDING' THEN 'SENDING' ELSE d.state END "
            "FROM (SELECT event_id, channel_id FROM notification_deliveries "
            "      WHERE (event_id, channel_id) IN ("
            "        SELECT event_id, channel_id FROM ("
            "          SELECT event_id, channel_id, row_number() OVER ("
            "            PARTITION BY channel_id ORDER BY next_attempt_at, event_id) AS k "
            "          FROM notification_deliveries WHERE state = ANY (%(open)s) AND next_attempt_at <= %(now)s"
            "        ) ranked WHERE k <= %(per)s - coalesce("
            "          (SELECT u.n FROM unnest(%(cs)s::text[], %(ns)s::int[]) AS u (c, n)"
            "           WHERE u.c = ranked.channel_id),"
            "          0))"
            "      AND state = ANY (%(open)s) AND next_attempt_at <= %(now)s "
            "      ORDER BY next_attempt_at, event_id LIMIT %(n)s FOR UPDATE SKIP LOCKED) due "
            "WHERE d.event_id = due.event_id AND d.channel_id = due.channel_id RETURNING d.*",
            {
                "t": token,
                "until": lease_until,
                "open": _OPEN,
                "now": now,
                "per": per_channel,
                "cs": list(in_flight),
                "ns": list(in_flight.values()),
                "n": limit,
            },
        )
        if not rows:
            return []
        events = {
            r["id"]: _event(r, [])
            for r in await self._all(
                "SELECT * FROM notification_events WHERE id = ANY (%s)", (list({r["event_id"] for r in rows}),)
            )
        }
        channels = {
            r["id"]: _channel(r)
            for r in await self._all(
                "SELECT * FROM notification_channels WHERE id = ANY (%s)", (list({r["channel_id"] for r in rows}),)
            )
        }
        leases = [
            Lease(_delivery(r, []), token, events[r["event_id"]], channels.get(r["channel_id"]))
            for r in rows
            if r["event_id"] in events
        ]
        return sorted(leases, key=lambda lease: lease.event.id)

    async def record_attempt(
        self,
        lease: Lease,
        attempt: Attempt,
        state: DeliveryState,
        reason: str,
        next_attempt_at: datetime | None,
    ) -> bool:
        d = lease.delivery
        row = await self._one(
            "UPDATE notification_deliveries SET state = %(state)s, reason = %(reason)s, next_attempt_at = %(next)s, "
            "attempts = attempts + 1, lease_token = NULL, updated_at = %(at)s, "
            "delivered_at = CASE WHEN %(state)s = 'SUCCESS' THEN %(at)s ELSE delivered_at END "
            "WHERE event_id = %(e)s AND channel_id = %(c)s AND lease_token = %(t)s RETURNING attempts",
            {
                "state": state.value,
                "reason": reason,
                "next": next_attempt_at,
                "at": attempt.at,
                "e": d.event_id,
                "c": d.channel_id,
                "t": lease.token,
            },
        )
        if row is None:
            return False  # the lease ran out and another sender has the row now
        await self._conn.execute(
            b"INSERT INTO notification_attempts (event_id, channel_id, n, at, state, status_code, body, duration_ms, "
            b"url) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (
                d.event_id,
                d.channel_id,
                row["attempts"],
                attempt.at,
                attempt.state.value,
                attempt.status_code,
                attempt.body,
                attempt.duration_ms,
                attempt.url,
            ),
        )
        return True

    async def open_deliveries(self) -> int:
        row = await self._one("SELECT count(*) AS n FROM notification_deliveries WHERE state = ANY (%s)", (_OPEN,))
        return int(row["n"]) if row else 0

    # -- resets and sweeps -----------------------------------------------------------------------------

    async def notice_reset(self, rule_id: str, entitlement_id: str, reset_at: datetime) -> bool:
        row = await self._one(
            "INSERT INTO reset_notices (rule_id, entitlement_id, reset_at) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING RETURNING rule_id",
            (rule_id, entitlement_id, reset_at),
        )
        return row is not None

    async def claim_sweep(self, now: datetime, next_at: datetime) -> bool:
        """Whether this process sweeps now (at most one does per interval)."""
        row = await self._one(
            "INSERT INTO alert_sweeps (name, next_at) VALUES ('evaluate', %(next)s) "
            "ON CONFLICT (name) DO UPDATE SET next_at = %(next)s WHERE alert_sweeps.next_at <= %(now)s "
            "RETURNING name",
            {"now": now, "next": next_at},
        )
        return row is not None

    async def metered_subjects(self, among: Sequence[str] | None) -> list[str]:
        """Subjects with a live metered entitlement (all of them, or those of ``among``)."""
        if among is None:
            rows = await self._all(
                "SELECT DISTINCT subject_key FROM entitlements WHERE type = 'metered' AND deleted_at IS NULL "
                "ORDER BY subject_key"
            )
        else:
            rows = await self._all(
                "SELECT DISTINCT subject_key FROM entitlements WHERE type = 'metered' AND deleted_at IS NULL "
                "AND subject_key = ANY (%s)",
                (list(among),),
            )
        return [r["subject_key"] for r in rows]


def _json(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(dict(value))


def _thresholds(ts: Sequence[Threshold]) -> Jsonb:
    # Values as strings: exact decimals, never through a float.
    return Jsonb([{"type": t.type, "value": str(t.value)} for t in ts])


def _channel(r: DictRow) -> Channel:
    return Channel(
        id=r["id"],
        name=r["name"],
        url=r["url"],
        custom_headers=r["custom_headers"] or {},
        signing_secret=r["signing_secret"],
        disabled=r["disabled"],
        metadata=r["metadata"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        deleted_at=r["deleted_at"],
    )


def _rule(r: DictRow) -> Rule:
    return Rule(
        id=r["id"],
        type=r["type"],
        name=r["name"],
        disabled=r["disabled"],
        thresholds=tuple(Threshold(t["type"], Decimal(t["value"])) for t in r["thresholds"] or []),
        feature_ids=tuple(r["feature_ids"] or ()),
        channel_ids=tuple(r["channel_ids"] or ()),
        metadata=r["metadata"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        deleted_at=r["deleted_at"],
    )


def _attempt(r: DictRow) -> Attempt:
    return Attempt(
        at=r["at"],
        state=DeliveryState(r["state"]),
        status_code=r["status_code"],
        body=r["body"],
        duration_ms=r["duration_ms"],
        url=r["url"],
    )


def _delivery(r: DictRow, history: Sequence[Attempt]) -> Delivery:
    return Delivery(
        event_id=r["event_id"],
        channel_id=r["channel_id"],
        state=DeliveryState(r["state"]),
        reason=r["reason"],
        next_attempt_at=r["next_attempt_at"],
        give_up_at=r["give_up_at"],
        attempts=r["attempts"],
        updated_at=r["updated_at"],
        history=tuple(history),
    )


def _event(r: DictRow, deliveries: Sequence[Delivery]) -> Event:
    return Event(
        id=r["id"],
        type=r["type"],
        rule_id=r["rule_id"],
        subject_key=r["subject_key"],
        feature_id=r["feature_id"],
        payload=r["payload"],
        annotations=r["annotations"],
        created_at=r["created_at"],
        deliveries=tuple(deliveries),
    )

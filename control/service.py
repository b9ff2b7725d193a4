"""The control plane's rules: features, subjects, entitlements, grants, resets, plans and balances.

Semantics follow OpenMeter's v1 entitlements (see ``control/README.md`` for the rules and where Meterstream
differs); usage always comes from the metered windows through :class:`UsageReader`, the same numbers the
query API returns, and is never counted a second time here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Protocol
from zoneinfo import ZoneInfo

from ulid import ULID

from control import engine, sizing
from control.inputs import (
    BooleanIn,
    FeatureIn,
    GrantIn,
    MeteredIn,
    PeriodIn,
    PlanIn,
    ResetIn,
    StaticIn,
    SubjectIn,
    parse_entitlement,
)
from control.model import (
    Entitlement,
    EntitlementType,
    Feature,
    Grant,
    Plan,
    Reservation,
    ReservationStatus,
    Subject,
    SubjectPlan,
    UsageReset,
)
from control.periods import Interval, RecurringPeriod, truncate_minute
from control.store import ControlStore, ControlTx, Listing
from schemas.meters import GROUP_BY_KEYS, Meter, find_meter, stable_ulid
from schemas.problems import FieldError, Problem, bad
from schemas.query import MeterQuery

ZERO = Decimal(0)
#: Tries at reading the usage and the applied offsets as one snapshot.
SNAPSHOT_ATTEMPTS: Final = 3
#: A ULID as Meterstream writes ids (Crockford base32, 26 characters).
_ULID: Final = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
#: How a grant that never expires (the one issueAfterReset makes) is shown, as OpenMeter shows it.
NEVER = ("YEAR", 100)


class UsageReader(Protocol):
    """Metered usage, as the query API computes it (implemented over ClickHouse in ``sinks/``)."""

    def segment_totals(self, query: MeterQuery, boundaries: Sequence[datetime]) -> list[Decimal]: ...

    def usage_subjects(self) -> list[tuple[str, datetime]]: ...

    def applied_offsets(self) -> Mapping[tuple[str, int], int]:
        """The last events-topic offset applied to the windows, per (topic id, partition)."""
        ...

    def event_positions(self, source: str, ids: Sequence[str]) -> Mapping[str, tuple[str, int, int]]:
        """Where the stored events with these ids (of ``source``) came from: (topic id, partition, offset)."""
        ...


def not_found(what: str) -> Problem:
    return Problem(404, f"{what} not found")


def new_id() -> str:
    return str(ULID())


def is_ulid(text: str) -> bool:
    """A ULID in Crockford's base32, either case (26 characters, 128 bits: python-ulid's own check)."""
    try:
        ULID.from_str(text)
    except ValueError:
        return False
    return True


def add_expiration(start: datetime, duration: str, count: int) -> datetime:
    """``start`` plus ``count`` × ``duration``, month arithmetic clamped to the month's last day."""
    if duration == "HOUR":
        return start + timedelta(hours=count)
    interval = {"DAY": Interval(days=count), "WEEK": Interval(days=7 * count)}.get(
        duration, Interval(months=count * (12 if duration == "YEAR" else 1))
    )
    return RecurringPeriod(interval, start).boundary(1)


@dataclass(frozen=True, slots=True)
class Value:
    """An entitlement's value at a time (``EntitlementValue``)."""

    has_access: bool
    balance: Decimal | None = None
    usage: Decimal | None = None
    overage: Decimal | None = None
    total_available: Decimal | None = None
    config: str | None = None
    #: Cost features: calls in the period whose price is unknown (their cost is not in ``usage``).
    unpriced_requests: Decimal | None = None
    #: Held by live reservations (already taken from ``balance``); Meterstream's addition.
    reserved: Decimal | None = None
    #: The balance before holds (what alerts judge balances on: a hold is not usage yet).
    settled_balance: Decimal | None = None


@dataclass(frozen=True, slots=True)
class HistoryWindow:
    start: datetime
    end: datetime
    usage: Decimal
    balance_at_start: Decimal


@dataclass(frozen=True, slots=True)
class History:
    windows: list[HistoryWindow]
    segments: list[engine.Segment]
    grants: list[Grant]


@dataclass(frozen=True, slots=True)
class EntitlementView:
    """An entitlement with what its API shape needs beyond the stored record."""

    entitlement: Entitlement
    last_reset: datetime | None
    current_period: tuple[datetime, datetime] | None


class ControlService:
    """The control plane's operations, each one transaction (plus usage reads outside it)."""

    def __init__(
        self,
        store: ControlStore,
        usage: UsageReader,
        default_plan: str | None = None,
        horizon: timedelta = timedelta(hours=1),
        reservation_source: str = "meterstream/reservations",
    ) -> None:
        self.store = store
        self._usage = usage
        self._default_plan = default_plan
        #: How far back a reservation's commit may still be missing from the windows (README "Reservations").
        self.horizon = horizon
        #: The CloudEvents source of reservations' usage events.
        self.reservation_source = reservation_source
        #: Told the subject of every change that may move a balance (the alerts' evaluator listens).
        self.on_change: Callable[[str], None] | None = None

    def changed(self, subject_key: str) -> None:
        """A subject's usage or limits changed (called after the change committed)."""
        if self.on_change is not None:
            self.on_change(subject_key)

    @staticmethod
    def now() -> datetime:
        """The one clock of every rule (not the database's: asking it would cost a round trip each time)."""
        return datetime.now(UTC)

    # -- features --------------------------------------------------------------------------------------

    async def create_feature(self, inp: FeatureIn) -> Feature:
        if is_ulid(inp.key):
            raise bad("key", "a feature key cannot be a valid ULID (ids and keys must not be confused)")
        if inp.unitCost is not None:
            raise bad("unitCost", "not supported: Meterstream prices LLM usage itself (see the cost_usd meter)")
        if inp.advancedMeterGroupByFilters:
            raise bad("advancedMeterGroupByFilters", "not supported on features; use meterGroupByFilters")
        filters = dict(inp.meterGroupByFilters or {})
        if inp.meterSlug is not None:
            meter = find_meter(inp.meterSlug)
            if meter is None:
                raise bad("meterSlug", f"no such meter: {inp.meterSlug}")
            for key in filters:
                if key not in GROUP_BY_KEYS or key == "subject":
                    allowed = ", ".join(k for k in GROUP_BY_KEYS if k != "subject")
                    raise bad(f"meterGroupByFilters.{key}", f"not a group-by key of meter {meter.slug} ({allowed})")
        elif filters:
            raise bad("meterGroupByFilters", "filters need a meterSlug")
        now = self.now()
        feature = Feature(
            id=new_id(),
            key=inp.key,
            name=inp.name,
            meter_slug=inp.meterSlug,
            filters=filters,
            metadata=inp.metadata,
            created_at=now,
            updated_at=now,
        )
        async with self.store.tx() as tx:
            await tx.insert_feature(feature)
        return feature

    async def get_feature(self, id_or_key: str) -> Feature:
        async with self.store.tx() as tx:
            feature = await tx.feature(id_or_key, include_archived=is_ulid(id_or_key))
        if feature is None:
            raise not_found(f"feature {id_or_key}")
        return feature

    async def list_features(
        self,
        *,
        meter_slugs: Sequence[str],
        include_archived: bool,
        listing: Listing,
    ) -> tuple[list[Feature], int]:
        async with self.store.tx() as tx:
            return await tx.features(
                meter_slugs=meter_slugs,
                include_archived=include_archived,
                listing=listing,
            )

    async def delete_feature(self, id_or_key: str) -> None:
        """Archive: existing entitlements keep working; no new ones; the key may be reused."""
        async with self.store.tx() as tx:
            feature = await tx.feature(id_or_key, include_archived=False)
            if feature is None:
                raise not_found(f"feature {id_or_key}")
            await tx.archive_feature(feature.id, self.now())

    # -- subjects --------------------------------------------------------------------------------------

    async def upsert_subjects(self, inputs: Sequence[SubjectIn]) -> list[Subject]:
        now = self.now()
        out = []
        async with self.store.tx() as tx:
            for inp in inputs:
                subject = Subject(
                    id=stable_ulid(f"subject:{inp.key}"),
                    key=inp.key,
                    display_name=inp.displayName,
                    metadata=inp.metadata,
                    current_period_start=_utc(inp.currentPeriodStart),
                    current_period_end=_utc(inp.currentPeriodEnd),
                    stripe_customer_id=inp.stripeCustomerId,
                    created_at=now,
                    updated_at=now,
                )
                out.append(await tx.upsert_subject(subject, sorted(inp.model_fields_set)))
        return out

    def _seen_subject(self, key: str, first: datetime) -> Subject:
        """A subject known only from its usage events."""
        return Subject(stable_ulid(f"subject:{key}"), key, None, None, None, None, None, first, first)

    async def list_subjects(self) -> list[Subject]:
        async with self.store.tx() as tx:
            stored = {s.key: s for s in await tx.subjects()}
        for key, first in await asyncio.to_thread(self._usage.usage_subjects):
            stored.setdefault(key, self._seen_subject(key, first))
        return [stored[k] for k in sorted(stored)]

    async def get_subject(self, id_or_key: str) -> Subject:
        async with self.store.tx() as tx:
            subject = await tx.subject(id_or_key)
        if subject is not None:
            return subject
        for key, first in await asyncio.to_thread(self._usage.usage_subjects):
            if id_or_key in (key, stable_ulid(f"subject:{key}")):
                return self._seen_subject(key, first)
        raise not_found(f"subject {id_or_key}")

    async def subject_key(self, id_or_key: str) -> str:
        """The key of the subject a path names by its id or its key (OpenMeter's ``subjectIdOrKey``): an id
        is a ULID, so anything else is taken as a key without a lookup; a ULID that is no stored subject's id
        is a key too (keys may well be ULIDs). Only stored subjects (``POST /api/v1/subjects``) are found by
        id here: a subject known only from its usage would need a scan of every subject on each request of
        an app whose keys look like ULIDs."""
        if not _ULID.fullmatch(id_or_key):
            return id_or_key
        async with self.store.tx() as tx:
            subject = await tx.subject(id_or_key)
        return subject.key if subject is not None else id_or_key

    async def delete_subject(self, id_or_key: str) -> None:
        """Removes the subject's record (display name, metadata); its usage and entitlements stay."""
        async with self.store.tx() as tx:
            subject = await tx.subject(id_or_key)
            if subject is None or not await tx.delete_subject(subject.key):
                raise not_found(f"subject {id_or_key}")

    # -- entitlements ----------------------------------------------------------------------------------

    async def _metered_feature(self, tx: ControlTx, inp: MeteredIn | StaticIn | BooleanIn, field: str = "") -> Feature:
        ref = inp.featureId or inp.featureKey
        if ref is None:
            raise bad(f"{field}featureKey", "featureKey or featureId is required")
        feature = await tx.feature(ref, include_archived=False)
        if feature is None:
            raise Problem(404, f"feature {ref} not found", [FieldError(f"{field}featureKey", "no such feature")])
        if inp.featureKey is not None and inp.featureId is not None and feature.key != inp.featureKey:
            raise bad(f"{field}featureId", "featureId and featureKey name different features")
        if isinstance(inp, MeteredIn) and feature.meter_slug is None:
            raise bad(f"{field}featureKey", f"feature {feature.key} has no meter; a metered entitlement needs one")
        return feature

    def _build_entitlement(
        self,
        subject_key: str,
        feature: Feature,
        inp: MeteredIn | StaticIn | BooleanIn,
        now: datetime,
        plan: tuple[str, str] | None = None,
    ) -> tuple[Entitlement, Grant | None]:
        period = _period(inp.usagePeriod, now) if inp.usagePeriod is not None else None
        measure_from = None
        kind = EntitlementType(inp.type)
        extra: dict[str, Any] = {}
        if isinstance(inp, MeteredIn):
            assert period is not None
            if inp.issueAfterReset is None and "issueAfterResetPriority" in inp.model_fields_set:
                raise bad("issueAfterResetPriority", "issueAfterResetPriority requires issueAfterReset")
            m = inp.measureUsageFrom
            if m is None or m == "NOW":
                measure_from = truncate_minute(now)
            elif m == "CURRENT_PERIOD_START":
                measure_from = period.containing(now)[0]
            else:
                assert isinstance(m, datetime)
                measure_from = truncate_minute(m)
            extra = {
                "is_soft_limit": inp.isSoftLimit,
                "is_unlimited": inp.isUnlimited,
                "issue_after_reset": inp.issueAfterReset,
                "issue_after_reset_priority": inp.issueAfterResetPriority,
                "preserve_overage_at_reset": inp.preserveOverageAtReset,
            }
        ent = Entitlement(
            id=new_id(),
            subject_key=subject_key,
            feature_id=feature.id,
            feature_key=feature.key,
            type=kind,
            usage_period=period,
            measure_usage_from=measure_from,
            is_soft_limit=extra.get("is_soft_limit", False),
            is_unlimited=extra.get("is_unlimited", False),
            issue_after_reset=extra.get("issue_after_reset"),
            issue_after_reset_priority=extra.get("issue_after_reset_priority", 1),
            preserve_overage_at_reset=extra.get("preserve_overage_at_reset", False),
            config=inp.config if isinstance(inp, StaticIn) else None,
            metadata=inp.metadata,
            plan_key=plan[0] if plan else None,
            plan_template=plan[1] if plan else None,
            created_at=now,
            updated_at=now,
        )
        default_grant = None
        if ent.issue_after_reset is not None and ent.issue_after_reset > 0:
            assert measure_from is not None
            # As OpenMeter: a grant that never expires and whose rollover clamps to its amount, so it is
            # back to the full amount after every reset.
            default_grant = Grant(
                id=new_id(),
                entitlement_id=ent.id,
                amount=ent.issue_after_reset,
                priority=ent.issue_after_reset_priority,
                effective_at=measure_from,
                expiration_duration=NEVER[0],
                expiration_count=NEVER[1],
                expires_at=add_expiration(measure_from, *NEVER),
                max_rollover_amount=ent.issue_after_reset,
                min_rollover_amount=ent.issue_after_reset,
                recurrence=None,
                metadata=None,
                annotations={"issueAfterReset": True},
                created_at=now,
                updated_at=now,
            )
        return ent, default_grant

    async def _insert_entitlement(self, tx: ControlTx, ent: Entitlement, grant: Grant | None) -> None:
        existing = await tx.live_entitlement(ent.subject_key, ent.feature_key)
        if existing is not None and existing.deleted_at is None:
            raise Problem(
                409,
                f"entitlement with id {existing.id} already exists for feature {ent.feature_key} and subject "
                f"{ent.subject_key}",
                headers={},
            )
        await tx.insert_entitlement(ent)
        if grant is not None:
            await tx.insert_grant(grant)

    async def create_entitlement(self, subject_key: str, inp: MeteredIn | StaticIn | BooleanIn) -> EntitlementView:
        async with self.store.tx() as tx:
            await tx.lock_subject(subject_key)
            await self.apply_plan(tx, subject_key)
            feature = await self._metered_feature(tx, inp)
            ent, grant = self._build_entitlement(subject_key, feature, inp, self.now())
            await self._insert_entitlement(tx, ent, grant)
        self.changed(subject_key)
        return self._view(ent, [], ent.created_at)

    async def override_entitlement(
        self, subject_key: str, id_or_feature_key: str, inp: MeteredIn | StaticIn | BooleanIn
    ) -> EntitlementView:
        """End the live entitlement and start a new one in its place (its grants are not carried over)."""
        async with self.store.tx() as tx:
            await tx.lock_subject(subject_key)
            await self.apply_plan(tx, subject_key)
            old = await tx.live_entitlement(subject_key, id_or_feature_key)
            if old is None or old.deleted_at is not None:
                raise not_found(f"entitlement {id_or_feature_key} of subject {subject_key}")
            feature = await self._metered_feature(tx, inp)
            if feature.key != old.feature_key:
                raise bad("featureKey", "old and new entitlements belong to different features")
            now = self.now()
            await tx.delete_entitlement(old.id, now)
            ent, grant = self._build_entitlement(subject_key, feature, inp, now)
            await self._insert_entitlement(tx, ent, grant)
        self.changed(subject_key)
        return self._view(ent, [], ent.created_at)

    def _view(self, ent: Entitlement, resets: Sequence[UsageReset], now: datetime) -> EntitlementView:
        if ent.type is not EntitlementType.METERED or ent.usage_period is None or ent.measure_usage_from is None:
            period = ent.usage_period.containing(now) if ent.usage_period is not None else None
            return EntitlementView(ent, None, period)
        return EntitlementView(ent, _last_reset(ent, resets, now), current_period(ent, resets, now))

    async def _views(self, tx: ControlTx, ents: Sequence[Entitlement]) -> list[EntitlementView]:
        now = self.now()
        views = []
        for ent in ents:
            resets = await tx.resets_of(ent.id) if ent.type is EntitlementType.METERED else []
            views.append(self._view(ent, resets, now))
        return views

    async def subject_entitlements(self, subject_key: str, include_deleted: bool) -> list[EntitlementView]:
        async with self.store.tx() as tx:
            await self.apply_plan(tx, subject_key)
            return await self._views(tx, await tx.subject_entitlements(subject_key, include_deleted))

    async def get_entitlement(self, subject_key: str | None, entitlement_id: str) -> EntitlementView:
        async with self.store.tx() as tx:
            ent = await tx.entitlement(entitlement_id)
            if (
                ent is None
                or ent.deleted_at is not None
                or (subject_key is not None and ent.subject_key != subject_key)
            ):
                raise not_found(f"entitlement {entitlement_id}")
            return (await self._views(tx, [ent]))[0]

    async def list_entitlements(
        self,
        *,
        features: Sequence[str],
        subjects: Sequence[str],
        types: Sequence[str],
        listing: Listing,
    ) -> tuple[list[EntitlementView], int]:
        async with self.store.tx() as tx:
            ents, total = await tx.entitlements(
                features=features,
                subjects=subjects,
                types=types,
                listing=listing,
            )
            return await self._views(tx, ents), total

    async def delete_entitlement(self, subject_key: str, entitlement_id: str) -> None:
        async with self.store.tx() as tx:
            await tx.lock_subject(subject_key)
            ent = await tx.entitlement(entitlement_id)
            if ent is None or ent.deleted_at is not None or ent.subject_key != subject_key:
                raise not_found(f"entitlement {entitlement_id}")
            await tx.delete_entitlement(ent.id, self.now())

    async def _live(self, tx: ControlTx, subject_key: str, ref: str) -> Entitlement:
        await self.apply_plan(tx, subject_key)
        ent = await tx.live_entitlement(subject_key, ref)
        if ent is None or ent.deleted_at is not None:
            raise not_found(f"entitlement {ref} of subject {subject_key}")
        return ent

    async def reset(self, subject_key: str, entitlement_id: str, inp: ResetIn) -> None:
        async with self.store.tx() as tx:
            await tx.lock_subject(subject_key)
            ent = await self._live(tx, subject_key, entitlement_id)
            if ent.type is not EntitlementType.METERED:
                raise bad("entitlementId", f"expected entitlement type metered but got {ent.type.value}")
            now = self.now()
            raw_at = _utc(inp.effectiveAt) or now
            if raw_at > now:
                raise bad("effectiveAt", f"cannot reset at {_iso(raw_at)} in the future")
            at = truncate_minute(raw_at)
            resets = await tx.resets_of(ent.id)
            last = _last_reset(ent, resets, now)
            if at <= last:
                raise bad("effectiveAt", f"reset at {_iso(at)} must be after last reset at {_iso(last)}")
            start = current_period(ent, resets, now)[0]
            if at < start:
                raise bad("effectiveAt", f"reset at {_iso(at)} is before current usage period start {_iso(start)}")
            preserve = inp.preserveOverage if inp.preserveOverage is not None else ent.preserve_overage_at_reset
            await tx.insert_reset(UsageReset(ent.id, at, inp.retainAnchor, preserve, now))
        self.changed(subject_key)

    # -- grants ----------------------------------------------------------------------------------------

    async def create_grant(self, subject_key: str, ref: str, inp: GrantIn) -> Grant:
        async with self.store.tx() as tx:
            await tx.lock_subject(subject_key)
            ent = await self._live(tx, subject_key, ref)
            if ent.type is not EntitlementType.METERED:
                raise bad("entitlementIdOrFeatureKey", f"expected entitlement type metered but got {ent.type.value}")
            if inp.amount <= 0:
                raise bad("amount", "amount must be positive")
            now = self.now()
            effective = truncate_minute(inp.effectiveAt)
            start = current_period(ent, await tx.resets_of(ent.id), now)[0]
            if effective < start:
                raise bad(
                    "effectiveAt",
                    f"grant effective date {_iso(effective)} is before the current usage period {_iso(start)}",
                )
            recurrence = None
            if inp.recurrence is not None:
                recurrence = _period(inp.recurrence, effective)
            grant = Grant(
                id=new_id(),
                entitlement_id=ent.id,
                amount=inp.amount,
                priority=inp.priority,
                effective_at=effective,
                expiration_duration=inp.expiration.duration,
                expiration_count=inp.expiration.count,
                expires_at=add_expiration(effective, inp.expiration.duration, inp.expiration.count),
                max_rollover_amount=inp.maxRolloverAmount,
                min_rollover_amount=inp.minRolloverAmount,
                recurrence=recurrence,
                metadata=inp.metadata,
                annotations=None,
                created_at=now,
                updated_at=now,
            )
            await tx.insert_grant(grant)
        self.changed(subject_key)
        return grant

    async def entitlement_grants(self, subject_key: str, ref: str, include_voided: bool) -> list[Grant]:
        async with self.store.tx() as tx:
            ent = await self._live(tx, subject_key, ref)
            grants = await tx.grants_of([ent.id])
        return [g for g in grants if include_voided or g.voided_at is None]

    async def list_grants(
        self,
        *,
        features: Sequence[str],
        subjects: Sequence[str],
        include_voided: bool,
        listing: Listing,
    ) -> tuple[list[tuple[Grant, Entitlement]], int]:
        async with self.store.tx() as tx:
            return await tx.grants(
                features=features,
                subjects=subjects,
                include_voided=include_voided,
                listing=listing,
            )

    async def void_grant(self, grant_id: str, at: datetime | None) -> None:
        async with self.store.tx() as tx:
            grant = await tx.grant(grant_id)
            if grant is None:
                raise not_found(f"grant {grant_id}")
            ent = await tx.entitlement(grant.entitlement_id)
            assert ent is not None
            await tx.lock_subject(ent.subject_key)
            if grant.voided_at is not None:
                raise bad("grantId", "grant already voided")
            now = self.now()
            raw = at or now
            if raw > now:
                raise bad("at", f"void time {_iso(raw)} must not be in the future")
            void_at = truncate_minute(raw)
            start = current_period(ent, await tx.resets_of(ent.id), now)[0]
            if void_at < start:
                raise bad("at", f"void time {_iso(void_at)} is before the current usage period start {_iso(start)}")
            await tx.void_grant(grant.id, void_at)
        self.changed(ent.subject_key)

    # -- values and history ----------------------------------------------------------------------------

    async def _metered_state(
        self, subject_key: str, ref: str, with_reservations: bool = False
    ) -> tuple[Entitlement, Feature, list[Grant], list[UsageReset], datetime, list[Reservation]]:
        """The entitlement (by id or, beyond OpenMeter where it takes ids only, by feature key), its grants
        and resets, and (if asked) the subject's open reservations on it, read in one transaction."""
        async with self.store.tx() as tx:
            ent = await self._live(tx, subject_key, ref)
            feature = await tx.feature(ent.feature_id)
            assert feature is not None
            now = self.now()
            if ent.type is not EntitlementType.METERED:
                return ent, feature, [], [], now, []
            grants = await tx.grants_of([ent.id])
            resets = await tx.resets_of(ent.id)
            open_ = await tx.open_reservations(ent.subject_key, now, now - self.horizon) if with_reservations else []
            return (
                ent,
                feature,
                grants,
                resets,
                now,
                [r for r in open_ if any(ln.entitlement_id == ent.id for ln in r.lines)],
            )

    @property
    def default_plan(self) -> str | None:
        return self._default_plan

    @property
    def usage(self) -> UsageReader:
        return self._usage

    def usage_query(
        self, subject_key: str, feature: Feature, meter: Meter, start: datetime, end: datetime | None
    ) -> MeterQuery:
        """The query API's query for a feature's usage of one subject over ``[start, end)``."""
        include = {"subject": (subject_key,), **{k: (v,) for k, v in feature.filters.items()}}
        return MeterQuery(meter=meter, start=start, end=end, include=include)

    async def replay(
        self,
        ent: Entitlement,
        feature: Feature,
        grants: Sequence[Grant],
        resets: Sequence[UsageReset],
        at: datetime,
        *,
        extra: Sequence[datetime] = (),
        record: bool = False,
    ) -> tuple[engine.Balance, engine.Timeline]:
        meter = find_meter(feature.meter_slug or "")
        if meter is None:
            raise Problem(500, f"feature {feature.key} counts meter {feature.meter_slug}, which does not exist")
        # The engine is pure but may walk many boundaries (a long history of short periods): off the loop.
        line = await asyncio.to_thread(
            engine.timeline, ent, grants, resets, at, extra=extra, replay_by=min(extra, default=None)
        )
        usages: list[Decimal] = []
        if len(line.boundaries) > 1:
            query = self.usage_query(ent.subject_key, feature, meter, line.boundaries[0], line.end)
            usages = await asyncio.to_thread(self._usage.segment_totals, query, line.boundaries[1:-1])
        return await asyncio.to_thread(engine.replay, line, usages, record), line

    async def value(self, subject_key: str, ref: str, at: datetime | None) -> Value:
        ent, feature, grants, resets, now, reservations = await self._metered_state(
            subject_key, ref, with_reservations=at is None
        )
        if ent.type is EntitlementType.BOOLEAN:
            return Value(has_access=True)
        if ent.type is EntitlementType.STATIC:
            return Value(has_access=True, config=ent.config)
        t = at or now
        assert ent.measure_usage_from is not None
        if t < ent.measure_usage_from:
            money = (m := find_meter(feature.meter_slug or "")) is not None and m.is_money
            return Value(
                has_access=ent.is_soft_limit or ent.is_unlimited,
                balance=ZERO,
                usage=ZERO,
                overage=ZERO,
                total_available=ZERO,
                unpriced_requests=ZERO if money else None,  # a cost feature always reports it
            )
        # The usage and the applied offsets as one snapshot (equal offsets before and after the usage read),
        # so a commit counts either in the usage or as pending (control/sizing.py, outstanding).
        # (After the last attempt the offsets read first stand: a commit may then count twice, never not at all.)
        applied: Mapping[tuple[str, int], int] = {}
        for attempt in range(SNAPSHOT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.005)  # a write was under way: let it finish
            applied = await asyncio.to_thread(self._usage.applied_offsets) if reservations else {}
            balance, _ = await self.replay(ent, feature, grants, resets, t)
            reservations = await with_stored_positions(self._usage, self.reservation_source, reservations)
            if not reservations or await asyncio.to_thread(self._usage.applied_offsets) == applied:
                break
        out = sizing.outstanding(ent.id, reservations, applied, balance.last_reset, t)
        unpriced = None
        meter = find_meter(feature.meter_slug or "")
        if meter is not None and meter.is_money:
            unpriced_meter = find_meter("unpriced_requests")
            assert unpriced_meter is not None
            query = self.usage_query(ent.subject_key, feature, unpriced_meter, balance.last_reset, t)
            unpriced = (await asyncio.to_thread(self._usage.segment_totals, query, []))[0]
        # Committed usage not in the windows yet counts as usage (beyond the grants: as overage); holds only
        # take from what is left.
        after_pending = balance.balance - out.pending
        left = max(ZERO, max(ZERO, after_pending) - out.held)
        return Value(
            has_access=engine.has_access(ent, replace(balance, balance=left)),
            balance=left,
            usage=balance.usage + out.pending,
            overage=balance.overage + max(ZERO, -after_pending),
            total_available=balance.total_available,
            unpriced_requests=unpriced,
            reserved=out.held,
            settled_balance=max(ZERO, after_pending),
        )

    async def alert_view(
        self, subject_key: str, entitlement_id: str
    ) -> tuple[EntitlementView, Feature, Subject, Value]:
        """What a notification about one entitlement shows: the entitlement, its feature, its subject and its
        value now."""
        view = await self.get_entitlement(subject_key, entitlement_id)
        value = await self.value(subject_key, entitlement_id, None)
        async with self.store.tx() as tx:
            feature = await tx.feature(view.entitlement.feature_id)
            subject = await tx.subject(subject_key)
        assert feature is not None
        return view, feature, subject or self._seen_subject(subject_key, view.entitlement.created_at), value

    async def history(
        self,
        subject_key: str,
        entitlement_id: str,
        *,
        start: datetime | None,
        end: datetime | None,
        window_size: str,
        time_zone: str,
    ) -> History:
        ent, feature, grants, resets, now, _ = await self._metered_state(subject_key, entitlement_id)
        if ent.type is not EntitlementType.METERED:
            raise bad("entitlementId", f"expected entitlement type metered but got {ent.type.value}")
        assert ent.measure_usage_from is not None
        frm = truncate_minute(start) if start else _last_reset(ent, resets, now)
        to = end or now
        if frm < ent.measure_usage_from:
            raise bad("from", f"from {_iso(frm)} cannot be before {_iso(ent.measure_usage_from)}")
        if to <= frm:
            raise bad("to", "to must be after from")
        windows = window_grid(frm, to, window_size, time_zone)
        if len(windows) > 10_000:
            raise bad(
                "windowSize", f"{len(windows)} windows; at most 10000 (choose a larger window or a shorter range)"
            )
        cuts = [w for w, _ in windows] + [frm]
        balance, line = await self.replay(ent, feature, grants, resets, to, extra=cuts, record=True)
        out = []
        segments = [s for s in balance.segments if s.end > frm]
        for w_start, w_end in windows:
            lo, hi = max(w_start, frm), min(w_end, to)
            usage = sum((s.usage for s in segments if s.start >= lo and s.end <= hi), ZERO)
            at_start = balance.balance_at.get(lo)
            if at_start is None:  # before the replay's own start: the state at its first boundary
                at_start = balance.balance_at.get(line.boundaries[0], ZERO)
            out.append(HistoryWindow(lo, hi, usage, at_start))
        return History(out, segments, list(grants))

    # -- plans -----------------------------------------------------------------------------------------

    async def put_plan(self, key: str, inp: PlanIn) -> tuple[Plan, bool]:
        """Create or replace a plan; returns it and whether it was created. Its version goes up when its
        content changes, and each subject on it follows at its next request."""
        if inp.key != key:
            raise bad("key", f"the body's key ({inp.key}) differs from the path's ({key})")
        templates = []
        seen = set()
        async with self.store.tx() as tx:
            await tx.lock_plan(key)
            for i, t in enumerate(inp.entitlements):
                field = f"entitlements.{i}."
                if t.featureKey is None:
                    raise bad(f"{field}featureKey", "each template names its feature by featureKey")
                if t.featureKey in seen:
                    raise bad(f"{field}featureKey", f"feature {t.featureKey} appears twice")
                seen.add(t.featureKey)
                await self._metered_feature(tx, t, field)
                templates.append(t.model_dump(mode="json", exclude_unset=True) | {"type": t.type})
            now = self.now()
            old = await tx.plan(key)
            if old is not None:
                unchanged = (
                    old.name == inp.name
                    and old.description == inp.description
                    and (old.metadata or None) == (inp.metadata or None)
                    and list(old.entitlements) == templates
                )
                if unchanged:
                    return old, False
                plan = replace(
                    old,
                    name=inp.name,
                    description=inp.description,
                    metadata=inp.metadata,
                    entitlements=tuple(templates),
                    version=old.version + 1,
                    updated_at=now,
                )
            else:
                plan = Plan(new_id(), key, inp.name, inp.description, 1, tuple(templates), inp.metadata, now, now)
            await tx.save_plan(plan)
        return plan, old is None

    async def get_plan(self, key: str) -> Plan:
        async with self.store.tx() as tx:
            plan = await tx.plan(key)
        if plan is None:
            raise not_found(f"plan {key}")
        return plan

    async def list_plans(self) -> list[Plan]:
        async with self.store.tx() as tx:
            return await tx.plans()

    async def delete_plan(self, key: str) -> None:
        """Subjects on a deleted plan keep their entitlements until they are assigned another plan."""
        async with self.store.tx() as tx:
            await tx.lock_plan(key)
            plan = await tx.plan(key)
            if plan is None:
                raise not_found(f"plan {key}")
            await tx.delete_plan(plan.id, self.now())

    async def assign_plan(self, subject_key: str, plan_key: str) -> tuple[SubjectPlan, list[EntitlementView]]:
        """Put the subject on the plan (idempotent: safe to repeat on every login)."""
        async with self.store.tx() as tx:
            await tx.lock_subject(subject_key)
            plan = await tx.plan(plan_key)
            if plan is None:
                raise Problem(404, f"plan {plan_key} not found", [FieldError("planKey", "no such plan")])
            current = await tx.subject_plan(subject_key)
            now = self.now()
            if (
                current is None
                or current.plan_key != plan.key
                or current.plan_version != plan.version
                or current.is_default
            ):
                await self._sync(tx, subject_key, plan, now)
                await tx.set_subject_plan(SubjectPlan(subject_key, plan.key, plan.version, now, is_default=False))
            assignment = await tx.subject_plan(subject_key)
            assert assignment is not None
            views = await self._views(tx, await tx.subject_entitlements(subject_key, False))
        self.changed(subject_key)
        return assignment, views

    async def subject_plan(self, subject_key: str) -> SubjectPlan:
        async with self.store.tx() as tx:
            await self.apply_plan(tx, subject_key)
            assignment = await tx.subject_plan(subject_key)
        if assignment is None:
            raise not_found(f"plan of subject {subject_key}")
        return assignment

    async def unassign_plan(self, subject_key: str) -> None:
        """Take the subject off its plan: the plan's entitlements end (the default plan, if any, applies)."""
        async with self.store.tx() as tx:
            await tx.lock_subject(subject_key)
            if await tx.subject_plan(subject_key) is None:
                raise not_found(f"plan of subject {subject_key}")
            now = self.now()
            for ent in await tx.subject_entitlements(subject_key, False):
                if ent.plan_key is not None:
                    await tx.delete_entitlement(ent.id, now)
            await tx.clear_subject_plan(subject_key)

    async def apply_plan(self, tx: ControlTx, subject_key: str) -> None:
        """Bring the subject's plan entitlements up to date: the default plan for a subject without one, the
        current version of the plan it is on. Cheap when nothing changed (one read); otherwise it takes the
        subject's lock, so concurrent first requests of a new subject make its entitlements once."""
        current = await tx.subject_plan(subject_key)
        wanted_key = current.plan_key if current is not None and not current.is_default else self._default_plan
        if wanted_key is None:
            return
        plan = await tx.plan(wanted_key)
        if plan is None:
            return
        if current is not None and current.plan_key == plan.key and current.plan_version == plan.version:
            return
        await tx.lock_subject(subject_key)
        current = await tx.subject_plan(subject_key)  # again, under the lock
        if current is not None and current.plan_key == plan.key and current.plan_version == plan.version:
            return
        now = self.now()
        await self._sync(tx, subject_key, plan, now)
        is_default = current is None or current.is_default
        await tx.set_subject_plan(SubjectPlan(subject_key, plan.key, plan.version, now, is_default=is_default))

    async def _sync(self, tx: ControlTx, subject_key: str, plan: Plan, now: datetime) -> None:
        """Make the subject's plan-made entitlements match ``plan``'s templates. An entitlement made by hand
        wins over the plan's for its feature; one whose template did not change is kept (usage, grants)."""
        live = await tx.subject_entitlements(subject_key, False)
        by_feature = {e.feature_key: e for e in live}
        wanted = {}
        for template in plan.entitlements:
            wanted[str(template["featureKey"])] = template
        for ent in live:
            if ent.plan_key is not None and (
                ent.feature_key not in wanted or ent.plan_template != _canonical(wanted[ent.feature_key])
            ):
                await tx.delete_entitlement(ent.id, now)
                del by_feature[ent.feature_key]
        for feature_key, template in wanted.items():
            if feature_key in by_feature:
                continue  # kept (same template), or made by hand
            inp = parse_entitlement(_template_input(template))
            feature = await tx.feature(feature_key, include_archived=False)
            if feature is None:
                continue  # archived since the plan was saved: nothing new is made for it
            ent, grant = self._build_entitlement(subject_key, feature, inp, now, (plan.key, _canonical(template)))
            await tx.insert_entitlement(ent)
            if grant is not None:
                await tx.insert_grant(grant)


async def with_stored_positions(
    usage: UsageReader, source: str, reservations: Sequence[Reservation]
) -> list[Reservation]:
    """``reservations`` with the audit log's position for each commit whose position is not recorded (its
    send in flight, or failed): the event may be stored already, and then it is applied at that offset."""
    unknown = [r.id for r in reservations if r.status is ReservationStatus.COMMITTED and r.event_position is None]
    if not unknown:
        return list(reservations)
    found = await asyncio.to_thread(usage.event_positions, source, unknown)
    return [replace(r, event_position=found[r.id]) if r.id in found else r for r in reservations]


def _template_input(template: Mapping[str, Any]) -> dict[str, Any]:
    """A plan template as an entitlement input: usage counts from the start of the current period unless
    the template says otherwise (a subject moving to a plan mid-period brings its usage along)."""
    out = dict(template)
    if out.get("type") == "metered":
        out.setdefault("measureUsageFrom", "CURRENT_PERIOD_START")
    return out


def _canonical(template: Mapping[str, Any]) -> str:
    return json.dumps(template, sort_keys=True, separators=(",", ":"), default=str)


def _period(inp: PeriodIn, default_anchor: datetime) -> RecurringPeriod:
    anchor = _utc(inp.anchor) or default_anchor
    return RecurringPeriod(Interval.parse(inp.interval), anchor, inp.timeZone)


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _last_reset(ent: Entitlement, resets: Sequence[UsageReset], now: datetime) -> datetime:
    """The latest manual reset, else when usage started counting (as OpenMeter's ``lastReset``)."""
    assert ent.measure_usage_from is not None
    done = [r.at for r in resets if r.at <= now]
    return max(done) if done else ent.measure_usage_from


def current_period(ent: Entitlement, resets: Sequence[UsageReset], at: datetime) -> tuple[datetime, datetime]:
    """The usage period that ``at`` falls in, cut at manual resets and at the start of measurement."""
    assert ent.usage_period is not None
    assert ent.measure_usage_from is not None
    start = ent.measure_usage_from
    t = max(at, start)
    period = engine.period_in_force(ent.usage_period, [r for r in resets if r.at > start], t)
    frm, to = period.containing(t)
    cut = max([start, *(r.at for r in resets if r.at <= t)])
    later = [r.at for r in resets if r.at > t]
    return max(frm, cut), min([to, *later])


def window_grid(start: datetime, end: datetime, window_size: str, time_zone: str) -> list[tuple[datetime, datetime]]:
    """Windows of ``window_size`` in ``time_zone`` covering ``[start, end)``, the first one starting at or
    before ``start``."""
    if window_size == "HOUR":
        hours = _local_hour_starts(start, end, ZoneInfo(time_zone))
        if hours is not None:
            return list(itertools.pairwise(hours))
    # Anchored at a local midnight (HOUR too, when _local_hour_starts has no answer: hours in a zone with a
    # half-hour offset then start at :30 UTC, as the query API's do).
    local_midnight = datetime(2000, 1, 1, tzinfo=ZoneInfo(time_zone))
    interval = {"MINUTE": Interval(minutes=1), "HOUR": Interval(minutes=60), "DAY": Interval(days=1)}.get(
        window_size, Interval(months=1)
    )
    period = RecurringPeriod(interval, local_midnight, time_zone)
    first = period.containing(start)[0]
    bounds = [first, *period.boundaries(first, end)]
    if bounds[-1] < end:
        bounds.append(period.containing(end)[1])
    return list(itertools.pairwise(bounds))


_QUARTER_HOUR: Final = timedelta(minutes=15)


def _local_hour_starts(start: datetime, end: datetime, zone: ZoneInfo) -> list[datetime] | None:
    """The instants at which a local hour starts (local minute and second zero), from the last one at or
    before ``start`` to the first one at or after ``end``: the query API's HOUR windows start at the local
    hour of each minute, so after Australia/Lord_Howe's half-hour DST change its hours start half an hour
    later in UTC, which stepping 60 minutes from one anchor misses (the window around the change is then
    90 or 30 minutes long). Every zone's offset since 1972 is a multiple of 15 minutes, so the instants lie
    on UTC quarter hours; None if a zone has none for two hours (Monrovia's -0:44:30 before 1972)."""

    def at_local_hour(t: datetime) -> bool:
        local = t.astimezone(zone)
        return local.minute == 0 and local.second == 0

    t = start.astimezone(UTC).replace(second=0, microsecond=0)
    t -= timedelta(minutes=t.minute % 15)
    for _ in range(9):
        if at_local_hour(t):
            break
        t -= _QUARTER_HOUR
    else:
        return None
    starts, misses = [t], 0
    while starts[-1] < end:
        t += _QUARTER_HOUR
        if at_local_hour(t):
            starts.append(t)
            misses = 0
        elif (misses := misses + 1) > 8:
            return None
    return starts

"""Reservations: hold an upper bound of a call's usage before it is made, commit what it used after it,
release the hold if it failed. A hold not settled within its TTL expires by itself.

Exactness (see ``control/README.md``, "Reservations"):

- Reserve decisions for one subject are serialised by the subject's lock in PostgreSQL, across processes.
  Inside it, for each entitlement the call counts toward, what is left is
  ``balance (grants burnt down by the windows' usage) − live holds − commits not yet in the windows``,
  and the reservation holds its amount on all of them or on none.
- A commit records one usage event whose id is the reservation's id (a retried commit is counted once by
  the pipeline's dedupe) and keeps it in PostgreSQL with the commit, so it survives a crash before the
  broker has it: a relay sends what was not acknowledged (at least once; the id makes it exactly once).
- The broker's acknowledgement gives the event's offset. A commit counts as pending until the sink has
  applied that offset, and from then on only the windows count it: the applied offsets and the usage are
  read as one snapshot (between two equal write versions of the subject), so never both, never neither. A
  commit whose position is not recorded yet is looked up in the audit log by its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Protocol

from prometheus_client import Counter

from control import engine, sizing
from control.inputs import CommitIn, EstimateIn, ReserveIn
from control.model import Entitlement, Feature, Grant, HoldLine, Reservation, ReservationStatus, UsageReset
from control.service import SNAPSHOT_ATTEMPTS, ControlService, current_period, new_id, not_found, with_stored_positions
from control.store import ControlTx, ReserveState, StoreUnavailable
from control.usage_cache import Segments, UsageCache
from schemas.estimate import EstimateError, TokenBound, bound_request
from schemas.meters import WindowChange, find_meter
from schemas.problems import FieldError, Problem, bad
from schemas.settings import ReservationSettings
from schemas.usage import canonical_provider

log = logging.getLogger(__name__)

ZERO: Final = Decimal(0)
USAGE_READS: Final = Counter(
    "meterstream_reservation_usage_reads_total",
    "Reserves' reads of a subject's windows usage, by source: ClickHouse, or the usage kept and brought "
    "forward by the sink of this process (control/usage_cache.py)",
    ["source"],
)
#: Most cached usage reads kept (a few hundred bytes each).
MAX_CACHED: Final = 100_000
#: A commit whose event the broker has not acknowledged this long after it is sent again by the relay (longer
#: than a request's own produce may take, so the two rarely both send; when they do, see ``mark_sent``).
RELAY_AFTER: Final = timedelta(seconds=15)


class EmitFailed(Exception):
    """The broker did not acknowledge a usage event (it stays in PostgreSQL; the relay sends it later)."""


@dataclass(frozen=True, slots=True)
class AcceptedUsage:
    """A usage event as ingest accepts it: the canonical counts and what prices them."""

    provider: str
    model: str
    usage: Mapping[str, int]
    price_context: Mapping[str, str]


class UsageEvents(Protocol):
    """The ingest path, for the events commits record (wired by each process's entry point)."""

    def accept(self, event: Mapping[str, Any]) -> AcceptedUsage:
        """Validate one CloudEvent exactly as ingest does. Raises schemas.problems.Problem (400)."""
        ...

    async def emit(self, event: Mapping[str, Any]) -> tuple[str, int, int]:
        """Produce the event and wait for the broker; returns (events topic id, partition, an offset at or
        after the event's). Raises EmitFailed."""
        ...


class CallPricer(Protocol):
    def cost(
        self, provider: str, model: str, at: datetime, usage: Mapping[str, int], context: Mapping[str, str]
    ) -> Decimal | None:
        """The call's cost in USD, None when the model has no known price."""
        ...

    def rates(self, provider: str, model: str, at: datetime, context: Mapping[str, str]) -> sizing.Rates | None:
        """The highest rates that could apply to the call, None when the model has no known price."""
        ...


class UsageClock(Protocol):
    """How far the windows this process reads are (wired to the local sink where there is one)."""

    def applied_offsets(self) -> Mapping[tuple[str, int], int]:
        """The last events-topic offset applied to the windows, per (topic id, partition)."""
        ...

    def usage_version(self, subject: str) -> Hashable | None:
        """A token equal before and after a read of ``subject``'s windows only if no write touched them in
        between; None when it cannot be told (then nothing is cached)."""
        ...


@dataclass(frozen=True, slots=True)
class LineView:
    """A feature a reservation holds on, with what is left of it."""

    line: HoldLine
    #: What is left for new holds: after this hold when it was granted, before it when it was denied.
    balance: Decimal | None
    over_limit: bool
    fits: bool = True
    #: When room comes back by itself: the earliest expiry of a live hold, or the end of the period.
    frees_at: datetime | None = None
    #: What was left before this hold.
    available: Decimal | None = None


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    reservation: Reservation
    lines: list[LineView]
    created: bool


class LimitReached(Problem):
    """429: the call does not fit; says how much is left, and what would fit."""

    def __init__(self, detail: str, lines: list[LineView], fit: int | None, retry_after_s: int | None) -> None:
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}
        super().__init__(429, detail, headers=headers)
        self.lines = lines
        self.fit = fit


@dataclass(frozen=True, slots=True)
class _Target:
    ent: Entitlement
    feature: Feature
    column: str
    amount: Decimal | None


class ReservationService:
    """Reserve, commit, release (and the relay that makes sure every commit reaches the broker)."""

    def __init__(
        self,
        *,
        control: ControlService,
        events: UsageEvents,
        pricer: CallPricer,
        clock: UsageClock,
        settings: ReservationSettings,
        usage_event_type: str,
    ) -> None:
        self._control = control
        self._store = control.store
        self._events = events
        self._pricer = pricer
        self._clock = clock
        #: Usage per segment of a subject's current timeline, at a write version (see _balance).
        self._usage = UsageCache(MAX_CACHED)
        self._settings = settings
        self._event_type = usage_event_type
        self._queues = _KeyedLock()

    # -- estimate --------------------------------------------------------------------------------------

    def bound(
        self, provider: str, model: str, request: Mapping[str, Any], at: datetime, extra: int = 0
    ) -> tuple[TokenBound, sizing.CallBound]:
        """The request's token bound (``extra`` input tokens added for what it cannot see) and its priced
        form."""
        try:
            # The body was read with exact decimals; the bound takes plain JSON values.
            plain = _plain(request)
            tokens = bound_request(
                provider, plain, default_max_output=self._settings.default_max_output_tokens, extra_input_tokens=extra
            )
        except EstimateError as exc:
            raise bad(exc.field, exc.message) from None
        context = _price_context(request)
        rates = self._pricer.rates(provider, model, at, context)
        return tokens, sizing.CallBound(tokens.input_tokens, tokens.output_tokens, rates)

    def estimate(self, inp: EstimateIn) -> tuple[TokenBound, Decimal | None]:
        tokens, call = self.bound(inp.provider, inp.model, inp.request, self._control.now(), inp.extraInputTokens)
        return tokens, call.cost()

    async def subject_key(self, id_or_key: str) -> str:
        """The key of the subject named by its id or key (``ControlService.subject_key``)."""
        return await self._control.subject_key(id_or_key)

    def windows_stored(
        self, changes: Sequence[WindowChange], versions: Mapping[str, tuple[Hashable, Hashable]]
    ) -> None:
        """The sink of this process stored a write (``Sink.on_windows_stored``; any thread): the usage kept
        for reserves is brought forward by it."""
        self._usage.stored(changes, versions)

    # -- reserve ---------------------------------------------------------------------------------------

    async def reserve(self, subject_key: str, inp: ReserveIn) -> ReserveOutcome:
        given = [k for k in ("estimate", "request", "amounts") if getattr(inp, k) is not None]
        if len(given) != 1:
            raise bad("estimate", "give exactly one of estimate, request and amounts")
        if given[0] != "amounts" and (inp.provider is None or inp.model is None):
            raise bad("provider" if inp.provider is None else "model", "the call's provider and model are required")
        ttl = inp.ttlSeconds if inp.ttlSeconds is not None else self._settings.default_ttl_s
        if ttl > self._settings.max_ttl_s:
            raise bad("ttlSeconds", f"at most {self._settings.max_ttl_s} seconds")
        now = self._control.now()
        call: sizing.CallBound | None = None
        estimate: dict[str, Any] | None = None
        if inp.request is not None:
            assert inp.provider is not None
            assert inp.model is not None
            _, call = self.bound(inp.provider, inp.model, inp.request, now, inp.extraInputTokens)
        elif inp.estimate is not None:
            assert inp.provider is not None
            assert inp.model is not None
            rates = self._pricer.rates(inp.provider, inp.model, now, {})
            call = sizing.CallBound(inp.estimate.get("input_tokens", 0), inp.estimate.get("output_tokens", 0), rates)
        if call is not None:
            cost = call.cost()
            estimate = {
                "inputTokens": call.input_tokens,
                "outputTokens": call.output_tokens,
                "costUsd": str(_plain_decimal(cost)) if cost is not None else None,
            }
        rid = inp.id or new_id()
        digest = _digest(inp.model_dump(mode="json", exclude={"id"}))
        # One reserve per subject at a time in this process before the one that holds the subject's lock in
        # PostgreSQL (across processes): a burst for one subject waits here, not holding pool connections.
        async with self._queues.hold(subject_key), self._store.tx() as tx:
            await tx.lock_subject(subject_key)
            now = self._control.now()  # after the wait: holds expire, and this one's TTL starts, from here
            # For the open reservations' query only (it leaves out commits applied by then); the decision reads
            # its own snapshot of offsets and usage.
            applied = await asyncio.to_thread(self._clock.applied_offsets)
            state = await self._state(tx, subject_key, rid, now, applied)
            existing = state.existing
            if existing is not None:
                if existing.subject_key != subject_key or existing.request_digest != digest:
                    raise Problem(409, f"reservation {rid} already exists for another request")
                return ReserveOutcome(existing, [LineView(ln, None, False) for ln in existing.lines], created=False)
            live_keys = {state.features[e.feature_id].key for e in state.entitlements}
            for key in sorted(set(inp.amounts or {}) - live_keys):
                if await tx.feature(key, include_archived=False) is None:
                    raise bad(f"amounts.{key}", f"no such feature: {key}")
            targets = self._targets(state, inp, call)
            lines = await self._decide(state, targets, now)
            granted = all(v.fits for v in lines)
            reservation = Reservation(
                id=rid,
                subject_key=subject_key,
                status=ReservationStatus.HELD,
                provider=inp.provider.strip() if inp.provider else None,
                model=inp.model.strip() if inp.model else None,
                request_digest=digest,
                estimate=estimate,
                lines=tuple(v.line for v in lines),
                created_at=now,
                expires_at=now + timedelta(seconds=ttl),
            )
            if granted:
                await tx.insert_reservation(reservation)
        if not granted:
            raise self._denied(lines, targets, call, now)
        return ReserveOutcome(reservation, lines, created=True)

    async def _state(
        self, tx: ControlTx, subject_key: str, rid: str, now: datetime, applied: Mapping[tuple[str, int], int]
    ) -> ReserveState:
        """The reserve's inputs; the subject's plan brought up to date first if it is not (rare)."""
        default = self._control.default_plan
        since = now - self._settings.horizon
        state = await tx.reserve_state(
            subject_key, reservation_id=rid, now=now, committed_since=since, applied=applied, default_plan=default
        )
        sp, wanted = state.subject_plan, state.wanted_plan
        if wanted is not None and (sp is None or sp.plan_key != wanted.key or sp.plan_version != wanted.version):
            await self._control.apply_plan(tx, subject_key)
            state = await tx.reserve_state(
                subject_key, reservation_id=rid, now=now, committed_since=since, applied=applied, default_plan=default
            )
        return state

    def _targets(self, state: ReserveState, inp: ReserveIn, call: sizing.CallBound | None) -> list[_Target]:
        """The subject's metered entitlements the call counts toward, with the amount to hold on each."""
        live = state.entitlements
        features = {e.id: state.features[e.feature_id] for e in live}
        targets = []
        if inp.amounts is not None:
            by_key = {features[e.id].key: e for e in live}
            for key, amount in sorted(inp.amounts.items()):
                limited = by_key.get(key)
                if limited is None:
                    continue  # a feature the subject has no limit on (the reserve checked that it exists)
                meter = find_meter(features[limited.id].meter_slug or "")
                assert meter is not None
                targets.append(_Target(limited, features[limited.id], meter.column, amount))
            return targets
        assert call is not None
        assert inp.provider is not None
        assert inp.model is not None
        provider, model = canonical_provider(inp.provider), inp.model.strip()
        for ent in live:
            feature = features[ent.id]
            if not _matches(feature, provider, model):
                continue
            meter = find_meter(feature.meter_slug or "")
            assert meter is not None
            targets.append(_Target(ent, feature, meter.column, sizing.bound_amount(meter.column, call)))
        return targets

    async def _decide(
        self,
        state: ReserveState,
        targets: Sequence[_Target],
        now: datetime,
    ) -> list[LineView]:
        """What is left on each target, and whether the call fits it."""
        if not targets:
            return []
        subject = targets[0].ent.subject_key
        # The windows' usage and the applied offsets must be one snapshot: an offset read before a write the
        # usage then includes would count that write's commits twice, one read after it would miss them.
        # Read both between two equal write versions of the subject (or two equal sets of offsets).
        balances: list[tuple[Decimal, tuple[datetime, datetime]]] = []
        reservations = state.reservations
        for _ in range(SNAPSHOT_ATTEMPTS):
            version = self._clock.usage_version(subject)
            applied = await asyncio.to_thread(self._clock.applied_offsets)
            balances = [
                await self._balance(t, state.grants.get(t.ent.id, []), state.resets.get(t.ent.id, []), now)
                for t in targets
            ]
            reservations = await with_stored_positions(
                self._control.usage, self._settings.event_source, state.reservations
            )
            if version is not None and self._clock.usage_version(subject) == version:
                break
            if version is None and await asyncio.to_thread(self._clock.applied_offsets) == applied:
                break
            await asyncio.sleep(0.005)  # a write was under way: let it finish
        # (After the last attempt the offsets read first stand: a commit may then count twice, never not at all.)
        views = []
        for t, (left, (period_start, period_end)) in zip(targets, balances, strict=True):
            out = sizing.outstanding(t.ent.id, reservations, applied, period_start, now)
            available = left - out.held - out.pending
            unlimited = t.ent.is_unlimited or t.ent.is_soft_limit
            amount = t.amount
            if amount is None:  # a dollar limit on a model without a known price
                fits = unlimited or self._settings.unpriced == "allow"
                amount = ZERO
            else:
                fits = unlimited or amount <= available
            line = HoldLine(t.ent.id, t.feature.key, amount, t.ent.is_soft_limit)
            over = amount > available
            frees = min(period_end, out.next_expiry) if out.next_expiry is not None else period_end
            shown = available - amount if fits else max(ZERO, available)
            views.append(LineView(line, shown, over, fits, frees, available))
        return views

    async def _balance(
        self, t: _Target, grants: Sequence[Grant], resets: Sequence[UsageReset], now: datetime
    ) -> tuple[Decimal, tuple[datetime, datetime]]:
        """What the grants have left after the windows' usage, and the current period.

        The windows' usage per segment is kept at the subject's write version, and brought forward by every
        write the sink of this process stores (control/usage_cache.py): reused while it is what the windows
        hold. It is read to the end of time, so a reuse later in the period still covers every stored event;
        the one difference from the value API's number is that an event stored with a time in the future
        already counts here.
        """
        assert t.ent.measure_usage_from is not None
        period = current_period(t.ent, resets, now)
        if now < t.ent.measure_usage_from:
            return ZERO, period
        meter = find_meter(t.feature.meter_slug or "")
        assert meter is not None
        line = engine.timeline(t.ent, grants, resets, now)
        usages: list[Decimal] = []
        if len(line.boundaries) > 1:
            version = self._clock.usage_version(t.ent.subject_key)
            key = (t.ent.id, t.feature.id, line.boundaries[:-1])
            cached = self._usage.get(key, version)
            USAGE_READS.labels("clickhouse" if cached is None else "kept").inc()
            if cached is None:
                start, cuts = line.boundaries[0], line.boundaries[1:-1]
                query = self._control.usage_query(t.ent.subject_key, t.feature, meter, start, None)
                cached = await asyncio.to_thread(self._control.usage.segment_totals, query, cuts)
                if version is not None and self._clock.usage_version(t.ent.subject_key) == version:
                    segments = Segments(t.ent.subject_key, meter.column, t.feature.filters, start, tuple(cuts))
                    self._usage.put(key, version, segments, cached)
            usages = cached
        balance = engine.replay(line, usages)
        return balance.balance, (balance.last_reset, period[1])

    def _denied(
        self, lines: list[LineView], targets: Sequence[_Target], call: sizing.CallBound | None, now: datetime
    ) -> LimitReached:
        short = [v for v in lines if not v.fits]
        names = ", ".join(v.line.feature_key for v in short)
        unpriced = [v for v, t in zip(lines, targets, strict=True) if not v.fits and t.amount is None]
        if unpriced:
            detail = (
                f"limit reached on {names}: the model has no known price, so a dollar limit cannot be enforced "
                "(RESERVATIONS__UNPRICED=allow lets such calls through)"
            )
        else:
            detail = f"limit reached on {names}: the call does not fit what is left"
        fit = None
        if call is not None and not unpriced:
            hard = [
                (t.column, v.available if v.available is not None else ZERO)
                for v, t in zip(lines, targets, strict=True)
                if not (t.ent.is_unlimited or t.ent.is_soft_limit)
            ]
            fit = sizing.max_output_that_fits(call, hard)
        # A model without a price stays unpriced when room comes back: no time to retry at.
        return LimitReached(detail, lines, fit, None if unpriced else self._retry_after(short, now))

    @staticmethod
    def _retry_after(short: Sequence[LineView], now: datetime) -> int | None:
        """Seconds until an expiring hold or a period reset frees room on a feature that is short."""
        times = [v.frees_at for v in short if v.frees_at is not None]
        if not times:
            return None
        return max(1, math.ceil((min(times) - now).total_seconds()))

    # -- commit and release ----------------------------------------------------------------------------

    async def get(self, reservation_id: str) -> Reservation:
        async with self._store.tx() as tx:
            found = await tx.reservation(reservation_id)
        if found is None:
            raise not_found(f"reservation {reservation_id}")
        return found

    async def commit(self, reservation_id: str, inp: CommitIn) -> Reservation:
        """Record the call's usage (once, however often this is retried) and settle the hold."""
        now = self._control.now()
        async with self._store.tx() as tx:
            r = await self._locked(tx, reservation_id)
            data = _event_data(r, inp.usage)
            digest = _digest(data)
            if r.status is ReservationStatus.COMMITTED:
                if r.usage_digest != digest:
                    raise Problem(409, f"reservation {r.id} was already committed with other usage")
                committed = r
            elif r.status is ReservationStatus.RELEASED:
                raise Problem(409, f"reservation {r.id} was released; its usage cannot be committed")
            else:
                event = {
                    "specversion": "1.0",
                    "id": r.id,
                    "source": self._settings.event_source,
                    "type": self._event_type,
                    "subject": r.subject_key,
                    "time": now.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                    "datacontenttype": "application/json",
                    "data": data,
                }
                accepted = self._events.accept(event)
                cost = self._pricer.cost(accepted.provider, accepted.model, now, accepted.usage, accepted.price_context)
                actual = {}
                for ln in r.lines:
                    line_ent = await tx.entitlement(ln.entitlement_id)
                    feature = await tx.feature(line_ent.feature_id) if line_ent is not None else None
                    meter = find_meter(feature.meter_slug or "") if feature is not None else None
                    actual[ln.entitlement_id] = (
                        sizing.actual_amount(meter.column, accepted.usage, cost) if meter is not None else None
                    )
                await tx.commit_reservation(r.id, now, event, digest, actual)
                lines = tuple(replace(ln, actual=actual[ln.entitlement_id]) for ln in r.lines)
                committed = replace(
                    r,
                    status=ReservationStatus.COMMITTED,
                    committed_at=now,
                    event=event,
                    usage_digest=digest,
                    lines=lines,
                )
        if committed.event_position is None:
            await self._send(committed)
        self._control.changed(committed.subject_key)  # pending usage counts at once: alerts need not wait
        return committed

    async def release(self, reservation_id: str) -> Reservation:
        now = self._control.now()
        async with self._store.tx() as tx:
            r = await self._locked(tx, reservation_id)
            if r.status is ReservationStatus.COMMITTED:
                raise Problem(409, f"reservation {r.id} was committed; it cannot be released")
            if r.status is ReservationStatus.RELEASED:
                return r
            await tx.release_reservation(r.id, now)
            return replace(r, status=ReservationStatus.RELEASED, released_at=now)

    async def _locked(self, tx: ControlTx, reservation_id: str) -> Reservation:
        found = await tx.reservation(reservation_id)
        if found is None:
            raise not_found(f"reservation {reservation_id}")
        await tx.lock_subject(found.subject_key)
        again = await tx.reservation(reservation_id)  # under the lock: a concurrent commit or release is done
        assert again is not None
        return again

    async def _send(self, r: Reservation) -> None:
        """Hand the commit's event to the broker now (the relay retries if this fails)."""
        assert r.event is not None
        try:
            position = await self._events.emit(r.event)
        except EmitFailed as exc:
            log.warning(
                "reservations: usage event of %s not acknowledged yet (%s); the relay will resend it", r.id, exc
            )
            return
        try:
            async with self._store.tx() as tx:
                await tx.mark_sent(r.id, position, self._control.now())
        except StoreUnavailable as exc:
            # The event is in the broker; until its position is recorded it counts as pending (the safe side),
            # and the relay sends it again (a duplicate the pipeline drops) and records the position then.
            log.warning("reservations: position of %s not recorded (%s)", r.id, exc)

    async def relay_once(self, limit: int = 100, older_than: timedelta = RELAY_AFTER) -> int:
        """Send the events of commits the broker has not acknowledged (a crash, an outage) that are older than
        ``older_than`` (younger ones are still being sent by their own request); returns how many."""
        sent = 0
        async with self._store.tx() as tx:
            for r in await tx.unsent_commits(self._control.now() - older_than, limit):
                assert r.event is not None
                try:
                    position = await self._events.emit(r.event)
                except EmitFailed as exc:
                    log.warning("reservations relay: broker unavailable (%s)", exc)
                    break
                await tx.mark_sent(r.id, position, self._control.now())
                sent += 1
        if sent:
            log.info("reservations relay: sent %d usage events of earlier commits", sent)
        return sent

    async def relay_forever(self, interval_s: float = 1.0) -> None:
        """Send unacknowledged commits' events, and mark expired holds (tidy-up), until cancelled."""
        while True:
            try:
                await self.relay_once()
                async with self._store.tx() as tx:
                    await tx.expire_holds(self._control.now())
            except StoreUnavailable:
                pass  # PostgreSQL away: nothing can be committed either; try again later
            except Exception:
                log.exception("reservations relay failed; retrying")
            await asyncio.sleep(interval_s)


def _matches(feature: Feature, provider: str, model: str) -> bool:
    values = {"provider": provider, "model": model}
    return all(values.get(k) == v for k, v in feature.filters.items())


def _price_context(request: Mapping[str, Any]) -> dict[str, str]:
    tier = request.get("service_tier")
    return {"service_tier": tier} if isinstance(tier, str) and tier not in ("auto", "default") else {}


def _event_data(r: Reservation, usage: Mapping[str, Any]) -> Any:
    """The event's data: the usage as given, under the reservation's provider and model (a response names
    its dated snapshot, ``gpt-4o-2024-08-06`` for ``gpt-4o``: the usage counts where the hold was made)."""
    data = dict(usage)
    given = data.get("provider")
    if r.provider is not None and given is not None and not _same_provider(given, r.provider):
        raise Problem(
            400,
            f"usage.provider is {given!r} but the reservation was for {r.provider!r}",
            [FieldError("usage.provider", f"the reservation was for {r.provider!r}")],
        )
    for key, value in (("provider", r.provider), ("model", r.model)):
        if value is not None:
            data[key] = value
    return _plain(data)


def _same_provider(a: Any, b: str) -> bool:
    return isinstance(a, str) and canonical_provider(a) == canonical_provider(b)


def _plain(value: Any) -> Any:
    """JSON numbers as the request gave them (the body was read with exact decimals)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class _KeyedLock:
    """An asyncio lock per key, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _plain_decimal(value: Decimal) -> Decimal:
    """``value`` without trailing zeros (and never in exponent notation)."""
    return value.quantize(Decimal(1)) if value == value.to_integral_value() else value.normalize()

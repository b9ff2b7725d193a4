"""Budget alerts: notification channels and rules (OpenMeter's v1 API), their evaluation as usage is stored,
and the events they make.

Evaluation is driven by the changes themselves, not a timer: the sink says which subjects a write touched,
a reservation's commit and every control-plane change (grant, reset, entitlement, plan) say which subject
they changed, and the subject is evaluated at once. A sweep (one process at a time, every
``sweep_interval_s``, and at every start) evaluates every subject with a metered entitlement, so what time
alone changes (a grant expiring) and what a crash interrupted is caught up.

Exactness: each (rule, subject, feature, period, threshold) is a row whose primary key makes it fire once
while it stays crossed, however many processes evaluate at once; evaluations of one subject are also
serialised by a lock of their own. The event and its deliveries are written in the same transaction as
the crossing (``control/postgres/alerts.py``: the outbox), so a crossing recorded is a notification sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Final

from control import render
from control.alerts import view
from control.alerts.model import (
    BALANCE_THRESHOLD,
    RESET,
    RESOLVED,
    Channel,
    Crossing,
    Event,
    Level,
    Rule,
    Threshold,
    Transition,
    crossing_order,
    threshold_amount,
    transitions,
)
from control.alerts.store import EventFilter
from control.inputs import ChannelIn, ResendIn, ResetRuleIn, ThresholdRuleIn
from control.listing import Listing
from control.model import Entitlement, EntitlementType
from control.service import ControlService, is_ulid, new_id, not_found
from control.store import ControlTx, StoreUnavailable
from control.webhooks.sender import RESERVED_HEADERS
from control.webhooks.urls import UrlPolicy, UrlRefused, check_saved
from schemas.problems import FieldError, Problem, bad
from schemas.settings import AlertSettings

log = logging.getLogger(__name__)

#: Evaluations running at once per process (each holds two pooled connections while it reads the value).
CONCURRENT_EVALUATIONS: Final = 2
#: Kicked subjects screened for a metered entitlement in one query.
SCREEN_AT_ONCE: Final = 1000
#: A subject whose evaluation failed (PostgreSQL or ClickHouse away) is tried again after this long.
RETRY_EVALUATION_S: Final = 2.0
#: An evaluation failing for another reason than an unreachable store is given up after this many tries.
MAX_EVALUATION_FAILURES: Final = 5
#: Resets newer than this are checked for a missed ``entitlements.reset`` notification.
RESET_LOOKBACK: Final = timedelta(days=1)


def new_secret() -> str:
    """``whsec_`` and 32 random bytes in base64, as OpenMeter makes them."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _ulid_param(name: str, value: str) -> str:
    if not is_ulid(value):
        raise bad(name, f"{value!r} is not a ULID")
    return value.upper()


@dataclass(frozen=True, slots=True)
class _Fire:
    rule: Rule
    transition: Transition
    order: Any


class AlertService:
    def __init__(self, control: ControlService, settings: AlertSettings) -> None:
        self._control = control
        self._store = control.store
        self._settings = settings
        self._policy = UrlPolicy.of(settings.allow_private_urls, settings.allowed_networks)
        #: Subjects to evaluate, in the order they were first kicked (a busy subject kicked again by every
        #: write keeps its place and does not get ahead of one kicked once).
        self._dirty: dict[str, None] = {}
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._evaluating: set[str] = set()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Set whenever an event was written (the sender in this process starts at once).
        self.written = asyncio.Event()
        self.evaluations = 0
        self._sweep_now = True

    @property
    def horizon(self) -> timedelta:
        return timedelta(seconds=self._settings.retry_horizon_s)

    # -- channels --------------------------------------------------------------------------------------

    def _check_channel(self, inp: ChannelIn) -> None:
        try:
            check_saved(inp.url, self._policy)
        except UrlRefused as exc:
            raise Problem(400, f"url {exc}", [FieldError("url", str(exc))]) from None
        reserved = sorted(k for k in inp.customHeaders or {} if k.lower() in RESERVED_HEADERS)
        if reserved:
            raise bad("customHeaders", f"may not set {', '.join(reserved)} (Meterstream sets them)")

    async def create_channel(self, inp: ChannelIn) -> Channel:
        self._check_channel(inp)
        now = self._control.now()
        c = Channel(
            id=new_id(),
            name=inp.name,
            url=inp.url,
            custom_headers=inp.customHeaders or {},
            signing_secret=inp.signingSecret or new_secret(),
            disabled=inp.disabled,
            metadata=inp.metadata,
            created_at=now,
            updated_at=now,
        )
        async with self._store.tx() as tx:
            await tx.insert_channel(c)
        return c

    async def get_channel(self, channel_id: str) -> Channel:
        async with self._store.tx() as tx:
            c = await tx.channel(_ulid_param("channelId", channel_id))
        if c is None:
            raise not_found(f"notification channel {channel_id}")
        return c

    async def update_channel(self, channel_id: str, inp: ChannelIn) -> Channel:
        self._check_channel(inp)
        async with self._store.tx() as tx:
            old = await tx.channel(_ulid_param("channelId", channel_id))
            if old is None or old.deleted_at is not None:
                raise not_found(f"notification channel {channel_id}")
            c = replace(
                old,
                name=inp.name,
                url=inp.url,
                custom_headers=inp.customHeaders or {},
                signing_secret=inp.signingSecret or old.signing_secret,
                disabled=inp.disabled,
                metadata=inp.metadata,
                updated_at=self._control.now(),
            )
            await tx.update_channel(c)
        return c

    async def list_channels(
        self, *, include_deleted: bool, include_disabled: bool, listing: Listing
    ) -> tuple[list[Channel], int]:
        async with self._store.tx() as tx:
            return await tx.channels(
                include_deleted=include_deleted, include_disabled=include_disabled, listing=listing
            )

    async def delete_channel(self, channel_id: str) -> None:
        async with self._store.tx() as tx:
            c = await tx.channel(_ulid_param("channelId", channel_id))
            if c is None or c.deleted_at is not None:
                raise not_found(f"notification channel {channel_id}")
            using = await tx.rules_using(c.id)
            if using:
                raise bad("channelId", f"the channel is used by rules {', '.join(using)}: remove it from them first")
            await tx.delete_channel(c.id, self._control.now())

    # -- rules -----------------------------------------------------------------------------------------

    async def _rule_refs(self, tx: ControlTx, inp: ThresholdRuleIn | ResetRuleIn) -> tuple[list[str], list[str]]:
        channel_ids = []
        for ref in inp.channels:
            c = await tx.channel(ref.upper()) if is_ulid(ref) else None
            if c is None or c.deleted_at is not None:
                raise bad("channels", f"notification channel {ref} does not exist")
            if c.id not in channel_ids:
                channel_ids.append(c.id)
        feature_ids: list[str] = []
        missing = []
        for ref in inp.features or []:
            f = await tx.feature(ref, include_archived=False)
            if f is None:
                missing.append(ref)
            elif f.id in feature_ids:
                raise bad("features", f"feature {ref} is given twice")
            else:
                feature_ids.append(f.id)
        if missing:
            raise bad("features", f"features not found: {', '.join(missing)}")
        return channel_ids, feature_ids

    async def create_rule(self, inp: ThresholdRuleIn | ResetRuleIn) -> Rule:
        now = self._control.now()
        async with self._store.tx() as tx:
            channel_ids, feature_ids = await self._rule_refs(tx, inp)
            r = Rule(
                id=new_id(),
                type=inp.type,
                name=inp.name,
                disabled=inp.disabled,
                thresholds=_thresholds(inp),
                feature_ids=tuple(feature_ids),
                channel_ids=tuple(channel_ids),
                metadata=inp.metadata,
                created_at=now,
                updated_at=now,
            )
            await tx.insert_rule(r)
        self._sweep_soon()
        return r

    async def get_rule(self, rule_id: str) -> Rule:
        async with self._store.tx() as tx:
            r = await tx.rule(_ulid_param("ruleId", rule_id))
        if r is None:
            raise not_found(f"notification rule {rule_id}")
        return r

    async def update_rule(self, rule_id: str, inp: ThresholdRuleIn | ResetRuleIn) -> Rule:
        async with self._store.tx() as tx:
            old = await tx.rule(_ulid_param("ruleId", rule_id))
            if old is None or old.deleted_at is not None:
                raise not_found(f"notification rule {rule_id}")
            if old.type != inp.type:
                raise bad("type", f"a rule's type cannot change (it is {old.type})")
            channel_ids, feature_ids = await self._rule_refs(tx, inp)
            r = replace(
                old,
                name=inp.name,
                disabled=inp.disabled,
                thresholds=_thresholds(inp),
                feature_ids=tuple(feature_ids),
                channel_ids=tuple(channel_ids),
                metadata=inp.metadata,
                updated_at=self._control.now(),
            )
            await tx.update_rule(r)
        self._sweep_soon()
        return r

    async def list_rules(
        self,
        *,
        include_deleted: bool,
        include_disabled: bool,
        features: Sequence[str],
        channels: Sequence[str],
        listing: Listing,
    ) -> tuple[list[Rule], int]:
        async with self._store.tx() as tx:
            return await tx.rules(
                include_deleted=include_deleted,
                include_disabled=include_disabled,
                features=features,
                channels=[c.upper() for c in channels],
                listing=listing,
            )

    async def delete_rule(self, rule_id: str) -> None:
        async with self._store.tx() as tx:
            r = await tx.rule(_ulid_param("ruleId", rule_id))
            if r is None or r.deleted_at is not None:
                raise not_found(f"notification rule {rule_id}")
            await tx.delete_rule(r.id, self._control.now())

    async def rules_by_id(self, ids: Sequence[str]) -> dict[str, Rule]:
        async with self._store.tx() as tx:
            found = {i: await tx.rule(i) for i in set(ids)}
        return {i: r for i, r in found.items() if r is not None}

    async def feature_keys(self, rules: Sequence[Rule]) -> dict[str, str]:
        """The keys of the rules' features, by id (a rule shows both)."""
        ids = {f for r in rules for f in r.feature_ids}
        async with self._store.tx() as tx:
            found = {i: await tx.feature(i) for i in ids}
        return {i: f.key for i, f in found.items() if f is not None}

    # -- events ----------------------------------------------------------------------------------------

    async def list_events(self, where: EventFilter, listing: Listing) -> tuple[list[Event], int]:
        async with self._store.tx() as tx:
            return await tx.events(where, listing)

    async def get_event(self, event_id: str) -> Event:
        async with self._store.tx() as tx:
            e = await tx.event(_ulid_param("eventId", event_id))
        if e is None:
            raise not_found(f"notification event {event_id}")
        return e

    async def resend(self, event_id: str, inp: ResendIn) -> None:
        """Deliver the event again (to the channels given, else every enabled channel of its rule), with a
        fresh retry horizon and the same webhook-id."""
        now = self._control.now()
        async with self._store.tx() as tx:
            e = await tx.event(_ulid_param("eventId", event_id))
            if e is None:
                raise not_found(f"notification event {event_id}")
            rule = await tx.rule(e.rule_id)
            on_rule = set(rule.channel_ids) if rule is not None else set()
            wanted = [c.upper() for c in inp.channels] if inp.channels else sorted(on_rule)
            chosen = []
            for ref in wanted:
                c = await tx.channel(ref) if is_ulid(ref) else None
                if c is None or c.deleted_at is not None:
                    raise bad("channels", f"notification channel {ref} does not exist")
                if c.id not in on_rule and not any(d.channel_id == c.id for d in e.deliveries):
                    raise bad("channels", f"notification channel {ref} is not a channel of the event's rule")
                if c.disabled:
                    if inp.channels:
                        raise bad("channels", f"notification channel {ref} is disabled")
                    continue
                chosen.append(c.id)
            if not chosen:
                raise bad("channels", "the event's rule has no enabled channel to send it to")
            await tx.resend(e.id, chosen, now, now + self.horizon)
        self.written.set()

    async def test_rule(self, rule_id: str) -> Event:
        """An event with a sample payload, annotated as a test, delivered like any other."""
        rule = await self.get_rule(rule_id)
        if rule.deleted_at is not None:
            raise not_found(f"notification rule {rule_id}")
        now = self._control.now()
        event_id = new_id()
        payload = view.sample_payload(event_id, rule, now)
        e = Event(event_id, rule.type, rule.id, None, None, payload, {"notification.rule.test": True}, now)
        async with self._store.tx() as tx:
            channels = await self._enabled_channels(tx, rule)
            await tx.insert_event(e, None, channels, now + self.horizon)
            stored = await tx.event(event_id)
        self.written.set()
        assert stored is not None
        return stored

    @staticmethod
    async def _enabled_channels(tx: ControlTx, rule: Rule) -> list[str]:
        out = []
        for channel_id in rule.channel_ids:
            c = await tx.channel(channel_id)
            if c is not None and c.deleted_at is None and not c.disabled:
                out.append(c.id)
        return out

    # -- evaluation ------------------------------------------------------------------------------------

    def kick(self, subjects: Sequence[str] | set[str]) -> None:
        """Evaluate these subjects soon (on this process's loop)."""
        for subject in subjects:
            self._dirty.setdefault(subject)
        self._wake.set()

    def kick_threadsafe(self, subjects: set[str]) -> None:
        """:meth:`kick` from another thread (the sink's)."""
        loop = self._loop
        if loop is not None and subjects:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self.kick, set(subjects))

    def _sweep_soon(self) -> None:
        # A new or changed rule may already be crossed for existing subjects.
        self._sweep_now = True
        self._wake.set()

    async def run(self) -> None:
        """Evaluate kicked subjects and sweep, until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._sweep_now = True
        sweep_at = 0.0
        running: set[asyncio.Task[None]] = set()
        while True:
            self._wake.clear()
            loop_time = self._loop.time()
            if self._sweep_now or loop_time >= sweep_at:
                if await self._sweep(force=self._sweep_now):
                    self._sweep_now = False
                sweep_at = loop_time + self._settings.sweep_interval_s
            free = CONCURRENT_EVALUATIONS - len(running)
            if free > 0 and self._dirty:
                for subject in await self._next_subjects(loop_time, free):
                    task = asyncio.create_task(self._evaluate_logged(subject))
                    running.add(task)
                    task.add_done_callback(running.discard)
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
            waits.extend(running)
            _done, _pending = await asyncio.wait(waits, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            waits[0].cancel()

    async def _next_subjects(self, loop_time: float, free: int) -> list[str]:
        """Up to ``free`` kicked subjects to evaluate now, oldest kick first. Subjects that cannot alert (no
        live metered entitlement, or no live rule at all) are dropped in one query for many of them, so a
        write touching thousands of subjects costs one round trip, not thousands of transactions."""
        candidates = [s for s in self._dirty if self._retry_at.get(s, 0.0) <= loop_time and s not in self._evaluating][
            :SCREEN_AT_ONCE
        ]
        if not candidates:
            return []
        try:
            async with self._store.tx() as tx:
                if await tx.live_rules(BALANCE_THRESHOLD) or await tx.live_rules(RESET):
                    relevant = set(await tx.metered_subjects(candidates))
                else:
                    relevant = set()
        except StoreUnavailable:
            for subject in candidates:  # tried again shortly, in place
                self._retry_at[subject] = loop_time + RETRY_EVALUATION_S
            return []
        chosen: list[str] = []
        for subject in candidates:
            if subject not in relevant:
                del self._dirty[subject]
            elif len(chosen) < free:
                del self._dirty[subject]
                chosen.append(subject)
        return chosen

    async def _evaluate_logged(self, subject: str) -> None:
        self._evaluating.add(subject)
        try:
            await self.evaluate(subject)
            self._failures.pop(subject, None)
            self._retry_at.pop(subject, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Nothing was recorded (the transaction rolled back), so nothing is half-done: try again, for as
            # long as PostgreSQL or ClickHouse is away; an error of another kind a few times (the sweep comes
            # back to the subject in any case).
            failures = self._failures[subject] = self._failures.get(subject, 0) + 1
            unavailable = isinstance(exc, StoreUnavailable | ConnectionError | TimeoutError)
            if not unavailable and failures >= MAX_EVALUATION_FAILURES:
                log.error(
                    "alerts: evaluating %s failed %d times; left to the next sweep", subject, failures, exc_info=exc
                )
                self._failures.pop(subject, None)
                return
            log.warning("alerts: evaluating %s failed (%s); retrying", subject, exc)
            self._dirty.setdefault(subject)
            assert self._loop is not None
            self._retry_at[subject] = self._loop.time() + min(30.0, RETRY_EVALUATION_S * failures)
            self._wake.set()
        finally:
            self._evaluating.discard(subject)

    async def _sweep(self, force: bool) -> bool:
        """Every subject with a metered entitlement, evaluated (one process per interval, unless forced)."""
        now = self._control.now()
        try:
            async with self._store.tx() as tx:
                if not force and not await tx.claim_sweep(
                    now, now + timedelta(seconds=self._settings.sweep_interval_s)
                ):
                    return True
                if not await tx.live_rules(BALANCE_THRESHOLD) and not await tx.live_rules(RESET):
                    return True
                subjects = await tx.metered_subjects(None)
        except StoreUnavailable:
            return False
        self.kick(subjects)
        return True

    async def evaluate(self, subject_key: str) -> int:
        """Record what changed for the subject's thresholds (and resets); returns how many events."""
        self.evaluations += 1
        async with self._store.tx() as tx:
            rules = await tx.live_rules(BALANCE_THRESHOLD)
            reset_rules = await tx.live_rules(RESET)
            if not rules and not reset_rules:
                return 0
            ents = [e for e in await tx.subject_entitlements(subject_key, False) if e.type is EntitlementType.METERED]
        made = 0
        for ent in ents:
            thresholds = [r for r in rules if r.applies_to(ent.feature_id) and r.thresholds]
            resets = [r for r in reset_rules if r.applies_to(ent.feature_id)]
            if thresholds or resets:
                made += await self._evaluate_entitlement(subject_key, ent, thresholds, resets)
        if made:
            self.written.set()
        return made

    async def _evaluate_entitlement(
        self, subject_key: str, ent: Entitlement, rules: Sequence[Rule], reset_rules: Sequence[Rule]
    ) -> int:
        made = 0
        async with self._store.tx() as tx:
            await tx.lock_alerts(subject_key)
            # Read under the lock: an evaluation never records an older state after a newer one.
            try:
                ev, feature, subject, value = await self._control.alert_view(subject_key, ent.id)
            except Problem as p:
                if p.status == 404:
                    return 0  # deleted meanwhile
                raise
            # The current period (from its boundary, or the last manual reset): a new one starts fresh crossings.
            assert ev.current_period is not None
            period_start = ev.current_period[0]
            now = self._control.now()
            assert value.usage is not None
            assert value.total_available is not None
            assert value.settled_balance is not None
            level = Level(value.usage, value.total_available, value.settled_balance)
            known: dict[str, dict[str, Crossing]] = {}
            for c in await tx.crossings(subject_key, feature.id, period_start):
                known.setdefault(c.rule_id, {})[c.threshold] = c
            fires = [
                _Fire(rule, t, (t.crossed is False, crossing_order(t.threshold, level), rule.id))
                for rule in rules
                for t in transitions(rule.thresholds, level, known.get(rule.id, {}))
            ]
            fires.sort(key=lambda f: f.order)
            for i, fire in enumerate(fires):
                t = fire.transition
                event_id = new_id()
                at = now + timedelta(microseconds=i)  # reported in the order they were crossed
                kind = BALANCE_THRESHOLD if t.crossed else RESOLVED
                extra: dict[str, Any] = {"periodStart": render.iso(period_start)}
                amount = threshold_amount(t.threshold, level)
                if amount is not None:
                    extra["thresholdValue"] = render.number(amount)
                if not t.crossed and t.previous is not None:
                    extra["crossedEventId"] = t.previous.event_id
                payload = view.payload(event_id, kind, at, ev, feature, subject, value, t.threshold, extra)
                recorded = await tx.save_crossing(
                    Crossing(
                        fire.rule.id,
                        subject_key,
                        feature.id,
                        period_start,
                        t.threshold.key,
                        t.crossed,
                        level.usage,
                        event_id,
                    ),
                    at,
                )
                if not recorded:
                    continue
                e = Event(event_id, kind, fire.rule.id, subject_key, feature.id, payload, None, at)
                await tx.insert_event(e, feature.key, await self._enabled_channels(tx, fire.rule), at + self.horizon)
                made += 1
            # Resets of the last day not notified yet, manual ones and the automatic one at the start of
            # this period; each once per rule, and only those after the rule was made.
            if reset_rules:
                assert ent.measure_usage_from is not None
                times = {r.at: r.created_at for r in await tx.resets_of(ent.id)}
                if period_start > ent.measure_usage_from:
                    times.setdefault(period_start, period_start)
                for at, made_at in sorted(times.items()):
                    if made_at < now - RESET_LOOKBACK:
                        continue
                    for rule in reset_rules:
                        if made_at < rule.created_at or not await tx.notice_reset(rule.id, ent.id, at):
                            continue
                        event_id = new_id()
                        extra = {"resetAt": render.iso(at)}
                        payload = view.payload(event_id, RESET, now, ev, feature, subject, value, None, extra)
                        e = Event(event_id, RESET, rule.id, subject_key, feature.id, payload, None, now)
                        await tx.insert_event(
                            e, feature.key, await self._enabled_channels(tx, rule), now + self.horizon
                        )
                        made += 1
        return made


def _thresholds(inp: ThresholdRuleIn | ResetRuleIn) -> tuple[Threshold, ...]:
    if not isinstance(inp, ThresholdRuleIn):
        return ()
    return tuple(Threshold(t.type, t.value) for t in inp.thresholds)

"""Alerts on a real PostgreSQL (and the real engine for usage): concurrent evaluations of one subject fire
each threshold once; two senders never lease the same delivery; a sender whose lease ran out records
nothing; a hanging receiver does not hold up another channel's deliveries."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from control.alerts.delivery import Deliverer
from control.alerts.model import Attempt, DeliveryState
from control.alerts.service import AlertService
from control.alerts.store import EventFilter
from control.inputs import ChannelIn, FeatureIn, GrantIn, MeteredIn, parse, parse_entitlement, parse_rule
from control.listing import Listing
from control.postgres.store import PostgresStore
from control.service import ControlService
from control.webhooks.sender import WebhookSender
from control.webhooks.urls import UrlPolicy
from schemas.settings import AlertSettings
from sinks.clickhouse.connection import ClickHouse
from sinks.clickhouse.reader import MeterReader
from tests.helpers.webhooks import receiving

pytestmark = pytest.mark.integration

SETTINGS = AlertSettings(allow_private_urls=True, retry_initial_s=0.1, retry_max_s=0.3, timeout_s=1.0)


async def _setup(store: PostgresStore, ch: ClickHouse, url: str) -> tuple[ControlService, AlertService]:
    """Three subjects each with a grant of 400 and a rule alerting at a balance of 500 or less: crossed as soon
    as it is evaluated (no usage needed)."""
    control = ControlService(store, MeterReader(ch))
    alerts = AlertService(control, SETTINGS)
    await control.create_feature(FeatureIn(key="tokens", name="T", meterSlug="tokens_total"))
    ent = parse_entitlement({"type": "metered", "featureKey": "tokens", "usagePeriod": {"interval": "MONTH"}})
    assert isinstance(ent, MeteredIn)
    for subject in ("s1", "s2", "s3"):
        await control.create_entitlement(subject, ent)
        await control.create_grant(
            subject,
            "tokens",
            parse(
                GrantIn,
                {
                    "amount": 400,
                    "effectiveAt": control.now().isoformat(),
                    "expiration": {"duration": "DAY", "count": 1},
                },
            ),
        )
    channel = await alerts.create_channel(parse(ChannelIn, {"type": "WEBHOOK", "name": "c", "url": url}))
    await alerts.create_rule(
        parse_rule(
            {
                "type": "entitlements.balance.threshold",
                "name": "r",
                "channels": [channel.id],
                "thresholds": [{"type": "balance_value", "value": 500}],
            }
        )
    )
    return control, alerts


async def test_concurrent_evaluations_fire_each_threshold_once(postgres_dsn: str, ch: ClickHouse) -> None:
    store = PostgresStore(postgres_dsn, max_size=30)
    await store.open()
    try:
        with receiving() as receiver:
            _, alerts = await _setup(store, ch, receiver.url)
            made = await asyncio.gather(*(alerts.evaluate("s1") for _ in range(12)))
            assert sum(made) == 1
            async with store.tx() as tx:
                events, total = await tx.events(EventFilter(subjects=["s1"]), Listing("createdAt", False, 0, 100))
            assert total == 1
            assert [d.state for d in events[0].deliveries] == [DeliveryState.PENDING]
            assert sum(await asyncio.gather(*(alerts.evaluate("s1") for _ in range(4)))) == 0
    finally:
        await store.close()


async def test_leases_are_disjoint_and_a_late_sender_records_nothing(postgres_dsn: str, ch: ClickHouse) -> None:
    store = PostgresStore(postgres_dsn, max_size=10)
    await store.open()
    try:
        with receiving() as receiver:
            control, alerts = await _setup(store, ch, receiver.url)
            for s in ("s1", "s2", "s3"):
                assert await alerts.evaluate(s) == 1
            now = control.now()
            async with store.tx() as a, store.tx() as b:
                first = await a.lease_due(now, 2, {}, 10, now + timedelta(seconds=30))
                second = await b.lease_due(now, 10, {}, 10, now + timedelta(seconds=30))
            ids = [lease.event.id for lease in first] + [lease.event.id for lease in second]
            assert len(ids) == len(set(ids)) == 3
            # The lease ran out (simulated: due again) and another sender took the row: the first sender's
            # late outcome is not recorded.
            lease = first[0]
            async with store.tx() as tx:
                await tx._conn.execute(  # type: ignore[attr-defined]
                    b"UPDATE notification_deliveries SET next_attempt_at = now() - interval '1 s' WHERE event_id = %s",
                    (lease.event.id,),
                )
            async with store.tx() as tx:
                (retaken,) = [
                    x
                    for x in await tx.lease_due(control.now(), 10, {}, 10, control.now() + timedelta(seconds=30))
                    if x.event.id == lease.event.id
                ]
            attempt = Attempt(control.now(), DeliveryState.SUCCESS, 204, "", 5, receiver.url)
            async with store.tx() as tx:
                assert not await tx.record_attempt(lease, attempt, DeliveryState.SUCCESS, "", None)
                assert await tx.record_attempt(retaken, attempt, DeliveryState.SUCCESS, "", None)
                stored = await tx.event(lease.event.id)
            assert stored is not None
            (d,) = stored.deliveries
            assert (d.state, d.attempts, len(d.history)) == (DeliveryState.SUCCESS, 1, 1)
    finally:
        await store.close()


async def test_a_hanging_receiver_does_not_hold_up_another_channel(postgres_dsn: str, ch: ClickHouse) -> None:
    settings = SETTINGS.model_copy(update={"per_channel": 2, "max_concurrent": 8, "timeout_s": 3.0})
    store = PostgresStore(postgres_dsn, max_size=10)
    await store.open()
    sender = WebhookSender(
        UrlPolicy(allow_private=True), connect_timeout_s=1, timeout_s=3.0, max_response_bytes=64, user_agent="t"
    )
    try:
        with receiving() as slow, receiving() as fast:
            slow.mode, slow.hang_s = "hang", 10.0
            control = ControlService(store, MeterReader(ch))
            alerts = AlertService(control, settings)
            slow_ch = await alerts.create_channel(
                parse(ChannelIn, {"type": "WEBHOOK", "name": "slow", "url": slow.url})
            )
            fast_ch = await alerts.create_channel(
                parse(ChannelIn, {"type": "WEBHOOK", "name": "fast", "url": fast.url})
            )
            fast.secret = fast_ch.signing_secret
            slow_rule = await alerts.create_rule(
                parse_rule({"type": "entitlements.reset", "name": "slow", "channels": [slow_ch.id]})
            )
            fast_rule = await alerts.create_rule(
                parse_rule({"type": "entitlements.reset", "name": "fast", "channels": [fast_ch.id]})
            )
            for _ in range(6):
                await alerts.test_rule(slow_rule.id)
            started = time.monotonic()
            fast_events = [await alerts.test_rule(fast_rule.id) for _ in range(4)]
            deliverer = Deliverer(control, sender, settings, alerts.written)
            task = asyncio.create_task(deliverer.run())
            try:
                while len(fast.delivered()) < 4:
                    assert time.monotonic() - started < 5, "the fast channel waited for the slow one"
                    await asyncio.sleep(0.05)
                assert {r.webhook_id for r in fast.delivered()} == {e.id for e in fast_events}
                assert all(r.verified for r in fast.delivered())
                # At most per_channel requests at once to the slow receiver.
                await asyncio.sleep(0.5)
                assert len(slow.received) <= 2
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await sender.close()
        await store.close()


class _Later(ControlService):
    """The control plane 45 minutes from now (a period boundary passes without waiting for it)."""

    @staticmethod
    def now() -> datetime:
        return datetime.now(UTC) + timedelta(minutes=45)


async def test_an_automatic_period_reset_is_notified_once(postgres_dsn: str, ch: ClickHouse) -> None:
    store = PostgresStore(postgres_dsn)
    await store.open()
    try:
        with receiving() as receiver:
            control = ControlService(store, MeterReader(ch))
            alerts = AlertService(control, SETTINGS)
            await control.create_feature(FeatureIn(key="tokens", name="T", meterSlug="tokens_total"))
            anchor = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
            ent = parse_entitlement(
                {
                    "type": "metered",
                    "featureKey": "tokens",
                    "usagePeriod": {"interval": "PT1H", "anchor": anchor.isoformat()},
                    "measureUsageFrom": anchor.isoformat(),
                }
            )
            assert isinstance(ent, MeteredIn)
            await control.create_entitlement("s1", ent)
            channel = await alerts.create_channel(
                parse(ChannelIn, {"type": "WEBHOOK", "name": "c", "url": receiver.url})
            )
            await alerts.create_rule(parse_rule({"type": "entitlements.reset", "name": "r", "channels": [channel.id]}))
            await control.create_grant(
                "s1",
                "tokens",
                parse(
                    GrantIn,
                    {
                        "amount": 400,
                        "maxRolloverAmount": 400,
                        "effectiveAt": anchor.isoformat(),
                        "expiration": {"duration": "DAY", "count": 1},
                    },
                ),
            )
            await alerts.create_rule(
                parse_rule(
                    {
                        "type": "entitlements.balance.threshold",
                        "name": "low",
                        "channels": [channel.id],
                        "thresholds": [{"type": "balance_value", "value": 500}],
                    }
                )
            )
            assert await alerts.evaluate("s1") == 1  # the threshold; no reset yet in this period
            assert await alerts.evaluate("s1") == 0
            later = AlertService(_Later(store, MeterReader(ch)), SETTINGS)
            # The boundary at anchor + 1 h has passed: the reset is notified, and the threshold fires again.
            assert await later.evaluate("s1") == 2
            assert await later.evaluate("s1") == 0
            async with store.tx() as tx:
                events, _ = await tx.events(EventFilter(subjects=["s1"]), Listing("createdAt", False, 0, 10))
            assert events[0].type == "entitlements.balance.threshold"
            assert sorted(e.type for e in events[1:]) == ["entitlements.balance.threshold", "entitlements.reset"]
            boundary = (anchor + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
            reset = next(e for e in events if e.type == "entitlements.reset")
            assert f'"resetAt":"{boundary}"' in reset.payload
            again = next(e for e in events[1:] if e.type == "entitlements.balance.threshold")
            assert f'"periodStart":"{boundary}"' in again.payload
            assert f'"periodStart":"{anchor.isoformat().replace("+00:00", "Z")}"' in events[0].payload
    finally:
        await store.close()

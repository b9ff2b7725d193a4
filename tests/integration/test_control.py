"""The control plane against a real PostgreSQL (a database per test) and a real ClickHouse engine (chDB):
migrations, the usage it reads (the query API's own numbers, cut into segments), balances from stored
windows, and the concurrency rules (one entitlement per subject and feature, a default plan made once)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from control.inputs import FeatureIn, GrantIn, PlanIn, parse, parse_entitlement
from control.postgres.schema import MIGRATIONS
from control.postgres.store import PostgresStore, apply_migrations
from control.service import ControlService
from control.store import StoreUnavailable
from schemas.meters import find_meter
from schemas.problems import Problem
from schemas.query import MeterQuery
from sinks.apply import Plan, Totals
from sinks.clickhouse.connection import ClickHouse
from sinks.clickhouse.reader import MeterReader
from sinks.clickhouse.store import WindowStore

pytestmark = pytest.mark.integration

TOKENS = find_meter("tokens_total")
assert TOKENS is not None
MINUTE = timedelta(minutes=1)


@pytest.fixture
async def service(postgres_dsn: str, ch: ClickHouse) -> AsyncIterator[ControlService]:
    # Some tests run 30 requests at once on these 10 connections: under CI's load (three test workers on two
    # cores) one once waited past the default 2 s for a connection. They test the rules, not overload.
    store = PostgresStore(postgres_dsn, max_size=10, timeout_s=10)
    await store.open()
    yield ControlService(store, MeterReader(ch), default_plan="free")
    await store.close()


def write_usage(ch: ClickHouse, usage: dict[tuple[str, str, datetime], int], offset: int = 0) -> None:
    """Minute windows of ``total_tokens`` per (subject, model, minute start)."""
    plan = Plan(offsets={("T", 0): offset})
    for (subject, model, t), tokens in usage.items():
        totals = Totals()
        totals.counts[0] = 1
        totals.counts[6] = tokens  # total_tokens
        plan.windows[(subject, "openai", model, int(t.timestamp()))] = totals
    WindowStore(ch).write(plan, datetime.now(UTC))


def test_migrations_apply_once_even_concurrently(postgres_dsn: str) -> None:
    results: list[list[int]] = []
    threads = [threading.Thread(target=lambda: results.append(apply_migrations(postgres_dsn))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=len) == [[], [], [], [m.version for m in MIGRATIONS]]
    with psycopg.connect(postgres_dsn) as conn:
        versions = [r[0] for r in conn.execute(b"SELECT version FROM meterstream_migrations").fetchall()]
    assert versions == [m.version for m in MIGRATIONS]
    assert apply_migrations(postgres_dsn) == []


def test_segment_totals_are_the_query_apis_numbers(ch: ClickHouse) -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    usage = {("a", "gpt-4o" if i % 3 else "gpt-4o-mini", start + i * MINUTE): i + 1 for i in range(200)}
    usage[("b", "gpt-4o", start + 5 * MINUTE)] = 1000
    write_usage(ch, usage)
    reader = MeterReader(ch)
    cuts = [start + 17 * MINUTE, start + 60 * MINUTE, start + 61 * MINUTE, start + 150 * MINUTE]
    end = start + 180 * MINUTE
    for include in ({"subject": ("a",)}, {"subject": ("a",), "model": ("gpt-4o",)}, {"subject": ("b",)}):
        query = MeterQuery(meter=TOKENS, start=start, end=end, include=include)
        totals = reader.segment_totals(query, cuts)
        bounds = [start, *cuts, end]
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            rows = reader.query_meter(MeterQuery(meter=TOKENS, start=lo, end=hi, include=include))
            assert totals[i] == sum((r.value for r in rows), Decimal(0)), (include, i)
        rows = reader.query_meter(query)
        assert sum(totals) == sum((r.value for r in rows), Decimal(0))
    with pytest.raises(ValueError, match="whole minutes"):
        reader.segment_totals(MeterQuery(meter=TOKENS, start=start, end=end), [start + timedelta(seconds=30)])


async def test_balance_burns_grants_in_order_from_stored_windows(service: ControlService, ch: ClickHouse) -> None:
    await service.create_feature(
        parse(
            FeatureIn,
            {"key": "premium", "name": "P", "meterSlug": "tokens_total", "meterGroupByFilters": {"model": "gpt-4o"}},
        )
    )
    now = datetime.now(UTC)
    period_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    await service.create_entitlement(
        "alice",
        parse_entitlement(
            {
                "type": "metered",
                "featureKey": "premium",
                "measureUsageFrom": "CURRENT_PERIOD_START",
                "usagePeriod": {"interval": "MONTH", "anchor": "2026-01-01T00:00:00Z"},
            }
        ),
    )
    g1 = await service.create_grant(
        "alice",
        "premium",
        parse(
            GrantIn,
            {
                "amount": 100,
                "priority": 2,
                "effectiveAt": period_start.isoformat(),
                "expiration": {"duration": "YEAR", "count": 1},
            },
        ),
    )
    g2 = await service.create_grant(
        "alice",
        "premium",
        parse(
            GrantIn,
            {
                "amount": 50,
                "priority": 1,
                "effectiveAt": period_start.isoformat(),
                "expiration": {"duration": "YEAR", "count": 1},
            },
        ),
    )
    t0 = max(period_start, now - timedelta(hours=2)).replace(second=0, microsecond=0)
    write_usage(
        ch,
        {
            ("alice", "gpt-4o", t0): 30,
            ("alice", "gpt-4o-mini", t0): 999,
            ("bob", "gpt-4o", t0): 7,
            ("alice", "gpt-4o", t0 + MINUTE): 40,
        },
    )
    value = await service.value("alice", "premium", None)
    # 70 premium tokens: the priority-1 grant (50) first, then 20 of the priority-2 grant.
    assert (value.usage, value.balance, value.overage, value.total_available) == (70, 80, 0, 150)
    assert value.has_access
    history = await service.history("alice", "premium", start=None, end=None, window_size="DAY", time_zone="UTC")
    assert sum(w.usage for w in history.windows) == 70
    spent: dict[str, Decimal] = {}
    for segment in history.segments:
        for grant_id, used in segment.grant_usage.items():
            spent[grant_id] = spent.get(grant_id, Decimal(0)) + used
    assert spent == {g2.id: 50, g1.id: 20}
    await service.void_grant(g1.id, None)
    after = await service.value("alice", "premium", None)
    assert (after.balance, after.overage) == (0, 0)
    # Before the void the priority-2 grant still pays; after it, nothing does.
    write_usage(ch, {("alice", "gpt-4o", t0 + 2 * MINUTE): 5}, offset=1)
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    write_usage(ch, {("alice", "gpt-4o", minute): 6}, offset=2)
    later = await service.value("alice", "premium", minute + MINUTE)
    assert (later.usage, later.balance, later.overage, later.has_access) == (81, 0, 6, False)
    assert later.total_available == 75  # what the grants gave this period


async def test_one_live_entitlement_per_subject_and_feature(service: ControlService) -> None:
    await service.create_feature(parse(FeatureIn, {"key": "seats", "name": "Seats"}))
    body = {"type": "static", "featureKey": "seats", "config": '{"n": 5}'}
    results = await asyncio.gather(
        *(service.create_entitlement("carol", parse_entitlement(body)) for _ in range(20)), return_exceptions=True
    )
    created = [r for r in results if not isinstance(r, BaseException)]
    conflicts = [r for r in results if isinstance(r, Problem) and r.status == 409]
    assert (len(created), len(conflicts)) == (1, 19), results


async def test_the_default_plan_is_made_once_for_concurrent_first_requests(service: ControlService) -> None:
    await service.create_feature(parse(FeatureIn, {"key": "tokens", "name": "T", "meterSlug": "tokens_total"}))
    await service.create_feature(parse(FeatureIn, {"key": "sso", "name": "SSO"}))
    await service.put_plan(
        "free",
        parse(
            PlanIn,
            {
                "key": "free",
                "name": "Free",
                "entitlements": [
                    {
                        "type": "metered",
                        "featureKey": "tokens",
                        "issueAfterReset": 1000,
                        "usagePeriod": {"interval": "MONTH", "anchor": "2026-01-01T00:00:00Z"},
                    },
                    {"type": "boolean", "featureKey": "sso"},
                ],
            },
        ),
    )
    values = await asyncio.gather(*(service.value("newbie", "tokens", None) for _ in range(30)))
    assert {(v.balance, v.has_access) for v in values} == {(Decimal(1000), True)}
    views = await service.subject_entitlements("newbie", include_deleted=True)
    assert sorted(v.entitlement.feature_key for v in views) == ["sso", "tokens"]
    assignment = await service.subject_plan("newbie")
    assert (assignment.plan_key, assignment.is_default) == ("free", True)


async def test_an_unreachable_store_fails_fast(tmp_path: object) -> None:
    store = PostgresStore("postgresql://postgres:@/postgres?host=/nonexistent-socket-dir", timeout_s=1.0)
    await store.open()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        async with store.tx() as tx:
            await tx.now()
    assert time.monotonic() - started < 3
    await store.close()

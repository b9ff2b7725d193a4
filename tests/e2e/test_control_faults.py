"""The control plane under failures: PostgreSQL killed and away for 20 s (control endpoints answer 503 with
Retry-After at once; ingest and usage queries keep working; nothing is lost when it is back), and kill -9 of
every process of the production topology mid-stream. Every balance ends equal to the ground truth."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.helpers.load import Load, assert_exact, wait_until_stored
from tests.helpers.stack import LocalStack, MultiProcessStack
from tests.helpers.truth import Sent

pytestmark = pytest.mark.e2e

ISSUE = 10**12  # tokens a month, far more than any test sends: balance = ISSUE - usage


def setup_limits(url: str) -> None:
    """A feature over all tokens and a default-plan-like entitlement template, through the API."""
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/api/v1/features", json={"key": "tokens", "name": "Tokens", "meterSlug": "tokens_total"})
        assert r.status_code == 201, r.text
        plan = {
            "name": "Everyone",
            "entitlements": [
                {
                    "type": "metered",
                    "featureKey": "tokens",
                    "issueAfterReset": ISSUE,
                    "usagePeriod": {"interval": "MONTH", "anchor": "2026-01-01T00:00:00Z"},
                }
            ],
        }
        r = c.put("/api/v1/plans/everyone", json=plan)
        assert r.status_code in (200, 201), r.text


def value(url: str, subject: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/api/v1/subjects/{subject}/entitlements/tokens/value", timeout=30)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = orjson.loads(r.content)
    return body


def period_start(url: str, subject: str) -> datetime:
    r = httpx.get(f"{url}/api/v1/subjects/{subject}/entitlements", timeout=30)
    (ent,) = [e for e in r.json() if e["featureKey"] == "tokens"]
    return datetime.fromisoformat(ent["currentUsagePeriod"]["from"])


def assert_balances(url: str, sent: list[Sent]) -> None:
    """Each subject's usage is the truth's tokens in the current period, and the balance what is left."""
    for subject in sorted({s.subject for s in sent}):
        start = period_start(url, subject)
        truth = sum((s.value("tokens_total") for s in sent if s.subject == subject and s.time >= start), Decimal(0))
        got = value(url, subject)
        assert (Decimal(str(got["usage"])), Decimal(str(got["balance"]))) == (truth, ISSUE - truth), subject
        assert got["hasAccess"] is True


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path / "data", env={"METERSTREAM_LOCAL_DEFAULT_PLAN": "everyone"}).start()
    yield stack
    stack.stop()


def test_postgres_away_for_20s_then_meterstream_killed_loses_nothing(local: LocalStack) -> None:
    setup_limits(local.url)
    first = Load(local.url, seed=21, subjects=5, batch=50)
    first.run(4)
    wait_until_stored(local.url, len(first.sent))
    assert_balances(local.url, first.sent)
    entitlements_before = httpx.get(f"{local.url}/api/v1/entitlements", timeout=30).json()

    local.kill_postgres()
    time.sleep(0.5)
    away_until = time.monotonic() + 20
    during = Load(local.url, seed=22, subjects=5, batch=50, source="during")
    while time.monotonic() < away_until:
        started = time.monotonic()
        r = httpx.get(f"{local.url}/api/v1/subjects/u1/entitlements/tokens/value", timeout=30)
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert int(r.headers["retry-after"]) > 0
        assert time.monotonic() - started < 5, (
            "a control request must fail fast while PostgreSQL is away (the pool waits 2 s)"
        )
        write = httpx.post(f"{local.url}/api/v1/features", json={"key": "x", "name": "x"}, timeout=30)
        assert write.status_code == 503, write.text
        during.run(1)  # ingest keeps accepting (204), and usage queries keep answering
        q = httpx.get(f"{local.url}/api/v1/meters/tokens_total/query", timeout=30)
        assert q.status_code == 200, q.text
        assert httpx.get(f"{local.url}/readyz", timeout=30).status_code == 200
        time.sleep(3)

    local.start_postgres()
    deadline = time.monotonic() + 30
    while httpx.get(f"{local.url}/api/v1/entitlements", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the control plane did not come back"
        time.sleep(0.5)
    assert httpx.get(f"{local.url}/api/v1/entitlements", timeout=30).json() == entitlements_before
    sent = first.sent + during.sent
    wait_until_stored(local.url, len(sent))
    assert_balances(local.url, sent)
    assert_exact(local.url, sent)

    # kill -9 of `meterstream up` itself: its PostgreSQL keeps running, the next start finds it again.
    local.kill()
    local.start()
    assert httpx.get(f"{local.url}/api/v1/entitlements", timeout=30).json() == entitlements_before
    after = Load(local.url, seed=23, subjects=5, batch=50, source="after")
    after.run(2)
    sent += after.sent
    wait_until_stored(local.url, len(sent))
    assert_balances(local.url, sent)


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[MultiProcessStack]:
    stack = MultiProcessStack(tmp_path / "stack", control=True, extra_env={"METERSTREAM_SINK_DEFAULT_PLAN": "everyone"})
    yield from stack.running()


def test_every_process_killed_mid_stream(topology: MultiProcessStack) -> None:
    setup_limits(topology.query_url)
    load = Load(topology.ingest_url, seed=41, subjects=8)
    load.start()
    rng = random.Random(7)
    assert topology.ingest is not None
    assert topology.sink is not None
    for service in (topology.sink, topology.processors[0], topology.ingest):
        time.sleep(rng.uniform(1.0, 2.5))
        service.kill()
        time.sleep(rng.uniform(0, 0.5))
        topology.restart(service)
        value(topology.query_url, f"u{rng.randrange(8)}")  # the control API answers after each restart
    load.stop()
    assert not load.errors, load.errors
    try:
        wait_until_stored(topology.query_url, len(load.sent))
        assert_exact(topology.query_url, load.sent)
        assert_balances(topology.query_url, load.sent)
    except AssertionError:
        print(topology.logs())
        raise

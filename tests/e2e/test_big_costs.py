"""Expensive calls, end to end: a call costing more than USD 9.22 (2^63 atto-dollars), and a window whose
cost passes it only summed, are counted exactly, and the events behind them on the same partition too
(such a record once stopped its partition for good while every request was answered 204)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from tests.helpers.events import iso
from tests.helpers.stack import LocalStack
from tests.helpers.truth import price

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    # One partition: every subject's events queue behind the expensive ones.
    stack = LocalStack(tmp_path_factory.mktemp("big") / "data", {"METERSTREAM_LOCAL_PARTITIONS": "1"}).start()
    yield stack
    assert stack.stop() == 0, stack.service.log()[-3000:] if stack.service else ""


def event(subject: str, output_tokens: int, at: datetime) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "big-costs",
        "type": "llm.usage",
        "subject": subject,
        "time": iso(at),
        "data": {"provider": "openai", "model": "gpt-4o", "input_tokens": 0, "output_tokens": output_tokens},
    }


def cost_of(stack: LocalStack, subject: str) -> Decimal:
    r = httpx.get(f"{stack.url}/api/v1/meters/cost_usd/query", params={"subject": subject}, timeout=30)
    assert r.status_code == 200, r.text
    return sum((Decimal(str(row["value"])) for row in r.json()["data"]), Decimal(0))


def test_expensive_calls_count_exactly_and_hold_nothing_up(stack: LocalStack) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    batch = [event("three", 700_000, now) for _ in range(3)]  # USD 7 each: 2.1e19 atto-dollars together
    single = event("big", 2_000_000, now)  # USD 20
    after = [event(f"after-{i}", 1000, now) for i in range(5)]
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        r = client.post(
            "/api/v1/events",
            content=orjson.dumps(batch),
            headers={"Content-Type": "application/cloudevents-batch+json"},
        )
        assert r.status_code == 204, r.text
        for e in (single, *after):
            r = client.post(
                "/api/v1/events", content=orjson.dumps(e), headers={"Content-Type": "application/cloudevents+json"}
            )
            assert r.status_code == 204, r.text

    def truth(output_tokens: int) -> Decimal:
        p = price("openai", "gpt-4o", now, {"output_tokens": output_tokens})
        assert p is not None
        return p

    expected = {"three": 3 * truth(700_000), "big": truth(2_000_000)} | {f"after-{i}": truth(1000) for i in range(5)}
    assert expected["big"] > Decimal(2**63) / 10**18 and truth(700_000) * 3 > Decimal(2**63) / 10**18
    deadline = time.monotonic() + 60
    while (got := {s: cost_of(stack, s) for s in expected}) != expected:
        assert time.monotonic() < deadline, got
        time.sleep(0.3)
    # The audit log has each event's own price.
    r = httpx.get(f"{stack.url}/api/v1/events", params={"subject": "big"}, timeout=30)
    assert r.status_code == 200, r.text
    (stored,) = r.json()
    assert stored["event"]["id"] == single["id"]
    assert Decimal(stored["meterstream"]["costUsd"]) == expected["big"]
    r = httpx.get(f"{stack.url}/api/v1/admin/reconcile", params={"from": iso(now), "to": iso(datetime.now(UTC))})
    assert r.status_code == 200, r.text
    assert r.json()["differences"] == []

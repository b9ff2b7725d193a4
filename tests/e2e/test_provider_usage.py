"""Raw provider usage in over HTTP, priced at the time of each call, queried back by model and provider:
equal to genai-prices' extract_usage + calc_price on the fixtures, to the last decimal."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fixtures.provider_responses import FIXTURES, Fixture
from tests.helpers.stack import LocalStack
from tests.unit.test_provider_fixtures import truth

pytestmark = pytest.mark.e2e

OVERRIDES = """
prices:
  - provider: aws
    model: acme.private-llm-v2:0
    effective_from: 2026-01-01
    prices: {input_mtok: "0.20", output_mtok: "0.80"}
"""
OVERRIDDEN = "acme.private-llm-v2:0"
SUBJECTS = ("ann", "bob", "cid")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    base = tmp_path_factory.mktemp("pricing")
    overrides = base / "prices.yaml"
    overrides.write_text(OVERRIDES)
    env = {
        "METERSTREAM_PROCESSOR_ALLOWED_LATENESS_S": str(5 * 365 * 86400),
        "METERSTREAM_PROCESSOR_PRICE_OVERRIDES": str(overrides),
    }
    stack = LocalStack(base / "data", env).start()
    yield stack
    stack.stop()


def expected_rows(fixture: Fixture) -> tuple[dict[str, int], Decimal | None]:
    counts, total, _, _ = truth(fixture)
    if fixture.model == OVERRIDDEN:
        total = (
            Decimal(counts["input_tokens"]) * Decimal("0.20") + Decimal(counts["output_tokens"]) * Decimal("0.80")
        ) / 10**6
    return counts, total


@pytest.fixture(scope="module")
def sent(stack: LocalStack) -> dict[tuple[str, str], dict[str, Decimal]]:
    """Expected totals per (provider, model), every fixture sent once per subject (and once more, as a retry)."""
    totals: dict[tuple[str, str], dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    events = []
    for i, fixture in enumerate(FIXTURES):
        counts, cost = expected_rows(fixture)
        provider = {"bedrock": "aws", "gemini": "google"}.get(fixture.provider, fixture.provider)
        for subject in SUBJECTS:
            events.append(fixture.event(i, subject))
            row = totals[(provider, fixture.model)]
            row["requests"] += 1
            row["input_tokens"] += counts.get("input_tokens", 0)
            row["output_tokens"] += counts.get("output_tokens", 0)
            row["cache_read_tokens"] += counts.get("cache_read_tokens", 0)
            row["cache_write_tokens"] += counts.get("cache_write_tokens", 0)
            row["reasoning_tokens"] += counts.get("output_reasoning_tokens", 0)
            row["tokens_total"] += counts.get("input_tokens", 0) + counts.get("output_tokens", 0)
            row["cost_usd"] += cost or Decimal(0)
            row["unpriced_requests"] += 1 if cost is None else 0
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for body in (events, events[::7]):  # the second post retries some of them: they must count once
            response = client.post(
                "/api/v1/events",
                content=orjson.dumps(body),
                headers={"Content-Type": "application/cloudevents-batch+json"},
            )
            assert response.status_code == 204, response.text
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            data = client.get("/api/v1/meters/requests/query").json()["data"]
            if data and data[0]["value"] == len(events):
                break
            time.sleep(0.3)
    return totals


@pytest.mark.parametrize(
    "meter",
    [
        "requests",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "tokens_total",
        "cost_usd",
        "unpriced_requests",
    ],
)
def test_meters_by_provider_and_model(
    stack: LocalStack, sent: dict[tuple[str, str], dict[str, Decimal]], meter: str
) -> None:
    response = httpx.get(
        f"{stack.url}/api/v1/meters/{meter}/query", params=[("groupBy", "provider"), ("groupBy", "model")], timeout=30
    )
    assert response.status_code == 200, response.text
    rows = json.loads(response.text, parse_float=Decimal, parse_int=Decimal)["data"]
    got = {(r["groupBy"]["provider"], r["groupBy"]["model"]): r["value"] for r in rows}
    assert got == {key: totals[meter] for key, totals in sent.items()}


def test_unpriced_models_are_visible_per_model(
    stack: LocalStack, sent: dict[tuple[str, str], dict[str, Decimal]]
) -> None:
    response = httpx.get(f"{stack.url}/api/v1/meters/unpriced_requests/query", params={"groupBy": "model"})
    unpriced = {r["groupBy"]["model"]: r["value"] for r in response.json()["data"] if r["value"]}
    assert unpriced == {"ft:gpt-9-turbo:acme::xyz": 3}
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert 'meterstream_processor_unpriced_total{model="ft:gpt-9-turbo:acme::xyz",provider="openai"} 3.0' in metrics


def test_each_event_keeps_its_price_parts_and_source(stack: LocalStack, sent: object) -> None:
    events = httpx.get(
        f"{stack.url}/api/v1/events", params={"from": "2020-01-01T00:00:00Z", "limit": 100, "id": "fixture-0-"}
    ).json()
    assert {e["event"]["subject"] for e in events} == set(SUBJECTS)
    info = events[0]["meterstream"]
    assert info["costUsd"] == "0.00045" and info["priceSource"].startswith("genai-prices 0.2.3 data:")
    assert info["usage"] == {
        "input_tokens": 1000,
        "output_tokens": 500,
        "cache_read_tokens": 0,
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "output_reasoning_tokens": 0,
    }
    overridden = httpx.get(
        f"{stack.url}/api/v1/events", params={"from": "2020-01-01T00:00:00Z", "subject": "ann", "id": "bedrock-unknown"}
    ).json()
    assert overridden[0]["meterstream"]["priceSource"].startswith("override prices.yaml#0")


def test_price_transparency_endpoint(stack: LocalStack) -> None:
    response = httpx.get(
        f"{stack.url}/api/v1/prices",
        params={"provider": "anthropic", "model": "claude-sonnet-4-20250514", "at": "2026-01-01T00:00:00Z"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prices"]["input_mtok"] == "3" and body["prices"]["cache_read_mtok"] == "0.3"
    assert body["source"].startswith("genai-prices 0.2.3")
    override = httpx.get(
        f"{stack.url}/api/v1/prices", params={"provider": "bedrock", "model": OVERRIDDEN, "at": "2026-06-01T00:00:00Z"}
    ).json()
    assert override["source"].startswith("override") and override["prices"] == {
        "input_mtok": "0.20",
        "output_mtok": "0.80",
    }
    missing = httpx.get(f"{stack.url}/api/v1/prices", params={"provider": "openai", "model": "nope"})
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    batch = httpx.get(
        f"{stack.url}/api/v1/prices",
        params={"provider": "openai", "model": "gpt-4o-mini", "processing": "batch", "at": "2026-11-01T00:00:00Z"},
    )
    assert batch.json()["prices"]["input_mtok"] == "0.075"


def test_invalid_overrides_stop_the_service_with_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("prices: [{provider: a, model: b, effective_from: 2025-01-01, prices: {input_mtokens: 1}}]")
    stack = LocalStack(tmp_path / "data", {"METERSTREAM_PROCESSOR_PRICE_OVERRIDES": str(bad)})
    with pytest.raises(RuntimeError, match="exited"):
        stack.start(timeout_s=60)
    assert stack.service is not None
    assert "unknown price keys" in stack.service.log() and str(bad) in stack.service.log()

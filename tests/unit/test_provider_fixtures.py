"""Every fixture provider response, through ingest's parsing and the pricer, equals what genai-prices' own
extract_usage + calc_price give, to the last decimal. No I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from genai_prices import Usage, calc_price, extract_usage
from genai_prices.data_snapshot import get_snapshot

from ingest.parsing import IngestPolicy, parse_request
from processors.pricing import Price, Pricer, Unpriced
from tests.fixtures.provider_responses import FIXTURES, Fixture, snake_case_gemini

NOW = datetime(2026, 11, 22, tzinfo=UTC)
POLICY = IngestPolicy("llm.usage", 1000, timedelta(hours=1))


def truth(fixture: Fixture) -> tuple[dict[str, int], Decimal | None, Decimal | None, Decimal | None]:
    """(counts, total, input part, output part) straight from genai-prices."""
    when = datetime.fromisoformat(fixture.time)
    try:
        usage = extract_usage(fixture.response, provider_id=fixture.provider, api_flavor=fixture.api).usage
    except LookupError:  # unknown model: extract the usage without the model lookup
        provider = get_snapshot().find_provider(None, fixture.provider, None)
        usage = provider.extract_usage(fixture.response, api_flavor=fixture.api)[1]
    counts = {k: int(v) for k, v in usage.__dict__.items() if v is not None}
    try:
        price = calc_price(
            Usage(**counts),
            fixture.model,
            provider_id=fixture.provider,
            genai_request_timestamp=when,
            price_context=fixture.context or None,
        )
    except LookupError:
        return counts, None, None, None
    return counts, price.total_price, price.input_price, price.output_price


def ingest(fixture: Fixture) -> Any:
    (accepted,) = parse_request(
        {"content-type": "application/cloudevents+json"}, orjson.dumps(fixture.event(0)), POLICY, NOW
    )
    return accepted


def test_there_are_enough_fixtures() -> None:
    assert len(FIXTURES) >= 25
    providers = {f.provider for f in FIXTURES} | {f.api for f in FIXTURES}
    assert {"openai", "anthropic", "google", "aws", "chat", "responses"} <= providers | {
        "aws" if "bedrock" in providers else ""
    }


@pytest.mark.parametrize("fixture", [*FIXTURES, snake_case_gemini()], ids=lambda f: f.name)
def test_fixture_matches_genai_prices(fixture: Fixture) -> None:
    accepted = ingest(fixture)
    same = next(f for f in FIXTURES if f.name == "gemini-25-pro-thinking-tools")  # the snake-case one is this usage
    counts, total, input_part, output_part = truth(same if fixture.name == "gemini-sdk-snake-case" else fixture)
    assert accepted["usage"] == counts
    assert accepted.get("price_context", {}) == fixture.context
    price = Pricer(check_every=0).price(
        accepted["provider"], accepted["model"], accepted["time_us"], accepted["usage"], accepted.get("price_context")
    )
    if total is None:
        assert isinstance(price, Unpriced), price
        assert "no price known" in price.reason
    else:
        assert isinstance(price, Price), price
        assert (price.total_usd, price.input_usd, price.output_usd) == (total, input_part, output_part)
        assert price.total_usd > 0


def test_the_tier_cliff_is_on_both_sides() -> None:
    at, over = (next(f for f in FIXTURES if f.name == n) for n in ("gemini-25-pro-at-200k", "gemini-25-pro-over-200k"))
    assert truth(at)[1] == Decimal("0.260")
    assert truth(over)[1] == Decimal("0.5150025")


def test_reference_amounts() -> None:
    plain = next(f for f in FIXTURES if f.name == "openai-chat-plain")
    assert truth(plain)[1] == Decimal("0.00045")
    bedrock = next(f for f in FIXTURES if f.name == "bedrock-claude-cache")
    assert truth(bedrock)[1] == Decimal("0.0645")


def test_a_variant_genai_prices_does_not_know_is_unpriced_not_guessed() -> None:
    # genai-prices would silently charge the standard price for a batch call before its batch prices start.
    fixture = next(f for f in FIXTURES if f.name == "openai-chat-plain")
    event = fixture.event(0)
    event["data"]["batch"] = True
    event["time"] = "2025-03-01T00:00:00Z"
    (accepted,) = parse_request({"content-type": "application/cloudevents+json"}, orjson.dumps(event), POLICY, NOW)
    price = Pricer().price(
        accepted["provider"], accepted["model"], accepted["time_us"], accepted["usage"], accepted["price_context"]
    )
    assert isinstance(price, Unpriced)
    assert "processing=batch" in price.reason and "override" in price.reason

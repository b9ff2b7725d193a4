"""The pricer: the fast path equals genai-prices' calc_price, overrides, variants, provenance."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from genai_prices import Usage, calc_price
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.pricing import Price, PriceOverrideError, Pricer, Unpriced, genai_prices_source, load_overrides
from schemas.events import to_micros

MODELS = [
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4o"),
    ("openai", "o3"),
    ("openai", "gpt-5"),
    ("anthropic", "claude-sonnet-4-20250514"),
    ("anthropic", "claude-sonnet-4-5"),
    ("google", "gemini-2.5-pro"),
    ("google", "gemini-2.5-flash"),
    ("aws", "anthropic.claude-sonnet-4-20250514-v1:0"),
    ("deepseek", "deepseek-chat"),
]
PRICER = Pricer(check_every=0)


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, str, datetime, dict[str, int]]:
    provider, model = draw(st.sampled_from(MODELS))
    when = draw(st.datetimes(min_value=datetime(2024, 6, 1), max_value=datetime(2026, 12, 31), timezones=st.just(UTC)))
    input_tokens = draw(st.one_of(st.integers(0, 5_000), st.integers(150_000, 400_000), st.integers(0, 10**9)))
    usage = {"input_tokens": input_tokens, "output_tokens": draw(st.integers(0, 100_000))}
    if draw(st.booleans()):
        usage["cache_read_tokens"] = draw(st.integers(0, input_tokens // 2))
    if draw(st.booleans()):
        usage["cache_write_tokens"] = draw(st.integers(0, input_tokens // 2))
        if draw(st.booleans()):
            usage["cache_write_1h_tokens"] = draw(st.integers(0, usage["cache_write_tokens"]))
    if draw(st.booleans()):
        usage["output_reasoning_tokens"] = draw(st.integers(0, usage["output_tokens"]))
    return provider, model, when, usage


@settings(max_examples=400, deadline=None)
@given(calls())
def test_fast_path_equals_calc_price(call: tuple[str, str, datetime, dict[str, int]]) -> None:
    provider, model, when, usage = call
    expected = calc_price(Usage(**usage), model, provider_id=provider, genai_request_timestamp=when)
    got = PRICER.price(provider, model, to_micros(when), usage)
    assert isinstance(got, Price)
    assert (got.total_usd, got.input_usd, got.output_usd) == (
        expected.total_price,
        expected.input_price,
        expected.output_price,
    )


def test_unknown_models_are_unpriced_with_a_reason() -> None:
    got = PRICER.price("openai", "not-a-model", to_micros(datetime(2026, 1, 1, tzinfo=UTC)), {"input_tokens": 5})
    assert isinstance(got, Unpriced) and "openai/not-a-model" in got.reason
    got = PRICER.price("my-cloud", "llama", to_micros(datetime(2026, 1, 1, tzinfo=UTC)), {"input_tokens": 5})
    assert isinstance(got, Unpriced)


def test_provenance_names_the_package_and_its_data() -> None:
    got = PRICER.price("openai", "gpt-4o-mini", to_micros(datetime(2026, 1, 1, tzinfo=UTC)), {"input_tokens": 5})
    assert isinstance(got, Price)
    assert got.source.startswith("genai-prices 0.2.3 data:") and got.source.endswith("openai/gpt-4o-mini")
    assert genai_prices_source() in got.source


OVERRIDES = """
prices:
  - provider: openai
    model: ft:gpt-4o-mini-2024-07-18:acme::abc123
    effective_from: 2025-01-01
    prices: {input_mtok: "0.28", cache_read_mtok: "0.14", output_mtok: "1.10"}
  - provider: openai
    model: ft:gpt-4o-mini-2024-07-18:acme::abc123
    effective_from: 2025-06-01T00:00:00Z
    prices: {input_mtok: "0.25", output_mtok: "1.00"}
  - provider: OpenAI
    model: gpt-4o-mini
    effective_from: 2026-01-01
    prices: {input_mtok: "0.10", output_mtok: "0.40"}
  - provider: self-hosted
    model: llama-3.1-70b
    effective_from: 2024-06-01
    when: {processing: batch}
    prices: {input_mtok: "0.05", output_mtok: "0.05"}
"""


@pytest.fixture
def overrides(tmp_path: Path) -> Pricer:
    path = tmp_path / "prices.yaml"
    path.write_text(OVERRIDES)
    return Pricer(load_overrides(path))


def us(text: str) -> int:
    return to_micros(datetime.fromisoformat(text))


def test_overrides_take_precedence_from_their_date(overrides: Pricer) -> None:
    usage = {"input_tokens": 1_000_000, "cache_read_tokens": 0, "output_tokens": 1_000_000}
    ft = "ft:gpt-4o-mini-2024-07-18:acme::abc123"
    # genai-prices knows OpenAI fine-tune prices; the negotiated ones apply from their date.
    before = overrides.price("openai", ft, us("2024-12-31T23:59:59+00:00"), usage)
    assert isinstance(before, Price) and before.source.endswith("openai/ft:gpt-4o-mini")
    first = overrides.price("openai", ft, us("2025-03-01T00:00:00+00:00"), usage)
    assert isinstance(first, Price) and first.total_usd == Decimal("1.38") and "override prices.yaml#0" in first.source
    second = overrides.price("openai", ft, us("2025-06-01T00:00:00+00:00"), usage)
    assert isinstance(second, Price) and second.total_usd == Decimal("1.25")
    # An override of a model genai-prices knows wins from its date; before it, genai-prices prices it.
    known = overrides.price("openai", "gpt-4o-mini", us("2025-12-31T00:00:00+00:00"), usage)
    after = overrides.price("openai", "gpt-4o-mini", us("2026-01-01T00:00:00+00:00"), usage)
    assert isinstance(known, Price) and known.total_usd == Decimal("0.75") and known.source.startswith("genai-prices")
    assert isinstance(after, Price) and after.total_usd == Decimal("0.50")


def test_an_override_with_a_context_only_prices_that_context(overrides: Pricer) -> None:
    usage = {"input_tokens": 2_000_000, "output_tokens": 0}
    when = us("2025-01-01T00:00:00+00:00")
    assert isinstance(overrides.price("self-hosted", "llama-3.1-70b", when, usage), Unpriced)
    batch = overrides.price("self-hosted", "llama-3.1-70b", when, usage, {"processing": "batch"})
    assert isinstance(batch, Price) and batch.total_usd == Decimal("0.10")


def test_quote_shows_the_price_and_its_source(overrides: Pricer) -> None:
    quote = overrides.quote("openai", "gpt-4o-mini", datetime(2026, 2, 1, tzinfo=UTC))
    assert quote.prices == {"input_mtok": "0.10", "output_mtok": "0.40"} and quote.source.startswith("override")
    quote = PRICER.quote("google", "gemini-2.5-pro", datetime(2026, 2, 1, tzinfo=UTC))
    assert quote.prices["input_mtok"] == {"base": "1.25", "tiers": [{"above_input_tokens": 200000, "price": "2.5"}]}
    with pytest.raises(LookupError):
        PRICER.quote("openai", "nope", datetime(2026, 2, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prices: [{provider: a, model: b, effective_from: 2025-01-01, prices: {input_mtok: -1}}]", "non-negative"),
        (
            "prices: [{provider: a, model: b, effective_from: 2025-01-01, prices: {inptu_mtok: 1}}]",
            "unknown price keys",
        ),
        ("prices: [{provider: a, model: b, prices: {input_mtok: 1}}]", "effective_from"),
        (
            "prices: [{provider: a, model: b, effective_from: '2025-01-01T00:00:00', prices: {input_mtok: 1}}]",
            "UTC offset",
        ),
        ("prices: [{provider: a, model: b, effective_from: 2025-01-01, prices: {}}]", "at least one price"),
        ("prices: [{provider: a, model: b, effective_from: 2025-01-01, prices: {input_mtok: abc}}]", "prices.0.prices"),
        ("prices: [{provider: a, model: b, effective_from: 2025-01-01, prices: {input_mtok: 1}, extra: 1}]", "extra"),
        ("prices: {", "cannot read"),
        ("just a string", "invalid price overrides"),
    ],
)
def test_invalid_override_files_are_refused_with_the_cause(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PriceOverrideError, match=message) as info:
        load_overrides(path)
    assert str(path) in str(info.value)


def test_a_missing_override_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PriceOverrideError, match="cannot read"):
        load_overrides(tmp_path / "missing.yaml")

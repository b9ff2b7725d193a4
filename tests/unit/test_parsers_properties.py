"""Property-based tests of the parsers: whatever arrives, the answer is an accepted event or a Problem
naming the cause, never a crash; and what is accepted is exactly what was sent."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.parsing import IngestPolicy, parse_request
from query.params import build_query, from_query_string
from schemas.events import to_micros
from schemas.meters import METERS
from schemas.problems import Problem
from schemas.usage import UsageError, normalize_usage, usage_keys

NOW = datetime(2026, 6, 1, tzinfo=UTC)
POLICY = IngestPolicy("llm.usage", 50, timedelta(hours=1))
CONTENT_TYPES = st.sampled_from(
    ["application/cloudevents+json", "application/cloudevents-batch+json", "application/json", "text/plain", ""]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
printable = st.text(st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), content_type=CONTENT_TYPES)
def test_arbitrary_bytes_never_crash(body: bytes, content_type: str) -> None:
    try:
        parse_request({"content-type": content_type}, body, POLICY, NOW)
    except Problem as problem:
        assert 400 <= problem.status < 500 and problem.detail


@settings(max_examples=300, deadline=None)
@given(value=json_values, content_type=CONTENT_TYPES)
def test_arbitrary_json_never_crashes(value: Any, content_type: str) -> None:
    try:
        parse_request({"content-type": content_type}, json.dumps(value).encode(), POLICY, NOW)
    except Problem as problem:
        assert 400 <= problem.status < 500 and problem.detail


counts = st.integers(0, 10**9)


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    input_tokens = draw(counts)
    output_tokens = draw(counts)
    data = {
        "provider": draw(st.sampled_from(["openai", "anthropic", "google", "aws", "my-llm"])),
        "model": draw(printable.filter(str.strip)),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_read_tokens": draw(st.integers(0, input_tokens)),
        "reasoning_tokens": draw(st.integers(0, output_tokens)),
    }
    time = draw(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2026, 6, 1), timezones=st.just(UTC)))
    return {
        "specversion": "1.0",
        "id": draw(printable),
        "source": draw(printable),
        "type": "llm.usage",
        "subject": draw(printable),
        "time": time.isoformat(),
        "data": data,
    }


@settings(max_examples=300, deadline=None)
@given(events=st.lists(valid_events(), min_size=1, max_size=10))
def test_valid_events_are_accepted_exactly(events: list[dict[str, Any]]) -> None:
    accepted = parse_request({"content-type": "application/cloudevents-batch+json"}, orjson.dumps(events), POLICY, NOW)
    assert len(accepted) == len(events)
    for sent, got in zip(events, accepted, strict=True):
        assert (got["id"], got["source"], got["subject"]) == (sent["id"], sent["source"], sent["subject"])
        assert got["time_us"] == to_micros(datetime.fromisoformat(sent["time"]))
        assert got["model"] == sent["data"]["model"].strip()
        usage = got["usage"]
        assert usage["input_tokens"] == sent["data"]["input_tokens"]
        assert usage["output_reasoning_tokens"] == sent["data"]["reasoning_tokens"]
        assert orjson.loads(got["data"]) == sent["data"]


@settings(max_examples=500, deadline=None)
@given(data=st.dictionaries(st.sampled_from(sorted(usage_keys())), st.integers(-5, 10**13), min_size=1, max_size=8))
def test_accepted_usage_is_consistent(data: dict[str, int]) -> None:
    """Whatever is accepted satisfies every subset relation (cache reads within input, ...)."""
    try:
        usage = normalize_usage(data)
    except UsageError as error:
        assert error.field.startswith("data") and error.message
        return
    c = usage.counts
    assert all(0 <= v <= 10**12 for v in c.values())
    assert (
        c.get("cache_read_tokens", 0) + c.get("cache_write_tokens", 0) <= c.get("input_tokens", 10**13)
        or "input_tokens" not in c
    )
    assert c.get("output_reasoning_tokens", 0) <= c.get("output_tokens", 10**13) or "output_tokens" not in c


params = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "from",
                "to",
                "windowSize",
                "windowTimeZone",
                "subject",
                "groupBy",
                "filterGroupBy",
                "filterGroupBy[model]",
                "advancedMeterGroupByFilters",
                "clientId",
                "x",
            ]
        ),
        st.one_of(
            st.text(max_size=30),
            st.sampled_from(["2025-01-01T00:00:00Z", "DAY", "model", "UTC", '{"model": {"$in": ["a"]}}']),
        ),
    ),
    max_size=8,
)


@settings(max_examples=500, deadline=None)
@given(items=params, meter=st.sampled_from(METERS))
def test_query_parameters_never_crash(items: list[tuple[str, str]], meter: Any) -> None:
    try:
        query = build_query(meter, from_query_string(items))
    except Problem as problem:
        assert problem.status == 400 and problem.errors
        return
    assert set(query.group_by) <= {"subject", "provider", "model"}
    assert query.start is None or query.end is None or query.start < query.end

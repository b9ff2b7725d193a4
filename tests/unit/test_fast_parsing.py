"""Ingest's fast path (msgspec, ``ingest.fast.fast_events``) changes no answer: for any body, the answer
of ``parse_request`` (the accepted events, or the Problem with every error) is the exact path's, and what
the fast decoder accepts, pydantic's CloudEvent accepts with the same values. Bodies are built to sit on the
two decoders' known differences: control characters (escaped, raw DEL), string lengths at the limits
counted in code points, time fractions past microseconds, odd time forms, deep data, numbers JSON refuses."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest import parsing
from ingest.fast import fast_events
from ingest.parsing import IngestPolicy, parse_request
from schemas.events import CLOUD_EVENT, CLOUD_EVENT_BATCH
from schemas.problems import Problem

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
POLICY = IngestPolicy("llm.usage", 50, timedelta(hours=1), litellm_event_type="litellm_tokens")
ENVELOPE = ("specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema", "data")

nasty_chars = st.sampled_from(["a", "é", "\U0001f600", " ", "\x00", "\n", "\x1f", "\x7f", "\x80", "\\", '"', "/"])
texts = (
    st.text(nasty_chars, max_size=6)
    | st.builds(lambda n, c: c * n, st.sampled_from([1, 255, 256, 257, 1023, 1024, 1025]), nasty_chars)
    | st.builds(lambda s: s + "\n", st.text(nasty_chars, min_size=1, max_size=3))
)
fractions = st.sampled_from(["", ".", ".5", ".123456", ".1234564", ".1234565", ".9999995", ".000000000001", ",5"])
offsets = st.sampled_from(["Z", "z", "+00:00", "-00:00", "+01:00", "+23:59", "+24:00", "+0100", "", "-05:30"])
times = st.builds(
    lambda date, sep, clock, fraction, offset: f"{date}{sep}{clock}{fraction}{offset}",
    st.sampled_from(["2026-06-01", "2026-05-31", "1970-01-01", "1969-12-31", "0001-01-01", "2026-02-30"]),
    st.sampled_from(["T", "t", " ", "_"]),
    st.sampled_from(["12:00:00", "11:30:59", "00:00:60", "23:59:59", "12:00"]),
    fractions,
    offsets,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=12,
)
usage_data = st.fixed_dictionaries(
    {
        "provider": st.sampled_from(["openai", "anthropic", "openai", "anthropic", " ", ""]) | texts,
        "model": st.sampled_from(["gpt-4o", "claude-sonnet-4-20250514", "gpt-4o"]) | texts,
        "input_tokens": st.integers(-1, 10**6) | st.integers(0, 10**6) | st.floats(0, 10),
        "output_tokens": st.integers(0, 10**6),
    },
    optional={"service_tier": st.sampled_from(["flex", "batch", "", 1]), "batch": st.booleans() | st.none()},
)
litellm_data = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o", ""]), "prompt_tokens": st.integers(0, 99), "cost": st.floats(-1, 1)}
)


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"x": [value]}
    return value


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    # Half of the events are valid but for a field or two, so that whole requests are accepted too.
    clean = draw(st.booleans())

    def pick(valid: st.SearchStrategy[Any], nasty: st.SearchStrategy[Any]) -> Any:
        return draw(valid if clean and draw(st.integers(0, 9)) else valid | nasty)

    event: dict[str, Any] = {
        "specversion": pick(st.just("1.0"), st.sampled_from(["0.3", 1.0])),
        "id": pick(st.sampled_from(["e1", "e2", "é😀"]), texts),
        "source": pick(st.just("app"), texts),
        "type": pick(st.sampled_from(["llm.usage", "litellm_tokens", "other"]), texts),
        "subject": pick(st.sampled_from(["u1", "ü"]), texts | st.integers()),
    }
    valid_time = st.builds(
        lambda minutes, fraction: f"2026-06-01T{11 + minutes // 60:02}:{minutes % 60:02}:00{fraction}Z",
        st.integers(0, 119),
        fractions,
    )
    optional = {
        "time": pick(st.none() | valid_time, times | st.integers(0, 2**40)),
        "datacontenttype": pick(
            st.sampled_from(["application/json", "Application/JSON; charset=utf-8"]),
            st.sampled_from(["text/plain", "application/json\n"]),
        ),
        "dataschema": pick(st.sampled_from(["", "https://x/schema"]), st.integers()),
        "data": pick(
            usage_data | litellm_data | st.dictionaries(texts, json_values, max_size=3),
            st.none() | json_values | st.builds(deep, st.integers(5, 12)),
        ),
        "extension": draw(json_values),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            event[name] = values
    if not clean:
        for name in draw(st.sets(st.sampled_from(["id", "specversion", "subject"]), max_size=1)):
            del event[name]
    return event


def encoded(value: Any, escaped: bool, raw: list[tuple[str, str]]) -> bytes:
    text = json.dumps(value, ensure_ascii=escaped)
    for placeholder, literal in raw:  # numbers json.dumps cannot write as sent: NaN, 1e309, 1.0000000000000001
        text = text.replace(f'"{placeholder}"', literal)
    return text.encode()


raw_numbers = st.lists(
    st.sampled_from([("n1", "NaN"), ("n1", "1e309"), ("n1", "1.00000000000000011"), ("n1", "-0"), ("n1", "1E2")]),
    max_size=1,
)


def answer(call: Any) -> Any:
    try:
        return call()
    except Problem as problem:
        return ("problem", problem.status, problem.detail, problem.errors)


def values(event: Any) -> tuple[Any, ...]:
    fields = [getattr(event, name) for name in ENVELOPE]
    time = fields[5]
    fields[5] = None if time is None else (time.isoformat(), time.utcoffset())
    return (*fields[:8], repr(fields[8]))  # repr: tells 1 from 1.0, and writes ints past 64 bits


def check(body: bytes, *, batch: bool) -> None:
    fast = fast_events(body, batch=batch)
    if fast is not None:  # what the fast decoder accepts, pydantic accepts, to the same values
        orjson.loads(body)  # and RFC 8259 allows
        exact = CLOUD_EVENT_BATCH.validate_json(body) if batch else [CLOUD_EVENT.validate_json(body)]
        assert [values(e) for e in (fast if batch else [fast])] == [values(e) for e in exact]
    content_type = "application/cloudevents-batch+json" if batch else "application/cloudevents+json"
    got = answer(lambda: parse_request({"content-type": content_type}, body, POLICY, NOW))
    if batch:
        want = answer(lambda: parsing._accept_batch_exactly(body, POLICY, NOW, allow_empty=True))
    else:
        exact_data = parsing._ExactData(body, "event")
        want = answer(
            lambda: parsing._accept([parsing._validate_one(body)], POLICY, NOW, batch=False, exact=exact_data)
        )
    assert got == want


@settings(max_examples=600, deadline=None)
@given(event=events(), escaped=st.booleans(), raw=raw_numbers)
@example(event={"specversion": "1.0", "id": "a", "source": "s", "type": "t", "subject": "x\n"}, escaped=True, raw=[])
@example(event={"specversion": "1.0", "id": "a", "source": "s", "type": "t", "subject": "x\x7f"}, escaped=False, raw=[])
@example(
    event={
        "specversion": "1.0",
        "id": "a",
        "source": "s",
        "type": "t",
        "subject": "u",
        "time": "2026-06-01T12:00:00.9999995Z",
    },
    escaped=True,
    raw=[],
)
def test_one_event_gets_the_exact_paths_answer(
    event: dict[str, Any], escaped: bool, raw: list[tuple[str, str]]
) -> None:
    if raw:
        event = {**event, "data": {"v": raw[0][0]}}
    check(encoded(event, escaped, raw), batch=False)


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(events(), max_size=4), escaped=st.booleans(), raw=raw_numbers)
def test_a_batch_gets_the_exact_paths_answer(
    batch: list[dict[str, Any]], escaped: bool, raw: list[tuple[str, str]]
) -> None:
    if raw and batch:
        batch = [*batch[:-1], {**batch[-1], "data": {"v": raw[0][0]}}]
    check(encoded(batch, escaped, raw), batch=True)


@pytest.mark.parametrize(
    ("levels", "fast"),
    [(3, True), (150, False)],  # pydantic refuses data nested 300 deep: the fast path must not accept it
)
def test_deep_data_takes_the_exact_path(levels: int, fast: bool) -> None:
    event = {"specversion": "1.0", "id": "a", "source": "s", "type": "t", "subject": "u", "data": deep(levels)}
    body = json.dumps(event).encode()
    assert (fast_events(body, batch=False) is not None) is fast
    check(body, batch=False)


def test_valid_usage_events_take_the_fast_path() -> None:
    """The common request is served by the fast decoder (else the fast path would exist for nothing)."""
    event = {
        "specversion": "1.0",
        "id": "a",
        "source": "s",
        "type": "llm.usage",
        "subject": "u",
        "time": "2026-06-01T11:59:00.123456Z",
        "data": {"provider": "openai", "model": "gpt-4o", "input_tokens": 10, "output_tokens": 2, "cost": 0.1234567},
    }
    assert fast_events(orjson.dumps([event] * 3), batch=True) is not None
    assert fast_events(orjson.dumps(event), batch=False) is not None


@pytest.mark.parametrize(
    "body", [b'{"id": "\xff\xfe"}', b'[{"id": "a\xc3"}]', b'{"specversion": "1.0", "id": "\xed\xa0\x80"}']
)
def test_invalid_utf8_takes_the_exact_path(body: bytes) -> None:
    """msgspec raises UnicodeDecodeError (not its DecodeError) for invalid UTF-8 inside a string."""
    batch = body.startswith(b"[")
    assert fast_events(body, batch=batch) is None
    check(body, batch=batch)


def _holds_float(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_holds_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_float(v) for v in value)
    return isinstance(value, float)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_has_float_finds_every_float_at_any_depth(value: Any) -> None:
    """``has_float`` decides whether an event's data is read again from the body to keep its numbers exact."""
    assert parsing.has_float(value) is _holds_float(value)
    assert parsing.has_float({"data": [value]}) is _holds_float(value)

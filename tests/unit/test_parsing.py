"""Ingest parsing: every content type and mode, and every kind of invalid input, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from ingest.parsing import IngestPolicy, media_type, parse_request
from schemas.events import to_micros
from schemas.problems import Problem

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
POLICY = IngestPolicy(usage_event_type="llm.usage", max_batch_events=1000, max_future=timedelta(hours=1))


def event(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "app",
        "type": "llm.usage",
        "subject": "alice",
        "time": "2026-01-15T11:00:00Z",
        "data": {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 100, "output_tokens": 20},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def parse(body: Any, content_type: str | None = "application/cloudevents+json", **headers: str) -> list[Any]:
    all_headers = {"content-type": content_type} if content_type else {}
    all_headers.update(headers)
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_request(all_headers, raw, POLICY, NOW)


def rejected(body: Any, content_type: str | None = "application/cloudevents+json", **headers: str) -> Problem:
    with pytest.raises(Problem) as info:
        parse(body, content_type, **headers)
    return info.value


class TestContentTypes:
    def test_structured_single(self) -> None:
        (accepted,) = parse(event())
        assert accepted["subject"] == "alice"
        assert accepted["usage"] == {"input_tokens": 100, "output_tokens": 20}
        assert accepted["time_us"] == to_micros(datetime(2026, 1, 15, 11, tzinfo=UTC))

    def test_batch(self) -> None:
        events = parse([event(id="a"), event(id="b")], "application/cloudevents-batch+json")
        assert [e["id"] for e in events] == ["a", "b"]

    def test_empty_batch_is_a_no_op(self) -> None:
        assert parse([], "application/cloudevents-batch+json") == []

    def test_json_single_and_array(self) -> None:
        assert len(parse(event(), "application/json")) == 1
        assert len(parse([event(id="a"), event(id="b")], "application/json")) == 2

    def test_json_empty_array_is_an_error(self) -> None:
        assert rejected([], "application/json").status == 400

    @pytest.mark.parametrize(
        "content_type",
        ["application/json; charset=utf-8", "application/json;charset=UTF-8", 'application/json; charset="utf-8"'],
    )
    def test_charset_utf8_is_accepted(self, content_type: str) -> None:
        assert len(parse(event(), content_type)) == 1

    def test_other_charset_is_415(self) -> None:
        assert rejected(event(), "application/json; charset=latin-1").status == 415

    @pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data", None])
    def test_unsupported_media_type(self, content_type: str | None) -> None:
        assert rejected(event(), content_type).status == 415

    def test_binary_mode(self) -> None:
        data = {"provider": "anthropic", "model": "claude-sonnet-4-20250514", "input_tokens": 5, "output_tokens": 1}
        (accepted,) = parse(
            data,
            "application/json",
            **{
                "ce-specversion": "1.0",
                "ce-id": "b-1",
                "ce-source": "svc",
                "ce-type": "llm.usage",
                "ce-subject": "bob",
                "ce-time": "2026-01-15T10:00:00+02:00",
            },
        )
        assert (accepted["id"], accepted["subject"], accepted["provider"]) == ("b-1", "bob", "anthropic")
        assert accepted["time_us"] == to_micros(datetime(2026, 1, 15, 8, tzinfo=UTC))

    def test_binary_mode_without_subject(self) -> None:
        problem = rejected(
            b"{}", "application/json", **{"ce-specversion": "1.0", "ce-id": "x", "ce-source": "s", "ce-type": "t"}
        )
        assert problem.status == 400
        assert [e.field for e in problem.errors] == ["subject"]

    def test_binary_mode_with_non_json_data(self) -> None:
        headers = {"ce-specversion": "1.0", "ce-id": "x", "ce-source": "s", "ce-type": "t", "ce-subject": "u"}
        assert rejected(b"hello", "text/plain", **headers).status == 400


class TestValidation:
    def test_missing_time_is_receive_time(self) -> None:
        (accepted,) = parse(event(time=...))
        assert accepted["time_us"] == to_micros(NOW) == accepted["received_us"]

    def test_time_offset_is_converted_to_utc(self) -> None:
        (accepted,) = parse(event(time="2026-01-15T16:30:00.123456+05:30"))
        assert accepted["time_us"] == to_micros(datetime(2026, 1, 15, 11, 0, 0, 123456, tzinfo=UTC))

    @pytest.mark.parametrize(
        ("time", "why"),
        [
            ("0001-01-01T00:00:00+01:00", "before 1970"),  # before year 1 in UTC
            ("9999-12-31T23:59:59-01:00", "in the future"),  # past year 9999 in UTC
        ],
    )
    def test_times_outside_the_calendar_in_utc_are_a_400(self, time: str, why: str) -> None:
        # Converting these to UTC overflows Python's datetime: they were answered 500 ("may be retried").
        problem = rejected([event(id="ok"), event(id="bad", time=time)], "application/cloudevents-batch+json")
        assert problem.status == 400
        assert [(e.field, e.index) for e in problem.errors] == [("time", 1)]
        assert why in problem.errors[0].message

    @pytest.mark.parametrize(
        ("overrides", "field"),
        [
            ({"subject": ...}, "subject"),
            ({"subject": ""}, "subject"),
            ({"subject": "a\nb"}, "subject"),
            ({"id": ""}, "id"),
            ({"id": 5}, "id"),
            ({"source": ...}, "source"),
            ({"specversion": "0.3"}, "specversion"),
            ({"type": ...}, "type"),
            ({"time": "yesterday"}, "time"),
            ({"time": 1700000000}, "time"),
            ({"time": "2026-01-15T11:00:00"}, "time"),
            ({"time": "1969-12-31T23:59:59Z"}, "time"),
            ({"time": "2026-01-15T13:00:01Z"}, "time"),
            ({"time": "3000-01-01T00:00:00Z"}, "time"),
            ({"data": "text"}, "data"),
            ({"data": [1, 2]}, "data"),
            ({"data": None}, "data"),
            ({"data": {"provider": "openai", "model": "m", "input_tokens": -1}}, "data.input_tokens"),
            ({"data": {"provider": "openai", "model": "m", "input_tokens": 1.5}}, "data.input_tokens"),
            ({"data": {"provider": "openai", "model": "m", "input_tokens": "100"}}, "data.input_tokens"),
            ({"data": {"provider": "openai", "model": "m", "input_tokens": 2**63}}, "data.input_tokens"),
            ({"data": {"provider": "openai", "model": "m", "input_tokens": True}}, "data.input_tokens"),
            ({"data": {"provider": "openai", "model": "m", "input_tokenz": 5}}, "data.input_tokenz"),
            ({"data": {"provider": "openai", "model": "m"}}, "data"),
            ({"data": {"model": "m", "input_tokens": 1}}, "data.provider"),
            ({"data": {"provider": "openai", "input_tokens": 1}}, "data.model"),
            (
                {"data": {"provider": "openai", "model": "m", "input_tokens": 10, "cache_read_tokens": 11}},
                "data.cache_read_tokens",
            ),
            ({"data": {"provider": "openai", "model": "m", "usage": {"prompt_tokens": 1}}}, "data.usage"),
            ({"data": {"provider": "openai", "model": "m", "usage": [1]}}, "data.usage"),
            ({"data": {"provider": "openai", "model": "m", "input_tokens": 1, "batch": "yes"}}, "data.batch"),
        ],
    )
    def test_invalid_event_names_the_field(self, overrides: dict[str, Any], field: str) -> None:
        problem = rejected(event(**overrides))
        assert problem.status == 400
        assert field in [e.field for e in problem.errors], problem.errors
        assert field in problem.to_dict()["detail"]

    def test_other_event_types_need_no_usage(self) -> None:
        (accepted,) = parse(event(type="page.view", data={"path": "/"}))
        assert "usage" not in accepted
        (accepted,) = parse(event(type="page.view", data=None))
        assert accepted["data"] == "null"

    def test_every_invalid_event_of_a_batch_is_reported_with_its_index(self) -> None:
        batch = [
            event(id="ok"),
            event(id="a", subject=""),
            event(id="b", time="2999-01-01T00:00:00Z"),
            event(id="c", data={"provider": "openai", "model": "m", "input_tokens": -5}),
        ]
        problem = rejected(batch, "application/cloudevents-batch+json")
        assert [(e.index, e.field) for e in problem.errors] == [(1, "subject"), (2, "time"), (3, "data.input_tokens")]
        body = problem.to_dict()
        assert body["status"] == 400 and body["title"] == "Bad Request"
        assert body["errors"][0] == {"field": "subject", "message": body["errors"][0]["message"], "index": 1}

    def test_batch_over_the_limit_is_413(self) -> None:
        assert rejected([event(id=str(i)) for i in range(1001)], "application/cloudevents-batch+json").status == 413

    @pytest.mark.parametrize(
        "body", [b"{", b"\xff\xfe", b'{"specversion": NaN}', b"", b"null", b'"text"', b"[1,2]", b"[[]]"]
    )
    def test_malformed_bodies(self, body: bytes) -> None:
        assert rejected(body, "application/json").status == 400

    def test_non_ascii_and_sql_like_values_are_data(self) -> None:
        (accepted,) = parse(event(subject="Robert'); DROP TABLE usage_events;--", id="ü-🙂"))
        assert accepted["subject"] == "Robert'); DROP TABLE usage_events;--"

    def test_price_context_from_event_fields(self) -> None:
        (accepted,) = parse(
            event(data={"provider": "openai", "model": "gpt-5", "input_tokens": 1, "service_tier": "flex"})
        )
        assert accepted["price_context"] == {"service_tier": "flex"}
        (accepted,) = parse(event(data={"provider": "openai", "model": "gpt-5", "input_tokens": 1, "batch": True}))
        assert accepted["price_context"] == {"processing": "batch"}
        (accepted,) = parse(
            event(data={"provider": "openai", "model": "gpt-5", "input_tokens": 1, "service_tier": "default"})
        )
        assert "price_context" not in accepted


def test_media_type() -> None:
    assert media_type("Application/JSON; charset=utf-8") == "application/json"
    with pytest.raises(Problem):
        media_type(None)


def test_a_number_past_64_bits_in_data_is_a_400_naming_the_event() -> None:
    """JSON allows any integer, the stored text does not (found by fuzzing: it was a 500)."""
    big = b'{"n": -774356576505580486656}'
    body = b"[" + orjson.dumps(event()) + b", " + orjson.dumps(event(id="evt-2", type="other"))[:-1]
    body += b', "data": ' + big + b"}]"
    problem = rejected(body, "application/cloudevents-batch+json")
    assert problem.status == 400
    assert [(e.field, e.index) for e in problem.errors] == [("data", 1)]
    assert "64 bits" in problem.errors[0].message


def test_a_number_past_64_bits_in_binary_mode_data_is_a_400() -> None:
    """Binary mode's data is parsed by the cloudevents SDK, then written again (found by fuzzing: a 500)."""
    headers = {"ce-specversion": "1.0", "ce-id": "x", "ce-source": "s", "ce-type": "other", "ce-subject": "u"}
    problem = rejected(b'{"n": 1000000000000000000000000000000}', "application/json", **headers)
    assert problem.status == 400
    assert [(e.field, e.index) for e in problem.errors] == [("data", None)]
    assert "64 bits" in problem.errors[0].message


LITELLM = IngestPolicy(
    usage_event_type="llm.usage",
    max_batch_events=1000,
    max_future=timedelta(hours=1),
    litellm_event_type="litellm_tokens",
)


def litellm_event(data: Any) -> bytes:
    return orjson.dumps(event(type="litellm_tokens", source="litellm-proxy", data=data))


@pytest.mark.parametrize(
    ("model", "provider", "name"),
    [
        ("gpt-4o-mini", "openai", "gpt-4o-mini"),
        ("openai/gpt-4o", "openai", "gpt-4o"),
        ("claude-3-5-sonnet-20240620", "anthropic", "claude-3-5-sonnet-20240620"),
        ("gemini/gemini-1.5-pro", "google", "gemini-1.5-pro"),
        ("my-own-model", "unknown", "my-own-model"),
    ],
)
def test_litellm_callback_events_carry_usage(model: str, provider: str, name: str) -> None:
    data = {"model": model, "cost": 0.00012, "prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    headers = {"content-type": "application/cloudevents+json"}
    (accepted,) = parse_request(headers, litellm_event(data), LITELLM, NOW)
    assert (accepted["provider"], accepted["model"]) == (provider, name)
    assert accepted["usage"] == {"input_tokens": 100, "output_tokens": 20}
    assert orjson.loads(accepted["data"])["cost"] == 0.00012  # LiteLLM's own cost stays in the data


def test_litellm_events_without_usage_count_zero_tokens_and_bad_counts_are_a_400() -> None:
    headers = {"content-type": "application/cloudevents+json"}
    (accepted,) = parse_request(headers, litellm_event({"model": "gpt-4o-mini", "cost": None}), LITELLM, NOW)
    assert accepted["usage"] == {"input_tokens": 0, "output_tokens": 0}
    with pytest.raises(Problem) as info:
        parse_request(headers, litellm_event({"model": "gpt-4o-mini", "prompt_tokens": "7"}), LITELLM, NOW)
    assert "data.prompt_tokens" in info.value.detail
    # Turned off (the default policy here): the same event is stored, not metered.
    (plain,) = parse_request(headers, litellm_event({"model": "gpt-4o-mini", "prompt_tokens": 1}), POLICY, NOW)
    assert "usage" not in plain


@pytest.mark.parametrize(
    ("headers", "shape"),
    [
        ({"content-type": "application/cloudevents+json"}, "event"),
        ({"content-type": "application/json"}, "event"),
        ({"content-type": "application/cloudevents-batch+json"}, "batch"),
        ({"content-type": "application/json"}, "batch"),
        (
            {"content-type": "application/json", "ce-specversion": "1.0", "ce-id": "b", "ce-source": "s"}
            | {"ce-type": "t", "ce-subject": "x", "ce-time": "2026-01-15T11:00:00Z"},
            "data",
        ),
    ],
)
def test_numbers_in_data_are_stored_as_they_were_written(headers: dict[str, str], shape: str) -> None:
    """A float would keep 17 significant digits: 1234567890.123456789 would be stored as 1234567890.1234567."""
    data = b'{"v":1234567890.123456789,"w":[0.1234567890123456789012,1E-5,2e3],"n":5,"s":"1.5","f":0.5}'
    event = b'{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"x","data":' + data + b"}"
    plain = b'{"specversion":"1.0","id":"p","source":"s","type":"t","subject":"x","data":{"n":1}}'
    body = {"event": event, "batch": b"[" + plain + b"," + event + b"]", "data": data}[shape]
    accepted = parse_request(headers, body, POLICY, NOW)
    assert accepted[-1]["data"] == data.decode()
    if shape == "batch":
        assert accepted[0]["data"] == '{"n":1}'

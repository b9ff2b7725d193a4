"""The client's event building: the CloudEvent Meterstream accepts, validated before it is queued."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
from meterstream_client._events import as_usage_dict, build_event, encode_event, format_time
from openai.types.completion_usage import CompletionUsage
from pydantic import ValidationError

from ingest.parsing import BATCH, IngestPolicy, parse_request

NOW = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)


def event(**overrides: object) -> dict[str, object]:
    args: dict[str, object] = {
        "subject": "alice",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        "source": "meterstream-client/test",
        "time": NOW,
    }
    args.update(overrides)
    return build_event(**args)  # type: ignore[arg-type]


def test_event_shape() -> None:
    built = event(api="chat", service_tier="flex", batch=True, event_id="fixed")
    assert built == {
        "specversion": "1.0",
        "id": "fixed",
        "source": "meterstream-client/test",
        "type": "llm.usage",
        "subject": "alice",
        "time": "2025-06-01T12:00:00.123456Z",
        "data": {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "usage": {"prompt_tokens": 10, "completion_tokens": 5},
            "api": "chat",
            "service_tier": "flex",
            "batch": True,
        },
    }


def test_ids_are_unique_uuids() -> None:
    ids = {event()["id"] for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(str(i)) == 36 for i in ids)


def test_time_is_utc_rfc3339_and_defaults_to_now() -> None:
    assert format_time(datetime(2025, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))) == "2024-12-31T23:00:00.000000Z"
    before = datetime.now(UTC)
    built = datetime.fromisoformat(str(event(time=None)["time"]))
    assert before <= built <= datetime.now(UTC)
    with pytest.raises(ValueError, match="timezone-aware"):
        event(time=datetime(2025, 1, 1))


def test_usage_is_the_wire_object() -> None:
    # An SDK model dumps what the provider sent, not the SDK's defaults for fields it did not send.
    usage = CompletionUsage.model_validate(
        {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 2}}
    )
    assert as_usage_dict(usage) == {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 2},
    }

    @dataclass
    class Counts:
        input_tokens: int

    assert as_usage_dict(Counts(3)) == {"input_tokens": 3}
    with pytest.raises(TypeError):
        as_usage_dict(42)


def test_canonical_counts() -> None:
    built = event(usage=None, counts={"input_tokens": 100, "output_tokens": 7, "cache_read_tokens": 50})
    assert built["data"] == {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "input_tokens": 100,
        "output_tokens": 7,
        "cache_read_tokens": 50,
    }
    with pytest.raises(ValueError, match="unknown canonical counts"):
        event(usage=None, counts={"input_tokns": 1})
    with pytest.raises(ValueError, match="non-negative"):
        event(usage=None, counts={"input_tokens": -1})
    with pytest.raises(ValueError, match="exactly one"):
        event(counts={"input_tokens": 1})
    with pytest.raises(ValueError, match="exactly one"):
        event(usage=None)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("subject", "", ValueError),
        ("subject", "a" * 257, ValueError),
        ("subject", "line\nbreak", ValueError),
        ("subject", 42, TypeError),
        ("model", " ", ValueError),
        ("provider", "x" * 129, ValueError),
    ],
)
def test_invalid_identifiers_are_refused_at_emit_time(field: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        event(**{field: value})


def test_extra_data_cannot_override() -> None:
    assert event(extra_data={"speed": "fast"})["data"]["speed"] == "fast"  # type: ignore[index]
    with pytest.raises(ValueError, match="repeats"):
        event(extra_data={"model": "other"})


def test_encoding_is_compact_json_and_refuses_nan() -> None:
    built = event(subject="zoë")
    body = encode_event(built)
    assert json.loads(body) == built and b" " not in body and "zoë".encode() in body
    with pytest.raises(ValueError, match="JSON"):
        encode_event(event(usage={"prompt_tokens": float("nan")}))


def test_meterstream_accepts_what_the_client_builds() -> None:
    """The server's own parser (in-process) accepts a batch of client-built events and reads their usage."""
    events = [
        event(),
        event(provider="anthropic", model="claude-haiku-4-5-20251001", usage={"input_tokens": 3, "output_tokens": 2}),
        event(usage=None, counts={"input_tokens": 10, "output_tokens": 1, "reasoning_tokens": 1}),
        event(api="responses", usage={"input_tokens": 9, "output_tokens": 4}, time=datetime.now(UTC)),
    ]
    body = b"[" + b",".join(encode_event(e) for e in events) + b"]"
    policy = IngestPolicy("llm.usage", 1000, timedelta(hours=1))
    accepted = parse_request({"content-type": BATCH}, body, policy, datetime.now(UTC))
    assert [a["id"] for a in accepted] == [e["id"] for e in events]
    assert accepted[0]["usage"] == {"input_tokens": 10, "output_tokens": 5}
    assert accepted[2]["usage"] == {"input_tokens": 10, "output_tokens": 1, "output_reasoning_tokens": 1}


def test_validation_error_is_not_a_pydantic_dependency() -> None:
    # The client raises plain ValueError/TypeError: it must not need pydantic (or the server) installed.
    with pytest.raises(ValueError, match="empty") as caught:
        event(subject="")
    assert not isinstance(caught.value, ValidationError)

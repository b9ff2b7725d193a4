"""Building the ``llm.usage`` CloudEvent: validated here, before it is queued, so that a mistake surfaces in
the caller's stack trace instead of as a 400 in a background thread minutes later."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

#: The event type Meterstream's built-in meters count.
DEFAULT_EVENT_TYPE: Final = "llm.usage"

#: Canonical counts accepted instead of a provider usage object (input includes cache reads and writes,
#: output includes reasoning).
CANONICAL_COUNTS: Final = frozenset(
    {"input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens"}
)

# Meterstream rejects control characters in identifiers (they break CSV exports and logs downstream).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_MAX_SUBJECT: Final = 256
_MAX_SOURCE: Final = 1024
_MAX_PROVIDER: Final = 128
_MAX_MODEL: Final = 256


def default_source() -> str:
    """``meterstream-client/<hostname>``: stable for a host, so resends keep their deduplication key."""
    return f"meterstream-client/{socket.gethostname() or 'localhost'}"[:_MAX_SOURCE]


def check_text(name: str, value: object, max_length: int) -> str:
    """``value`` if it is an identifier Meterstream accepts, else ValueError naming ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} must not be empty")
    if len(value) > max_length:
        raise ValueError(f"{name} must be at most {max_length} characters, got {len(value)}")
    if _CONTROL.search(value):
        raise ValueError(f"{name} must not contain control characters")
    return value


def check_subject(subject: object) -> str:
    """The subject if Meterstream accepts it (1-256 printable characters), else ValueError/TypeError."""
    return check_text("subject", subject, _MAX_SUBJECT)


def format_time(time: datetime) -> str:
    """RFC 3339 in UTC with microseconds (``2025-01-31T12:00:00.123456Z``)."""
    if time.tzinfo is None or time.utcoffset() is None:
        # A naive time would be read in the server's zone, or the host's: refuse to guess.
        raise ValueError("time must be timezone-aware (e.g. datetime.now(UTC))")
    return time.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def as_usage_dict(usage: object) -> dict[str, Any]:
    """A provider usage object as the JSON object the provider sent.

    Accepts a mapping, a pydantic model (the OpenAI and Anthropic SDKs' ``response.usage``: dumped with
    ``exclude_unset`` so that it is what the wire carried, not the SDK's defaults) or a dataclass.
    """
    if isinstance(usage, Mapping):
        return {str(k): v for k, v in usage.items()}
    dump = getattr(usage, "model_dump", None)
    if callable(dump):
        dumped = dump(mode="json", by_alias=True, exclude_unset=True)
        if isinstance(dumped, dict):
            return dumped
    if dataclasses.is_dataclass(usage) and not isinstance(usage, type):
        return dataclasses.asdict(usage)
    raise TypeError(f"usage must be a mapping or a pydantic model, got {type(usage).__name__}")


def build_event(
    *,
    subject: str,
    provider: str,
    model: str,
    usage: object = None,
    counts: Mapping[str, int] | None = None,
    source: str,
    event_type: str = DEFAULT_EVENT_TYPE,
    time: datetime | None = None,
    event_id: str | None = None,
    api: str | None = None,
    service_tier: str | None = None,
    batch: bool | None = None,
    extra_data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``llm.usage`` CloudEvent (a JSON-ready dict). Exactly one of ``usage`` (the provider's usage
    object, verbatim) or ``counts`` (canonical counts) must be given."""
    check_subject(subject)
    check_text("provider", provider, _MAX_PROVIDER)
    check_text("model", model, _MAX_MODEL)
    check_text("source", source, _MAX_SOURCE)
    check_text("event_type", event_type, 256)
    if (usage is None) == (counts is None):
        raise ValueError("give exactly one of usage (the provider's usage object) or counts (canonical counts)")
    data: dict[str, Any] = {"provider": provider, "model": model}
    if usage is not None:
        data["usage"] = as_usage_dict(usage)
    else:
        assert counts is not None
        unknown = set(counts) - CANONICAL_COUNTS
        if unknown:
            # Any other genai-prices key can still be sent through extra_data; a typo here would bill zero.
            raise ValueError(f"unknown canonical counts {sorted(unknown)}: use {sorted(CANONICAL_COUNTS)}")
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
        data.update(counts)
    if api is not None:
        data["api"] = api
    if service_tier is not None:
        data["service_tier"] = service_tier
    if batch is not None:
        data["batch"] = bool(batch)
    if extra_data:
        clash = set(extra_data) & set(data)
        if clash:
            raise ValueError(f"extra_data repeats {sorted(clash)}")
        data.update(extra_data)
    return {
        "specversion": "1.0",
        "id": event_id if event_id is not None else str(uuid.uuid4()),
        "source": source,
        "type": event_type,
        "subject": subject,
        "time": format_time(time if time is not None else datetime.now(UTC)),
        "data": data,
    }


def encode_event(event: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON. Encoded once, at emit time: a retry resends exactly the same bytes, and batches
    are sized by what goes on the wire."""
    try:
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the event is not JSON-serialisable: {exc}") from None

"""The usage CloudEvent as clients send it, and the rules it must satisfy.

CloudEvents 1.0 (https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md) with OpenMeter's
additions: ``subject`` is required and ``data`` is a JSON object (or null). Events whose ``type`` is the
usage type (``llm.usage`` by default) must carry LLM usage in ``data``; see :mod:`schemas.usage`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, Strict, TypeAdapter

#: The event type the built-in meters count, unless configured otherwise.
DEFAULT_USAGE_EVENT_TYPE: Final = "llm.usage"
#: The event type of LiteLLM's built-in `openmeter` callback (its OPENMETER_EVENT_TYPE default).
DEFAULT_LITELLM_EVENT_TYPE: Final = "litellm_tokens"

#: No control characters: a newline or NUL in a subject breaks CSV exports, logs and dashboards downstream.
# (Each pattern is written once, unanchored, and anchored by the decoder that uses it: pydantic's here,
# msgspec's in ingest/fast.py.)
NO_CONTROL: Final = r"[^\x00-\x1f\x7f]+"
_PRINTABLE = rf"^{NO_CONTROL}$"
#: Over HTTP the data is JSON (as OpenMeter requires); a charset parameter is fine.
JSON_MEDIA_TYPE: Final = r"application/json\s*(;.*)?"


def _text(max_length: int) -> Any:
    return Annotated[str, Field(min_length=1, max_length=max_length, pattern=_PRINTABLE), Strict()]


class CloudEvent(BaseModel):
    """One CloudEvents 1.0 event, structured JSON form (binary mode is mapped onto it)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    specversion: Literal["1.0"]
    id: _text(256)  # type: ignore[valid-type]
    source: _text(1024)  # type: ignore[valid-type]
    type: _text(256)  # type: ignore[valid-type]
    subject: _text(256)  # type: ignore[valid-type]
    time: Annotated[AwareDatetime, Strict()] | None = None
    datacontenttype: Annotated[str, Strict(), Field(pattern=rf"(?i)^{JSON_MEDIA_TYPE}$")] | None = None
    dataschema: Annotated[str, Strict()] | None = None
    data: dict[str, Any] | None = None


CLOUD_EVENT: Final = TypeAdapter(CloudEvent)
CLOUD_EVENT_BATCH: Final = TypeAdapter(list[CloudEvent])

#: Events before this are rejected: the Unix epoch is the floor of every time column we store.
EARLIEST_EVENT_TIME: Final = datetime(1970, 1, 1, tzinfo=UTC)


def check_event_time(time: datetime, now: datetime, max_future: timedelta) -> str | None:
    """Why an event time is unacceptable, or None. Late events are not rejected here: the processor
    routes them (within the allowed lateness they count, beyond it they are dead-lettered)."""
    if time < EARLIEST_EVENT_TIME:
        return "time must not be before 1970-01-01T00:00:00Z"
    if time > now + max_future:
        return f"time must not be more than {max_future} in the future (server time {now.isoformat()})"
    return None


def to_micros(time: datetime) -> int:
    """Microseconds since the Unix epoch, exact (no float rounding)."""
    delta = time - EARLIEST_EVENT_TIME
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    return EARLIEST_EVENT_TIME + timedelta(microseconds=micros)


def has_float(value: Any) -> bool:
    """Whether parsed JSON holds a number with a fraction or an exponent (parsed as a float, it may have lost
    digits: read the text again, keeping such numbers as written, where they must stay exact)."""
    # Ingest asks this of every event's data, so: a loop rather than any() over a generator, and exact type
    # checks rather than isinstance (~3x cheaper): parsed JSON holds only the plain types, never subclasses.
    kind = type(value)
    if kind is float:
        return True
    if kind is dict:
        value = value.values()
    elif kind is not list:
        return False
    for item in value:
        kind = type(item)
        if kind is float or ((kind is dict or kind is list) and has_float(item)):
            return True
    return False

"""The usage CloudEvent as clients send it, and the rules it must satisfy.

CloudEvents 1.0 (https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md) with OpenMeter's
additions: ``subject`` is required and ``data`` is a JSON object (or null). Events whose ``type`` is the
usage type (``llm.usage`` by default) must carry LLM usage in ``data``; see :mod:`schemas.usage`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

import msgspec
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, Strict, TypeAdapter

#: The event type the built-in meters count, unless configured otherwise.
DEFAULT_USAGE_EVENT_TYPE: Final = "llm.usage"
#: The event type of LiteLLM's built-in `openmeter` callback (its OPENMETER_EVENT_TYPE default).
DEFAULT_LITELLM_EVENT_TYPE: Final = "litellm_tokens"

#: No control characters: a newline or NUL in a subject breaks CSV exports, logs and dashboards downstream.
# (Each pattern is written once, anchored by the decoder that uses it: see the msgspec events below.)
_NO_CONTROL = r"[^\x00-\x1f\x7f]+"
_PRINTABLE = rf"^{_NO_CONTROL}$"
#: Over HTTP the data is JSON (as OpenMeter requires); a charset parameter is fine.
_JSON_MEDIA_TYPE = r"application/json\s*(;.*)?"


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
    datacontenttype: Annotated[str, Strict(), Field(pattern=rf"(?i)^{_JSON_MEDIA_TYPE}$")] | None = None
    dataschema: Annotated[str, Strict()] | None = None
    data: dict[str, Any] | None = None


CLOUD_EVENT: Final = TypeAdapter(CloudEvent)
CLOUD_EVENT_BATCH: Final = TypeAdapter(list[CloudEvent])


# The same event for msgspec, a decoder ~4x faster than pydantic that also refuses what RFC 8259 does (NaN,
# Infinity, 1e309), so a body needs one parse, not two. It is ingest's fast path only: it may refuse more than
# CloudEvent does (then the request takes the exact path, which accepts it or words the 400), never accept
# more, and what it accepts it decodes to the same values (tests/unit/test_fast_parsing.py holds it to
# that). Its differences, and how each is kept on the safe side:
# * `pattern` is Python's re.search, where `$` also matches before a final newline: anchored with \A and \Z;
#   patterns cost ~3 µs an event in Python, so the unchecked decoders serve bodies in which no string can
#   hold a control character (no backslash escape, no DEL byte: JSON forbids raw control characters);
# * time fractions past microseconds are rounded by msgspec, truncated by pydantic: such a body is refused;
# * pydantic refuses data nested past its parser's depth limit (~200), msgspec's `Any` does not: data is
#   typed to a nesting depth of 8 (anything deeper takes the exact path; each level doubles the time to build
#   the type).
def _fast_text(max_length: int, *, checked: bool) -> Any:
    if checked:
        return Annotated[str, msgspec.Meta(min_length=1, max_length=max_length, pattern=rf"\A{_NO_CONTROL}\Z")]
    return Annotated[str, msgspec.Meta(min_length=1, max_length=max_length)]


_FastJson: Any = str | int | float | bool | None
for _ in range(8):
    _FastJson = str | int | float | bool | None | list[_FastJson] | dict[str, _FastJson]


def _fast_event(*, checked: bool) -> type[msgspec.Struct]:
    text = _fast_text
    return msgspec.defstruct(
        "FastCloudEvent",
        [
            ("specversion", Literal["1.0"]),
            ("id", text(256, checked=checked)),
            ("source", text(1024, checked=checked)),
            ("type", text(256, checked=checked)),
            ("subject", text(256, checked=checked)),
            ("time", Annotated[datetime, msgspec.Meta(tz=True)] | None, None),
            ("datacontenttype", Annotated[str, msgspec.Meta(pattern=rf"(?i)\A{_JSON_MEDIA_TYPE}\Z")] | None, None),
            ("dataschema", str | None, None),
            ("data", dict[str, _FastJson] | None, None),
        ],
        frozen=True,
        gc=False,  # it holds only strings, a datetime and a dict: no reference cycle can run through it
    )


_FAST_CHECKED, _FAST_UNCHECKED = _fast_event(checked=True), _fast_event(checked=False)
_FAST_DECODERS: Final = {
    (batch, checked): msgspec.json.Decoder(list[event] if batch else event)  # type: ignore[valid-type]
    for batch in (False, True)
    for checked, event in ((True, _FAST_CHECKED), (False, _FAST_UNCHECKED))
}
#: A fraction of seven digits or more (such a time is rounded by msgspec, truncated by pydantic).
_LONG_FRACTION: Final = re.compile(rb"\.\d{7}")


def _finer_than_microseconds(body: bytes) -> bool:
    # The regex has a literal first character, so it scans fast; a match is a time only after "ss" of
    # "hh:mm:ss" (a number such as {"x":12.1234567} matches too, and takes the exact path: it is rare).
    return any(body[match.start() - 3 : match.start() - 2] == b":" for match in _LONG_FRACTION.finditer(body))


def fast_events(body: bytes, *, batch: bool) -> Any:
    """The events of a structured JSON body (a list if ``batch``) decoded by the fast path, or None
    when it refuses them (invalid, or not certainly the same as ``CLOUD_EVENT``'s answer): the exact path
    then decides. Each event has CloudEvent's attributes."""
    if _finer_than_microseconds(body):
        return None
    # JSON forbids raw control characters in strings, so a string can hold one only by an escape or a
    # raw DEL byte; bodies with neither (the common case) skip the per-string pattern checks.
    decoder = _FAST_DECODERS[batch, b"\\" in body or b"\x7f" in body]
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None


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
    # A loop rather than any() over a generator: ingest asks this of every event's data.
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return False
    for item in value:  # noqa: SIM110
        # A tuple, not `dict | list`: isinstance against a union type is several times slower.
        if isinstance(item, float) or (isinstance(item, (dict, list)) and has_float(item)):
            return True
    return False

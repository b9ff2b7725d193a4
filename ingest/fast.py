"""Ingest's fast path: one msgspec decode of a request body into typed events.

Only ingest uses it (other processes never import msgspec for it); :mod:`schemas.events` holds the
exact model it must agree with.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec

from schemas.events import JSON_MEDIA_TYPE, NO_CONTROL


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
        return Annotated[str, msgspec.Meta(min_length=1, max_length=max_length, pattern=rf"\A{NO_CONTROL}\Z")]
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
            ("datacontenttype", Annotated[str, msgspec.Meta(pattern=rf"(?i)\A{JSON_MEDIA_TYPE}\Z")] | None, None),
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
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):  # (invalid UTF-8 in a string)
        return None

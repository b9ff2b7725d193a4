"""From an HTTP request to validated events, or a 4xx naming every cause.

Accepted forms (CloudEvents HTTP binding 1.0, plus OpenMeter's ``application/json``):

* ``application/cloudevents+json``: one event, structured;
* ``application/cloudevents-batch+json``: a JSON array of events (``[]`` is a no-op);
* ``application/json``: one event or a non-empty array, structured; with ``ce-*`` headers it is instead
  binary mode, where the body is the event's ``data`` (parsed by the cloudevents SDK).

A ``charset`` parameter is accepted if it names UTF-8. A request is accepted or rejected whole.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, Protocol

import orjson
from cloudevents.exceptions import GenericException as CloudEventsSdkError
from cloudevents.http import from_http
from pydantic import ValidationError

from ingest.fast import fast_events
from schemas.events import (
    CLOUD_EVENT,
    CLOUD_EVENT_BATCH,
    CloudEvent,
    check_event_time,
    has_float,
    to_micros,
)
from schemas.problems import FieldError, Problem
from schemas.records import AcceptedEvent
from schemas.usage import UsageError, canonical_provider, normalize_usage, resolve_model

STRUCTURED: Final = "application/cloudevents+json"
BATCH: Final = "application/cloudevents-batch+json"
JSON: Final = "application/json"

#: At most this many field errors are listed in one 400 (the count is always given).
MAX_LISTED_ERRORS: Final = 100

#: Event data fields that select a price variant, and the genai-prices price context key they set.
_SERVICE_TIERS_WITHOUT_VARIANT: Final = frozenset({"default", "auto", "standard"})

_MICROSECOND: Final = timedelta(microseconds=1)

_BIG_INT: Final = "numbers in data must fit in 64 bits; send larger ones as strings"


@dataclass(frozen=True, slots=True)
class IngestPolicy:
    """The rules an event must satisfy beyond the CloudEvents spec."""

    usage_event_type: str
    max_batch_events: int
    max_future: timedelta
    #: LiteLLM's `openmeter` callback's event type ("" : not read as usage).
    litellm_event_type: str = ""


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, lower-cased, after checking any charset is UTF-8."""
    if not content_type:
        raise Problem(415, f"Content-Type is required: one of {STRUCTURED}, {BATCH}, {JSON}")
    kind, *params = (part.strip() for part in content_type.split(";"))
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise Problem(415, f"charset {value.strip()!r} is not supported: send UTF-8")
    return kind.lower()


def parse_request(headers: Mapping[str, str], body: bytes, policy: IngestPolicy, now: datetime) -> list[AcceptedEvent]:
    """Validated events of one ingest request, in request order.

    Raises:
        Problem: 400 (invalid, listing each event index and field), 413 (too many events) or 415.
    """
    kind = media_type(headers.get("content-type"))
    if kind == STRUCTURED:
        return _accept_one(body, policy, now)
    if kind == BATCH:
        return _accept_batch(body, policy, now, allow_empty=True)
    if any(key.lower() == "ce-specversion" for key in headers):
        return _accept([_from_binary(headers, body)], policy, now, batch=False, exact=_ExactData(body, "data"))
    if kind == JSON:
        if body.lstrip().startswith(b"["):
            return _accept_batch(body, policy, now, allow_empty=False)
        return _accept_one(body, policy, now)
    raise Problem(415, f"unsupported Content-Type {kind!r}: send {STRUCTURED}, {BATCH} or {JSON}")


# Each request is tried on the fast path first (one msgspec decode, see ingest/fast.py), and
# only a request it refuses, or whose events fail a check, takes the exact path: that path alone decides
# what is refused and words every error, so the fast path changes no answer, only the cost of a valid one.
def _accept_one(body: bytes, policy: IngestPolicy, now: datetime) -> list[AcceptedEvent]:
    event = fast_events(body, batch=False)
    if event is not None:
        try:
            return _accept([event], policy, now, batch=False, exact=_ExactData(body, "event"))
        except Problem:
            pass
    return _accept([_validate_one(body)], policy, now, batch=False, exact=_ExactData(body, "event"))


def _validate_one(body: bytes) -> CloudEvent:
    # orjson first: it holds to RFC 8259 (no NaN or Infinity literals), which pydantic's parser does not.
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}") from None
    try:
        return CLOUD_EVENT.validate_json(body)
    except ValidationError as exc:
        raise _problem(_field_errors(exc, batch=False)) from None


def _accept_batch(body: bytes, policy: IngestPolicy, now: datetime, *, allow_empty: bool) -> list[AcceptedEvent]:
    events = fast_events(body, batch=True)
    if events and len(events) <= policy.max_batch_events:
        try:
            return _accept(events, policy, now, batch=True, exact=_ExactData(body, "batch"))
        except Problem:
            pass
    return _accept_batch_exactly(body, policy, now, allow_empty=allow_empty)


def _accept_batch_exactly(
    body: bytes, policy: IngestPolicy, now: datetime, *, allow_empty: bool
) -> list[AcceptedEvent]:
    # Count before validating: a 100,000-event batch is refused without building 100,000 models.
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(raw, list):
        raise Problem(400, "a batch must be a JSON array of events")
    if len(raw) > policy.max_batch_events:
        raise Problem(
            413,
            f"the batch holds {len(raw)} events; at most {policy.max_batch_events} are accepted per request",
        )
    if not raw and not allow_empty:
        raise Problem(400, "the request holds no events")
    try:
        # JSON mode (not python mode on `raw`): times must be RFC 3339 strings, counts real JSON integers.
        events = CLOUD_EVENT_BATCH.validate_json(body)
    except ValidationError as exc:
        # The slow path, only for a rejected request: report every invalid event, not just the first kind.
        errors = _field_errors(exc, batch=True)
        bad = {e.index for e in errors}
        for index, item in enumerate(raw):
            if index in bad:
                continue
            try:
                _accept([CLOUD_EVENT.validate_json(orjson.dumps(item))], policy, now, batch=True, offset=index)
            except Problem as problem:
                errors.extend(problem.errors)
        raise _problem(sorted(errors, key=lambda e: e.index or 0)) from None
    return _accept(events, policy, now, batch=True, exact=_ExactData(body, "batch"))


class _ExactData:
    """The ``data`` of a request's events with every number as it was written. The validated events hold
    numbers with a fraction or an exponent as floats, which would store ``1234567890.123456789`` as
    ``1234567890.1234567``; the audit log keeps ``data`` as sent (user meters read their values from it), so
    such an event's data is read again from the body, its numbers kept as their own text. Parsed only for a
    request with such a number, once."""

    def __init__(self, body: bytes, shape: Literal["event", "batch", "data"]) -> None:
        self._body, self._shape = body, shape
        self._parsed: Any = None

    def of(self, index: int) -> Any:
        if self._parsed is None:
            # (orjson has already refused what JSON does not allow, NaN and Infinity among them.)
            self._parsed = json.loads(self._body, parse_float=orjson.Fragment)
        if self._shape == "batch":
            return self._parsed[index]["data"]
        return self._parsed["data"] if self._shape == "event" else self._parsed


def _from_binary(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """Binary mode: attributes in ``ce-*`` headers, ``data`` in the body (JSON)."""
    try:
        sdk_event = from_http(dict(headers), body)
    except (CloudEventsSdkError, ValueError) as exc:
        raise Problem(400, f"invalid binary-mode CloudEvent: {exc}") from None
    attributes: dict[str, Any] = dict(sdk_event.get_attributes())
    data = sdk_event.get_data()
    if isinstance(data, (bytes, str)) and data:
        raise Problem(400, "data must be a JSON object", [FieldError("data", "must be a JSON object")])
    attributes["data"] = data if data != "" else None
    try:
        return CLOUD_EVENT.validate_json(orjson.dumps(attributes))
    except ValidationError as exc:
        raise _problem(_field_errors(exc, batch=False)) from None
    except TypeError:  # as in _accept: the only value the SDK's JSON parsing gives that orjson cannot write
        raise _problem([FieldError("data", _BIG_INT)]) from None


def _field_errors(exc: ValidationError, *, batch: bool) -> list[FieldError]:
    errors: list[FieldError] = []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        index = int(loc.pop(0)) if batch and loc and isinstance(loc[0], int) else None
        field = ".".join(str(part) for part in loc) or "body"
        message = error["msg"]
        if error["type"] == "string_pattern_mismatch":
            message = (
                "must be application/json: an event's data is JSON over HTTP"
                if field == "datacontenttype"
                else "must not contain control characters"
            )
        elif error["type"] == "json_invalid":
            message = f"the body is not valid JSON: {error.get('ctx', {}).get('error', message)}"
        errors.append(FieldError(field, message, index))
    return errors


def _problem(errors: list[FieldError]) -> Problem:
    listed = errors[:MAX_LISTED_ERRORS]
    more = f" (and {len(errors) - len(listed)} more)" if len(errors) > len(listed) else ""
    detail = "; ".join(str(e) for e in listed) + more
    return Problem(400, f"invalid request: {detail}", listed)


class _Event(Protocol):
    """An event as `_accept` reads it: a CloudEvent, or the fast path's equivalent."""

    @property
    def id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def subject(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def time(self) -> datetime | None: ...
    @property
    def data(self) -> dict[str, Any] | None: ...


def _accept(
    events: Sequence[_Event],
    policy: IngestPolicy,
    now: datetime,
    *,
    batch: bool,
    offset: int = 0,
    exact: _ExactData | None = None,
) -> list[AcceptedEvent]:
    received_us = to_micros(now)
    # The time checks in integer microseconds (exact: datetimes hold microseconds); the message from
    # check_event_time, only for an event that fails them.
    latest_us = received_us + policy.max_future // _MICROSECOND
    accepted: list[AcceptedEvent] = []
    errors: list[FieldError] = []
    for index, event in enumerate(events, start=offset):
        where = index if batch else None
        time_us = to_micros(event.time) if event.time is not None else received_us
        if not 0 <= time_us <= latest_us:
            why = check_event_time(event.time or now, now, policy.max_future)
            errors.append(FieldError("time", why or "time is out of range", where))
            continue
        try:
            # Text, not a tree: the processor passes it through to the audit log without parsing it.
            value = event.data
            if exact is not None and has_float(value):
                value = exact.of(index - offset)
            data = orjson.dumps(value).decode()
        except TypeError:  # the only value JSON parsing gives that orjson cannot write: an int past 64 bits
            errors.append(FieldError("data", _BIG_INT, where))
            continue
        record: AcceptedEvent = {
            "id": event.id,
            "source": event.source,
            "subject": event.subject,
            "type": event.type,
            "time_us": time_us,
            "received_us": received_us,
            "data": data,
        }
        try:
            if event.type == policy.usage_event_type:
                _add_usage(record, event.data)
            elif policy.litellm_event_type and event.type == policy.litellm_event_type:
                _add_litellm_usage(record, event.data)
        except UsageError as exc:
            errors.append(FieldError(exc.field, exc.message, where))
            continue
        accepted.append(record)
    if errors:
        raise _problem(errors)
    return accepted


def _add_usage(record: AcceptedEvent, data: dict[str, Any] | None) -> None:
    if data is None:
        raise UsageError("data", f"events of type {record['type']!r} must carry usage in data")
    provider, model = data.get("provider"), data.get("model")
    if not isinstance(provider, str) or not provider.strip() or len(provider) > 128:
        raise UsageError("data.provider", "data.provider must be a non-empty string (at most 128 characters)")
    if not isinstance(model, str) or not model.strip() or len(model) > 256:
        raise UsageError("data.model", "data.model must be a non-empty string (at most 256 characters)")
    usage = normalize_usage(data)
    record["provider"] = canonical_provider(provider)
    record["model"] = model.strip()
    record["usage"] = dict(usage.counts)
    context = _price_context(data)
    if context:
        record["price_context"] = context


def _add_litellm_usage(record: AcceptedEvent, data: dict[str, Any] | None) -> None:
    """An event of LiteLLM's `openmeter` callback: ``{model, cost, prompt_tokens, completion_tokens,
    total_tokens}`` (litellm/integrations/openmeter.py). Prompt tokens include cached ones and completion
    tokens reasoning ones, as in Meterstream's canonical counts; the provider comes from the model; the
    event is priced by Meterstream like any other, LiteLLM's own ``cost`` stays in the data (and in the
    ``litellm_cost_usd`` meter)."""
    if not isinstance(data, dict):
        raise UsageError("data", f"events of type {record['type']!r} carry LiteLLM's usage object in data")
    model = data.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > 256:
        raise UsageError("data.model", "data.model must be a non-empty string (at most 256 characters)")
    counts = {}
    for field, key in (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens")):
        value = data.get(field)
        if value is None:
            value = 0  # LiteLLM sends no usage for responses without any (image generation, ...)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
            raise UsageError(f"data.{field}", f"data.{field} must be a non-negative integer")
        counts[key] = value
    cost = data.get("cost")
    if cost is not None and (not isinstance(cost, int | float) or isinstance(cost, bool) or cost < 0):
        raise UsageError("data.cost", "data.cost must be a non-negative number or null")
    provider, name = resolve_model(model.strip())
    record["provider"] = provider
    record["model"] = name
    record["usage"] = counts


def _price_context(data: Mapping[str, Any]) -> dict[str, str]:
    """genai-prices price context from the event: ``service_tier`` (flex, priority, ...; Anthropic reports
    it inside its usage object, where ``batch`` means the Batch API), ``batch`` (true for batch API calls)
    and ``speed`` (Anthropic's fast mode)."""
    context: dict[str, str] = {}
    usage = data.get("usage")
    if (
        "service_tier" not in data
        and "batch" not in data
        and "speed" not in data
        and (usage is None or not isinstance(usage, Mapping))  # (None first: an ABC's isinstance is slow)
    ):
        return context  # the common case: a standard call
    tier = data.get("service_tier")
    field = "data.service_tier"
    if tier is None and isinstance(usage, Mapping) and isinstance(usage.get("service_tier"), str):
        tier, field = usage["service_tier"], "data.usage.service_tier"
    if tier is not None:
        if not isinstance(tier, str) or not tier:
            raise UsageError(field, f"{field} must be a non-empty string")
        tier = tier.lower()
        if tier == "batch":
            context["processing"] = "batch"
        elif tier not in _SERVICE_TIERS_WITHOUT_VARIANT:
            context["service_tier"] = tier
    batch = data.get("batch")
    if batch is not None:
        if not isinstance(batch, bool):
            raise UsageError("data.batch", "data.batch must be true or false")
        if batch:
            context["processing"] = "batch"
    speed = data.get("speed")
    if speed is not None:
        if not isinstance(speed, str) or not speed:
            raise UsageError("data.speed", "data.speed must be a non-empty string")
        if speed.lower() != "standard":
            context["speed"] = speed.lower()
    return context

"""Reservations without I/O: request bodies, answers parsed into typed values, errors, retry decisions.

A reservation holds part of a subject's remaining budget before an LLM call (``reserve``), sized by an
estimate Meterstream computes from the request; after the call the hold is replaced by what the call used
(``commit``) or freed (``release``). Every request here is idempotent: a reserve carries an id (made here
when the caller gives none), a commit records one event whose id is the reservation's, a repeated release
is a no-op. So all of them are retried on network errors and 5xx answers, with the same bytes.

The sync and async clients only add the HTTP calls and the waiting.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final, Literal
from urllib.parse import quote

import httpx

from meterstream_client._delivery import parse_retry_after
from meterstream_client._events import CANONICAL_COUNTS, as_usage_dict, check_subject, check_text

ReservationStatus = Literal["held", "committed", "released", "expired"]

#: Reservation ids Meterstream accepts.
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

#: The keywords of an SDK call that bound its usage: what ``request=`` carries for an instrumented call.
PROMPT_KEYS: Final = (
    "messages",
    "input",
    "system",
    "instructions",
    "tools",
    "tool_choice",
    "response_format",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
)

#: Inline media (a base64 string, or a ``data:...;base64,`` URL) at least this long is replaced by a
#: placeholder: Meterstream bounds an image by a fixed maximum, whatever its bytes, and a request of a few
#: MB should not be shipped twice (once to Meterstream, once to the provider).
MEDIA_MIN_CHARS: Final = 1024

#: Keys under which a provider request carries raw base64 (Anthropic ``source.data``, OpenAI
#: ``input_audio.data``, ``file.file_data``).
_MEDIA_KEYS: Final = frozenset({"data", "file_data"})

_BASE64: Final = re.compile(r"[A-Za-z0-9+/=_\-\r\n]+")

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def media_placeholder(chars: int) -> str:
    """What replaces ``chars`` characters of inline base64 media."""
    return f"<meterstream: {chars} base64 characters omitted>"


# -- values ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Estimate:
    """Meterstream's bound on a call: input tokens, output tokens (the most the call may produce), and its
    cost when the model has a known price. ``covers`` / ``notes`` say what the bound accounts for."""

    input_tokens: int
    output_tokens: int
    cost_usd: Decimal | None
    covers: str | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReservedFeature:
    """What a reservation holds (or would have held) on one of the subject's metered entitlements."""

    feature_key: str
    entitlement_id: str | None
    #: The amount held (tokens, or USD for a cost feature), exact.
    amount: Decimal
    #: Allowed: what is left after this hold. Denied: what is left now (before it). None when not given
    #: (``get_reservation``).
    balance: Decimal | None
    is_soft_limit: bool
    over_limit: bool = False
    #: Committed: what the call used on this feature (None if it could not be priced or not committed yet).
    actual: Decimal | None = None
    #: Denied only: False for the features the hold does not fit in.
    fits: bool | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold on a subject's budget (see the module docstring)."""

    id: str
    subject: str
    status: ReservationStatus
    #: True: the hold was granted (a denied reserve raises LimitExceededError instead).
    allowed: bool
    provider: str | None
    model: str | None
    created_at: datetime
    expires_at: datetime
    features: tuple[ReservedFeature, ...]
    #: The bound the hold was sized by (None when it was given as ``amounts``).
    estimate: Estimate | None = None
    committed_at: datetime | None = None
    released_at: datetime | None = None


class MeterstreamAPIError(httpx.HTTPStatusError):
    """Meterstream answered a reservation or estimate request with an error (an RFC 7807 problem).

    An ``httpx.HTTPStatusError`` (as ``query_usage`` raises), with the problem's fields: ``status``,
    ``title``, ``detail`` (also in the message), ``invalid_parameters`` (``(field, reason)`` pairs of a
    400) and the whole ``problem`` body.
    """

    def __init__(self, response: httpx.Response, problem: Mapping[str, Any] | None = None) -> None:
        problem = dict(problem) if problem is not None else _problem(response)
        self.problem: dict[str, Any] = problem
        self.status: int = response.status_code
        title = problem.get("title")
        self.title: str = title if isinstance(title, str) else response.reason_phrase
        detail = problem.get("detail")
        self.detail: str = detail if isinstance(detail, str) else response.text[:500].strip()
        self.invalid_parameters: tuple[tuple[str, str], ...] = _invalid_parameters(problem)
        message = f"Meterstream answered {self.status} {self.title}"
        if self.detail:
            message += f": {self.detail}"
        named = [f for f, _ in self.invalid_parameters if f not in self.detail]
        if named:
            message += " (" + "; ".join(f"{f}: {r}" for f, r in self.invalid_parameters if f in named) + ")"
        super().__init__(
            f"{message} [{response.request.method} {response.request.url.path}]",
            request=response.request,
            response=response,
        )


class LimitExceededError(MeterstreamAPIError):
    """A reserve was denied (HTTP 429): the call would take the subject past a hard limit.

    Attributes:
        subject: whose budget it is.
        reservation_id: the id the reserve was made with (reserving again with it gives the same answer).
        features: every feature the reservation touches, ``balance`` = what is left now, ``fits`` = False
            for those the hold does not fit in.
        retry_after: seconds until room may free up (a period reset, an expiring hold), or None if nothing
            will free any by itself.
        fit: the largest output-token budget (``max_tokens``) that would fit with the same input, or None
            when none does.
    """

    def __init__(self, response: httpx.Response, subject: str, reservation_id: str) -> None:
        super().__init__(response)
        self.subject = subject
        self.reservation_id = reservation_id
        features = self.problem.get("features")
        self.features: tuple[ReservedFeature, ...] = tuple(
            parse_feature(f) for f in (features if isinstance(features, list) else []) if isinstance(f, Mapping)
        )
        self.retry_after: float | None = parse_retry_after(response.headers.get("retry-after"))
        fit = self.problem.get("fit")
        tokens = _opt_int(fit.get("maxOutputTokens")) if isinstance(fit, Mapping) else None
        self.fit: int | None = tokens if tokens is not None and tokens > 0 else None

    @property
    def allowed(self) -> bool:
        return False


# -- request bodies -----------------------------------------------------------------------------------


def new_reservation_id() -> str:
    """A ULID: 48 bits of milliseconds and 80 random bits, 26 Crockford base32 characters (sortable)."""
    value = (int(time.time() * 1000) & (2**48 - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def check_reservation_id(reservation_id: object) -> str:
    if not isinstance(reservation_id, str):
        raise TypeError(f"reservation_id must be a string, got {type(reservation_id).__name__}")
    if not _ID.fullmatch(reservation_id):
        raise ValueError("reservation_id must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'")
    return reservation_id


def reserve_body(
    *,
    reservation_id: str,
    provider: str | None,
    model: str | None,
    estimate: Mapping[str, int] | None,
    request: Mapping[str, Any] | None,
    amounts: Mapping[str, Decimal | int | float | str] | None,
    ttl_seconds: int | None,
) -> dict[str, Any]:
    """The body of ``POST /api/v1/subjects/{subject}/reservations``."""
    given = [
        name
        for name, value in (("estimate", estimate), ("request", request), ("amounts", amounts))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(f"give exactly one of estimate, request or amounts (got {', '.join(given) or 'none'})")
    body: dict[str, Any] = {"id": check_reservation_id(reservation_id)}
    if provider is not None:
        body["provider"] = check_text("provider", provider, 128)
    if model is not None:
        body["model"] = check_text("model", model, 256)
    if amounts is None and (provider is None or model is None):
        raise ValueError(f"provider and model are required with {given[0]}")
    if estimate is not None:
        body["estimate"] = counts(estimate, "estimate")
    elif request is not None:
        body["request"] = request_json(request)
    else:
        assert amounts is not None
        if not amounts:
            raise ValueError("amounts must name at least one feature")
        body["amounts"] = {check_text("feature key", key, 256): decimal_text(key, v) for key, v in amounts.items()}
    if ttl_seconds is not None:
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 1 <= ttl_seconds <= 3600:
            raise ValueError(f"ttl_seconds must be an integer from 1 to 3600, got {ttl_seconds!r}")
        body["ttlSeconds"] = ttl_seconds
    return body


def commit_body(usage: Mapping[str, Any], *, provider: str | None = None, model: str | None = None) -> dict[str, Any]:
    """The body of ``POST /api/v1/reservations/{id}/commit``: ``{"usage": <what ingest's data accepts>}``.

    ``usage`` is canonical counts (``{"input_tokens": 812, "output_tokens": 230}``) or the provider's
    usage object under ``"usage"`` (a dict or the SDK's pydantic model), optionally with ``provider`` /
    ``model`` (and the other ``data`` fields an event may carry: ``api``, ``service_tier``, ...).
    """
    if not isinstance(usage, Mapping):
        raise TypeError(f"usage must be a mapping, got {type(usage).__name__}")
    data: dict[str, Any] = {str(k): v for k, v in usage.items()}
    if "usage" in data:
        data["usage"] = as_usage_dict(data["usage"])
    else:
        present = {k: v for k, v in data.items() if k in CANONICAL_COUNTS}
        if not present:
            raise ValueError(
                f"usage must hold canonical counts ({', '.join(sorted(CANONICAL_COUNTS))}) or the provider's "
                "usage object under 'usage'"
            )
        counts(present, "usage")
    for name, value in (("provider", provider), ("model", model)):
        if value is not None:
            if data.get(name, value) != value:
                raise ValueError(f"{name} given twice: {data[name]!r} in usage and {value!r}")
            data[name] = value
    for name, limit in (("provider", 128), ("model", 256)):
        if name in data:
            check_text(name, data[name], limit)
    return {"usage": jsonable(data)}


def counts(values: Mapping[str, int], what: str) -> dict[str, int]:
    unknown = set(values) - CANONICAL_COUNTS
    if unknown:
        raise ValueError(f"unknown {what} counts {sorted(unknown)}: use {sorted(CANONICAL_COUNTS)}")
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{what} {key} must be a non-negative integer, got {value!r}")
    return dict(values)


def decimal_text(key: str, value: object) -> str:
    """An amount as exact decimal text (a float goes through its shortest repr, so 0.1 is "0.1")."""
    if isinstance(value, bool):
        raise ValueError(f"amounts[{key}] must be a number, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"amounts[{key}] must be finite, got {value!r}")
        value = repr(value)
    try:
        number = Decimal(value) if isinstance(value, (int, str, Decimal)) else None
    except InvalidOperation:
        number = None
    if number is None or not number.is_finite() or number <= 0:
        raise ValueError(f"amounts[{key}] must be a positive number, got {value!r}")
    return str(number)


def prompt_request(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an SDK call's keywords that bounds its usage (``PROMPT_KEYS``), JSON-ready and with
    large inline media replaced by a placeholder (``request=`` of an instrumented call's reserve)."""
    return request_json({key: kwargs[key] for key in PROMPT_KEYS if key in kwargs and not _not_given(kwargs[key])})


def request_json(request: Mapping[str, Any]) -> dict[str, Any]:
    """A request body as JSON values, with large inline media replaced by a placeholder."""
    if not isinstance(request, Mapping):
        raise TypeError(f"request must be a mapping, got {type(request).__name__}")
    out = strip_media(jsonable(request))
    assert isinstance(out, dict)
    return out


def strip_media(value: Any, key: str | None = None) -> Any:
    """``value`` (JSON values) with every inline base64 payload of ``MEDIA_MIN_CHARS`` or more replaced by
    a short placeholder: ``data:<type>;base64,...`` URLs anywhere (OpenAI ``image_url.url``, Responses
    ``input_image.image_url`` and ``input_file.file_data``) keep their ``data:<type>;base64,`` prefix; bare
    base64 under a ``data`` / ``file_data`` key (Anthropic ``source.data``, OpenAI ``input_audio.data``)
    becomes the placeholder. Text, however long, is kept: it is what the input tokens are counted from."""
    if isinstance(value, dict):
        return {k: strip_media(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_media(v, key) for v in value]
    if isinstance(value, str) and len(value) >= MEDIA_MIN_CHARS:
        if value[:5].lower() == "data:":
            head, comma, payload = value.partition(",")
            if comma and head.lower().endswith(";base64"):
                return f"{head},{media_placeholder(len(payload))}"
        elif key in _MEDIA_KEYS and _BASE64.fullmatch(value):
            return media_placeholder(len(value))
    return value


def jsonable(value: Any) -> Any:
    """SDK call arguments as JSON values: mappings, sequences, pydantic models (dumped as sent), pydantic
    model classes (a ``response_format`` for ``parse``: their JSON schema), bytes (a placeholder); the
    SDKs' NOT_GIVEN / omit markers are dropped."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items() if not _not_given(v)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return media_placeholder(len(value) * 4 // 3)
    if isinstance(value, type):
        schema = getattr(value, "model_json_schema", None)
        if callable(schema):
            return {"type": "json_schema", "json_schema": {"name": value.__name__, "schema": jsonable(schema())}}
        return value.__name__
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return jsonable(dump(mode="json", by_alias=True, exclude_unset=True))
    if isinstance(value, (Sequence, set, frozenset)):
        return [jsonable(v) for v in value]
    # Anything else (an iterator must not be consumed here: the SDK still has to read it).
    return str(value)


def _not_given(value: object) -> bool:
    # openai.NOT_GIVEN / anthropic.NOT_GIVEN (NotGiven) and the newer omit markers (Omit).
    return type(value).__name__ in ("NotGiven", "Omit")


# -- answers ----------------------------------------------------------------------------------------------


def parse_reservation(body: bytes | str) -> Reservation:
    """A reservation answer (reserve, commit, release, get), amounts as Decimal, times aware."""
    doc = _json(body)
    features = doc.get("features")
    estimate = doc.get("estimate")
    try:
        return Reservation(
            id=str(doc["id"]),
            subject=str(doc["subject"]),
            status=doc["status"],
            allowed=bool(doc.get("allowed", True)),
            provider=_opt_str(doc.get("provider")),
            model=_opt_str(doc.get("model")),
            created_at=parse_time(doc["createdAt"]),
            expires_at=parse_time(doc["expiresAt"]),
            features=tuple(parse_feature(f) for f in features if isinstance(f, Mapping))
            if isinstance(features, list)
            else (),
            estimate=parse_estimate_doc(estimate) if isinstance(estimate, Mapping) else None,
            committed_at=parse_time(doc["committedAt"]) if doc.get("committedAt") else None,
            released_at=parse_time(doc["releasedAt"]) if doc.get("releasedAt") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a reservation: {exc!r} in {str(body)[:300]}") from None


def parse_estimate(body: bytes | str) -> Estimate:
    try:
        return parse_estimate_doc(_json(body))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an estimate: {exc!r} in {str(body)[:300]}") from None


def parse_estimate_doc(doc: Mapping[str, Any]) -> Estimate:
    notes = doc.get("notes")
    cost = doc.get("costUsd")
    return Estimate(
        input_tokens=_int(doc["inputTokens"]),
        output_tokens=_int(doc["outputTokens"]),
        cost_usd=Decimal(str(cost)) if cost is not None else None,
        covers=_opt_str(doc.get("covers")),
        notes=tuple(str(n) for n in notes) if isinstance(notes, list) else (),
    )


def parse_feature(doc: Mapping[str, Any]) -> ReservedFeature:
    fits = doc.get("fits")
    return ReservedFeature(
        feature_key=str(doc.get("featureKey", "")),
        entitlement_id=_opt_str(doc.get("entitlementId")),
        amount=_decimal(doc.get("amount")) or Decimal(0),
        balance=_decimal(doc.get("balance")),
        is_soft_limit=bool(doc.get("isSoftLimit", False)),
        over_limit=bool(doc.get("overLimit", False)),
        actual=_decimal(doc.get("actual")),
        fits=bool(fits) if isinstance(fits, bool) else None,
    )


def parse_time(text: object) -> datetime:
    if not isinstance(text, str):
        raise TypeError(f"a time must be a string, got {text!r}")
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _json(body: bytes | str) -> dict[str, Any]:
    parsed = json.loads(body, parse_float=Decimal)
    if not isinstance(parsed, dict):
        raise ValueError(f"expected a JSON object, got {str(body)[:200]}")
    return parsed


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        return _json(response.content)
    except (ValueError, UnicodeDecodeError):
        return {}


def _invalid_parameters(problem: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    # The spec's invalidParameters [{field, reason}], and the ingest API's errors [{field, message}].
    for name, why in (("invalidParameters", "reason"), ("errors", "message")):
        items = problem.get(name)
        for item in items if isinstance(items, list) else []:
            if isinstance(item, Mapping) and "field" in item:
                out.append((str(item["field"]), str(item.get(why, item.get("reason", item.get("message", ""))))))
    return tuple(out)


def _decimal(value: object) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def _opt_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return int(value)
    return None


def _int(value: object) -> int:
    number = _opt_int(value)
    if number is None:
        raise ValueError(f"expected an integer, got {value!r}")
    return number


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


# -- retries -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One reservation-API request: what to send, and how to read the answer."""

    method: str
    path: str
    body: bytes | None
    #: Reserve: a 429 is the answer (a denial), not a reason to retry.
    reserve: bool = False

    def retryable(self, status: int) -> bool:
        """Statuses worth the same request again (every request here is idempotent)."""
        return status >= 500 or status == 408 or (status == 429 and not self.reserve)


def encode(body: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the request is not JSON-serialisable: {exc}") from None


def check_ok(response: httpx.Response, *, subject: str | None = None, reservation_id: str | None = None) -> bytes:
    """The body of a 2xx answer; else LimitExceededError (a reserve's 429) or MeterstreamAPIError."""
    if 200 <= response.status_code < 300:
        return response.content
    if response.status_code == 429 and subject is not None and reservation_id is not None:
        raise LimitExceededError(response, subject, reservation_id)
    raise MeterstreamAPIError(response)


def reserve_call(subject: str, body: Mapping[str, Any]) -> ApiCall:
    check_subject(subject)
    return ApiCall("POST", f"/api/v1/subjects/{quote(subject, safe='')}/reservations", encode(body), reserve=True)


def reservation_call(reservation_id: str, action: str | None = None, body: Mapping[str, Any] | None = None) -> ApiCall:
    """``GET /api/v1/reservations/{id}``, or ``POST .../{id}/{action}`` (commit, release)."""
    path = f"/api/v1/reservations/{quote(check_reservation_id(reservation_id), safe='')}"
    if action is None:
        return ApiCall("GET", path, None)
    return ApiCall("POST", f"{path}/{action}", encode(body) if body is not None else None)


def estimate_call(provider: str, model: str, request: Mapping[str, Any]) -> ApiCall:
    body = {
        "provider": check_text("provider", provider, 128),
        "model": check_text("model", model, 256),
        "request": request_json(request),
    }
    return ApiCall("POST", "/api/v1/estimate", encode(body))

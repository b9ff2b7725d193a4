"""Meters: the built-in LLM meters (what each one sums, and its OpenMeter-shaped description) and the
meters users define (OpenMeter's model: an event type, an aggregation, JSONPaths into the event's data)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal

from schemas.money import from_atto
from schemas.problems import bad
from schemas.times import parse_time

#: Dimensions a query may group by or filter on.
GROUP_BY_KEYS: Final = ("subject", "provider", "model")

#: The counts summed per window, in the order they are stored (the cost, in USD, comes beside them).
WINDOW_COUNTS: Final = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
    "unpriced_requests",
)


@dataclass(frozen=True, slots=True)
class WindowChange:
    """What one stored write added to one subject's 1-minute window (negative where it took usage back
    out): the counts in ``WINDOW_COUNTS`` order and the cost in atto-dollars. Told by the sink to the
    readers in its process that keep usage they read, so they can bring it forward instead of reading it
    again."""

    subject: str
    provider: str
    model: str
    minute: datetime
    counts: Sequence[int]
    cost_atto: int

    def value(self, column: str) -> Decimal:
        """The change of a built-in meter's column (``cost_usd`` in USD, exact)."""
        if column == "cost_usd":
            return from_atto(self.cost_atto)
        return Decimal(self.counts[WINDOW_COUNTS.index(column)])


_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CREATED: Final = datetime(2026, 1, 1, tzinfo=UTC)


def stable_ulid(slug: str) -> str:
    """A ULID that is the same on every installation, so meter ids can be stored by clients."""
    millis = int(_CREATED.timestamp() * 1000)
    value = (millis << 80) | int.from_bytes(hashlib.sha256(slug.encode()).digest()[:10], "big")
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


@dataclass(frozen=True, slots=True)
class Meter:
    slug: str
    #: The window-aggregate column this meter sums.
    column: str
    aggregation: Literal["SUM", "COUNT"]
    description: str
    value_property: str | None
    #: Values are money (exact decimals), not counts.
    is_money: bool = False

    @property
    def id(self) -> str:
        return stable_ulid(self.slug)

    @property
    def group_keys(self) -> tuple[str, ...]:
        """The dimensions a query of this meter may group by or filter on."""
        return GROUP_BY_KEYS

    def to_api(self, event_type: str) -> dict[str, Any]:
        """The meter as OpenMeter's v1 API shows it (``Meter`` in the spec)."""
        created = _rfc3339(_CREATED)
        body: dict[str, Any] = {
            "id": self.id,
            "slug": self.slug,
            "name": self.slug,
            "description": self.description,
            "aggregation": self.aggregation,
            "eventType": event_type,
            "groupBy": {"provider": "$.provider", "model": "$.model"},
            "windowSize": "MINUTE",
            "createdAt": created,
            "updatedAt": created,
        }
        if self.value_property is not None:
            body["valueProperty"] = self.value_property
        return body


METERS: Final[tuple[Meter, ...]] = (
    Meter("requests", "requests", "COUNT", "LLM calls counted", None),
    Meter(
        "input_tokens",
        "input_tokens",
        "SUM",
        "Input tokens, including cache reads and cache writes",
        "$.input_tokens",
    ),
    Meter("output_tokens", "output_tokens", "SUM", "Output tokens, including reasoning", "$.output_tokens"),
    Meter("cache_read_tokens", "cache_read_tokens", "SUM", "Input tokens read from cache", "$.cache_read_tokens"),
    Meter(
        "cache_write_tokens",
        "cache_write_tokens",
        "SUM",
        "Input tokens written to cache",
        "$.cache_write_tokens",
    ),
    Meter(
        "reasoning_tokens",
        "reasoning_tokens",
        "SUM",
        "Reasoning tokens (inside output)",
        "$.reasoning_tokens",
    ),
    Meter("tokens_total", "total_tokens", "SUM", "Input plus output tokens", "$.total_tokens"),
    Meter(
        "cost_usd",
        "cost_usd",
        "SUM",
        "Cost in USD, priced at the time of each call (genai-prices or a price override); "
        "unpriced calls add nothing here and count in unpriced_requests",
        None,
        is_money=True,
    ),
    Meter("unpriced_requests", "unpriced_requests", "SUM", "LLM calls whose model has no known price", None),
)

_BY_KEY: Final = {m.slug: m for m in METERS} | {m.id: m for m in METERS}


def find_meter(id_or_slug: str) -> Meter | None:
    """The built-in meter with this slug or id."""
    return _BY_KEY.get(id_or_slug)


#: OpenMeter's aggregations (MeterAggregation).
AGGREGATIONS: Final = ("SUM", "COUNT", "UNIQUE_COUNT", "AVG", "MIN", "MAX", "LATEST")
_SLUG: Final = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
_GROUP_KEY: Final = re.compile(r"^[A-Za-z0-9_]{1,64}$")
#: The JSONPath subset a meter may use: ``$.a.b``, ``$.a[0]``, ``$['a b']`` (what ClickHouse's JSON_VALUE
#: and OpenMeter's own examples take; no filters, wildcards or recursion).
_JSONPATH: Final = re.compile(r"^\$(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d{1,6}\]|\['[^'\\]{1,128}'\])+$")


@dataclass(frozen=True, slots=True)
class UserMeter:
    """A meter a user defined (in the meters file or through the API). The sink aggregates it from the
    deduplicated audit log into 1-minute states, from the first event of its type on (so it covers events
    stored before it was made); until those states are caught up it is answered from the audit log."""

    id: str
    slug: str
    name: str
    event_type: str
    aggregation: str
    value_property: str | None
    group_by: Mapping[str, str]
    created_at: datetime
    updated_at: datetime
    description: str | None = None
    event_from: datetime | None = None
    metadata: Mapping[str, str] | None = None
    #: "config" (the meters file: changed there, not through the API), "api", or "builtin" (LiteLLM's cost).
    origin: str = "api"
    deleted_at: datetime | None = field(default=None, compare=False)

    @property
    def group_keys(self) -> tuple[str, ...]:
        return ("subject", *self.group_by)

    @property
    def state_id(self) -> str:
        """The key of this meter's pre-aggregated states: it changes with anything that changes what they
        hold (an edit of ``groupBy``, a new meter under a deleted one's slug), so stale states are never read."""
        meaning = [self.id, self.event_type, self.aggregation, self.value_property, list(self.group_by.items())]
        meaning.append(None if self.event_from is None else self.event_from.isoformat())
        return hashlib.sha256(repr(meaning).encode()).hexdigest()[:24]

    def to_api(self) -> dict[str, Any]:
        """The meter as OpenMeter's v1 API shows it (``Meter`` in the spec)."""
        body: dict[str, Any] = {
            "id": self.id,
            "slug": self.slug,
            "name": self.name,
            "aggregation": self.aggregation,
            "eventType": self.event_type,
            "groupBy": dict(self.group_by),
            "windowSize": "MINUTE",
            "createdAt": _rfc3339(self.created_at),
            "updatedAt": _rfc3339(self.updated_at),
            "annotations": {"meterstream.origin": self.origin},
        }
        if self.description is not None:
            body["description"] = self.description
        if self.value_property is not None:
            body["valueProperty"] = self.value_property
        if self.event_from is not None:
            body["eventFrom"] = _rfc3339(self.event_from)
        if self.metadata is not None:
            body["metadata"] = dict(self.metadata)
        if self.deleted_at is not None:
            body["deletedAt"] = _rfc3339(self.deleted_at)
        return body


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_meter(raw: Any, *, meter_id: str, now: datetime, origin: str, prefix: str = "") -> UserMeter:
    """Validate OpenMeter's ``MeterCreate`` (the meters file uses the same names): 400 naming the field."""
    if not isinstance(raw, Mapping):
        raise bad(prefix or "body", "a meter must be an object")
    slug = raw.get("slug")
    if not isinstance(slug, str) or not _SLUG.match(slug) or len(slug) > 64:
        raise bad(f"{prefix}slug", "1 to 64 lower-case letters, digits and single underscores (tokens_total)")
    if find_meter(slug) is not None:
        raise bad(f"{prefix}slug", f"{slug} is a built-in meter")
    aggregation = raw.get("aggregation")
    if aggregation not in AGGREGATIONS:
        raise bad(f"{prefix}aggregation", f"one of {', '.join(AGGREGATIONS)}")
    event_type = raw.get("eventType")
    if not isinstance(event_type, str) or not event_type.strip() or len(event_type) > 256:
        raise bad(f"{prefix}eventType", "the event type to aggregate (1 to 256 characters)")
    value_property = raw.get("valueProperty")
    if "valueProperty" in raw and not isinstance(value_property, str):
        raise bad(f"{prefix}valueProperty", "a JSONPath into data ($.tokens)")
    if aggregation == "COUNT":
        value_property = None  # ignored for COUNT, as OpenMeter
    elif not isinstance(value_property, str) or not _JSONPATH.match(value_property):
        raise bad(f"{prefix}valueProperty", f"a JSONPath into data ($.tokens) is required for {aggregation}")
    group_by = parse_group_by(raw["groupBy"], prefix) if "groupBy" in raw else {}
    name = raw.get("name", slug)
    if not isinstance(name, str) or not 1 <= len(name) <= 256:
        raise bad(f"{prefix}name", "1 to 256 characters")
    description = raw.get("description")
    if "description" in raw and (not isinstance(description, str) or len(description) > 1024):
        raise bad(f"{prefix}description", "at most 1024 characters")
    event_from = raw.get("eventFrom")
    if "eventFrom" in raw:
        if not isinstance(event_from, str):
            raise bad(f"{prefix}eventFrom", "an RFC 3339 time")
        event_from = parse_time(f"{prefix}eventFrom", event_from)
    metadata = parse_metadata(raw.get("metadata"), prefix)
    return UserMeter(
        id=meter_id,
        slug=slug,
        name=name,
        event_type=event_type,
        aggregation=aggregation,
        value_property=value_property,
        group_by=group_by,
        created_at=now,
        updated_at=now,
        description=description,
        event_from=event_from,
        metadata=metadata,
        origin=origin,
    )


def parse_group_by(raw: Any, prefix: str = "") -> dict[str, str]:
    if not isinstance(raw, Mapping) or len(raw) > 20:
        raise bad(f"{prefix}groupBy", "an object of at most 20 group-by keys to JSONPaths")
    out: dict[str, str] = {}
    for key, path in raw.items():
        if not isinstance(key, str) or not _GROUP_KEY.match(key) or key == "subject":
            raise bad(f"{prefix}groupBy", f"{key!r}: keys are letters, digits and underscores, and not subject")
        if not isinstance(path, str) or not _JSONPATH.match(path):
            raise bad(f"{prefix}groupBy.{key}", "a JSONPath into data ($.model)")
        out[key] = path
    return out


def parse_metadata(raw: Any, prefix: str = "") -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise bad(f"{prefix}metadata", "an object of strings")
    return dict(raw)


def litellm_cost_meter(event_type: str) -> UserMeter:
    """LiteLLM's own cost of each call (the ``cost`` its `openmeter` callback sends), summed by model: beside
    ``cost_usd`` (Meterstream's price at the time of the call) so the two can be compared."""
    return UserMeter(
        id=stable_ulid("litellm_cost_usd"),
        slug="litellm_cost_usd",
        name="litellm_cost_usd",
        event_type=event_type,
        aggregation="SUM",
        value_property="$.cost",
        group_by={"model": "$.model"},
        created_at=_CREATED,
        updated_at=_CREATED,
        description="Cost in USD as LiteLLM computed it (its callback's `cost`); compare with cost_usd",
        origin="builtin",
    )

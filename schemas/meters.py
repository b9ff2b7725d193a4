"""The built-in meters: what each one sums, and its OpenMeter-shaped description."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

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

    def to_api(self, event_type: str) -> dict[str, Any]:
        """The meter as OpenMeter's v1 API shows it (``Meter`` in the spec)."""
        created = _CREATED.isoformat().replace("+00:00", "Z")
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

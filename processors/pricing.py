"""Cost of an LLM call at the time of the call: genai-prices, or a price override.

Never hand-written prices. The arithmetic is genai-prices' own (``ModelPrice.calc_price``), with one
speed-up: for a fixed model price, price context, tier and set of reported usage keys, that function is
affine in the token counts (cost = constant + Σ coefficient × count), so we learn the coefficients once
from the function itself and then price each event with integer arithmetic in atto-dollars (1e-18 USD,
the resolution of the ``Decimal(38, 18)`` columns). Coefficients are only used when they are exact at that
resolution and reproduce ``calc_price`` at check points; otherwise, and for every event the checks cannot
vouch for, the event is priced by ``calc_price`` directly.

What is not priced is *unpriced*, never $0: an unknown model, a usage shape the price data rejects, or a
price variant the event asked for (batch, flex, priority, fast) that the data does not have for that model
at that time — charging the standard price for a batch call would silently double the bill.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any, Final, NamedTuple

import yaml
from genai_prices import Usage
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import ModelInfo, ModelPrice, Provider, TieredPrices
from genai_prices.units import _get_registry
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.events import from_micros
from schemas.money import from_atto, round_to_atto, to_atto
from schemas.problems import MeterstreamError
from schemas.usage import canonical_provider

log = logging.getLogger(__name__)

#: Units priced per power of ten; anything else (per hour of audio) can round, so it takes the slow path.
_EXACT_PER: Final = frozenset({1, 10, 100, 1000, 10**6, 10**9})


class PriceOverrideError(MeterstreamError):
    """The price override file is invalid."""


class Price(NamedTuple):
    """What one call cost, in atto-dollars (1e-18 USD, exact), and where the price came from.

    A named tuple, not a frozen dataclass: one is made per priced event, and a tuple is built ~4x faster
    than a frozen dataclass (which sets each field through object.__setattr__)."""

    input_atto: int
    output_atto: int
    total_atto: int
    source: str

    @property
    def input_usd(self) -> Decimal:
        return from_atto(self.input_atto)

    @property
    def output_usd(self) -> Decimal:
        return from_atto(self.output_atto)

    @property
    def total_usd(self) -> Decimal:
        return from_atto(self.total_atto)


@dataclass(frozen=True, slots=True)
class Unpriced:
    reason: str


@dataclass(frozen=True, slots=True)
class Quote:
    """The price that applies to a provider and model at a time (for the transparency endpoint)."""

    provider: str
    model: str
    matched_model: str
    at: datetime
    source: str
    prices: Mapping[str, Any]
    context: Mapping[str, str]


def genai_prices_source() -> str:
    """Provenance of the bundled price data: package version and the hash of its data file."""
    return _genai_prices_source()


@cache
def _genai_prices_source() -> str:
    dist = importlib.metadata.distribution("genai-prices")
    digest = next(
        (f.hash.value for f in dist.files or [] if str(f).endswith("genai_prices/data.py") and f.hash),
        "unknown",
    )
    return f"genai-prices {dist.version} data:{digest[:12]}"


# -- price overrides --------------------------------------------------------------------------------------


class _OverrideRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)
    effective_from: datetime
    #: Only for events whose price context has these values (e.g. ``{processing: batch}``).
    when: dict[str, str] = Field(default_factory=dict)
    #: genai-prices price keys (``input_mtok``, ``output_mtok``, ``cache_read_mtok``, ...) in USD.
    prices: dict[str, Decimal]

    @field_validator("effective_from", mode="before")
    @classmethod
    def _date_is_midnight_utc(cls, value: Any) -> Any:
        if isinstance(value, date) and not isinstance(value, datetime):
            return datetime.combine(value, time(), tzinfo=UTC)
        return value

    @field_validator("effective_from")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("must include a UTC offset, e.g. 2025-01-01T00:00:00Z (or be a plain date)")
        return value.astimezone(UTC)

    @field_validator("prices")
    @classmethod
    def _known_keys(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        known = _get_registry()._all_price_keys
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown price keys {unknown}; known keys include input_mtok, output_mtok, ...")
        if not value:
            raise ValueError("at least one price is required")
        for key, price in value.items():
            if not price.is_finite() or price < 0:
                raise ValueError(f"{key} must be a non-negative number")
        return value


class _OverrideFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prices: list[_OverrideRule]


@dataclass(frozen=True, slots=True)
class _Override:
    provider: str
    model: str
    effective_from: datetime
    when: Mapping[str, str]
    price: ModelPrice
    source: str


def load_overrides(path: Path) -> list[_Override]:
    """Read and validate a price override file.

    Raises:
        PriceOverrideError: naming the file, the rule and the field at fault.
    """
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PriceOverrideError(f"cannot read price overrides {path}: {exc}") from None
    try:
        parsed = _OverrideFile.model_validate(raw)
    except ValidationError as exc:
        causes = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))
        raise PriceOverrideError(f"invalid price overrides {path}: {causes}") from None
    overrides = []
    for index, rule in enumerate(parsed.prices):
        try:
            model_price = ModelPrice(**dict(rule.prices))
            model_price.calc_price(Usage(input_tokens=1, output_tokens=1))
        except (ValueError, TypeError) as exc:
            raise PriceOverrideError(f"invalid price overrides {path}: prices.{index}: {exc}") from None
        overrides.append(
            _Override(
                provider=canonical_provider(rule.provider),
                model=rule.model.lower(),
                effective_from=rule.effective_from,
                when=dict(rule.when),
                price=model_price,
                source=f"override {path.name}#{index} {rule.provider}/{rule.model} from "
                f"{rule.effective_from.isoformat()}",
            )
        )
    return overrides


# -- the pricer -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Affine:
    """cost(u) = constant + Σ coefficient[k] · u[k], in atto-dollars, for (input, output, total)."""

    keys: tuple[str, ...]
    coefficients: tuple[tuple[int, int, int], ...]
    constant: tuple[int, int, int]
    #: (key, input, output, total coefficient) per key: what ``apply`` loops over, unpacked once.
    terms: tuple[tuple[str, int, int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        terms = tuple((key, *c) for key, c in zip(self.keys, self.coefficients, strict=True))
        object.__setattr__(self, "terms", terms)

    def apply(self, usage: Mapping[str, int]) -> tuple[int, int, int]:
        cin, cout, ctotal = self.constant
        for key, a, b, c in self.terms:
            count = usage[key]
            cin += a * count
            cout += b * count
            ctotal += c * count
        return cin, cout, ctotal


@dataclass(frozen=True, slots=True)
class _Resolved:
    price: ModelPrice
    source: str
    #: Tier thresholds on input_tokens, ascending (empty: no tiers).
    tier_starts: tuple[int, ...]


class Pricer:
    """Prices events; thread-compatible, not thread-safe (one per worker)."""

    def __init__(self, overrides: list[_Override] | None = None, *, check_every: int = 1000) -> None:
        self._overrides: dict[tuple[str, str], list[_Override]] = {}
        for override in sorted(overrides or [], key=lambda o: o.effective_from):
            self._overrides.setdefault((override.provider, override.model), []).append(override)
        self._models: dict[tuple[str, str], tuple[Provider, ModelInfo] | str] = {}
        self._by_minute: dict[tuple[Any, ...], _Resolved | str] = {}
        self._resolved: dict[tuple[Any, ...], _Resolved | str] = {}
        self._affine: dict[tuple[Any, ...], _Affine | None] = {}
        #: (resolve key, usage keys) -> the untiered price and its coefficients: the fast path's one lookup.
        self._untiered: dict[tuple[Any, ...], tuple[_Resolved, _Affine]] = {}
        self._check_every = check_every
        self._priced = 0
        #: Events priced by the fast path that disagreed with calc_price (should stay 0).
        self.mismatches = 0

    def price(
        self,
        provider: str,
        model: str,
        time_us: int,
        usage: Mapping[str, int],
        context: Mapping[str, str] | None = None,
    ) -> Price | Unpriced:
        """The cost of one call at ``time_us`` (microseconds since the epoch, UTC). ``usage`` holds
        genai-prices usage keys, canonical convention (see schemas.usage)."""
        # Prices change at most at minute boundaries (dates, times of day), so resolution is cached per
        # minute: the per-event cost is a few dict lookups and integer multiplications.
        context_key = tuple(sorted(context.items())) if context else None
        resolve_key = (provider, model, context_key, time_us // 60_000_000)
        keys = tuple(usage)  # insertion order: one cache entry per payload shape, no sorting per event
        # The common case in one lookup: an untiered price whose coefficients for these keys are known.
        known = self._untiered.get((resolve_key, keys))
        if known is None:
            learned = self._coefficients(
                provider, model, time_us, usage, context=context, resolve_key=resolve_key, keys=keys
            )
            if isinstance(learned, (Price, Unpriced)):
                return learned
            known = learned
        resolved, affine = known
        cin, cout, ctotal = affine.apply(usage)
        price = Price(cin, cout, ctotal, resolved.source)
        self._priced += 1
        if self._check_every and self._priced % self._check_every == 0:
            return self._verified(price, resolved, usage, provider, model)
        return price

    def _coefficients(
        self,
        provider: str,
        model: str,
        time_us: int,
        usage: Mapping[str, int],
        *,
        context: Mapping[str, str] | None,
        resolve_key: tuple[Any, ...],
        keys: tuple[str, ...],
    ) -> tuple[_Resolved, _Affine] | Price | Unpriced:
        """The price in force and its linear form for these usage keys (kept for the one-lookup path when
        the price has no tiers), or the event's answer when there is no linear form (calc_price's price, or
        unpriced)."""
        resolved = self._by_minute.get(resolve_key)
        if resolved is None:
            if len(self._by_minute) >= _MAX_CACHE_ENTRIES:
                self._by_minute.clear()
            resolved = self._resolve(provider, model, from_micros(time_us), context or {})
            self._by_minute[resolve_key] = resolved
        if isinstance(resolved, str):
            return Unpriced(resolved)
        bucket = _bucket(resolved.tier_starts, usage.get("input_tokens", 0)) if resolved.tier_starts else 0
        affine_key = (id(resolved), keys, bucket)
        affine = self._affine.get(affine_key, _MISSING)
        if affine is _MISSING:
            if len(self._affine) >= _MAX_CACHE_ENTRIES:
                self._affine.clear()  # usage key sets come from clients: bound the cache
            affine = _learn(resolved, keys, bucket)
            self._affine[affine_key] = affine
        if affine is None:
            return self._slow(resolved, usage)
        if not resolved.tier_starts:
            if len(self._untiered) >= _MAX_CACHE_ENTRIES:
                self._untiered.clear()
            self._untiered[resolve_key, keys] = (resolved, affine)
        return resolved, affine

    def _verified(
        self, price: Price, resolved: _Resolved, usage: Mapping[str, int], provider: str, model: str
    ) -> Price | Unpriced:
        """The fast path's price checked against calc_price's (every ``check_every`` events): calc_price's
        answer wins a disagreement, which is counted and logged."""
        reference = self._slow(resolved, usage)
        if reference != price:
            self.mismatches += 1
            log.error("pricing fast path disagrees with calc_price for %s/%s %s", provider, model, dict(usage))
            return reference
        return price

    def quote(self, provider: str, model: str, when: datetime, context: Mapping[str, str] | None = None) -> Quote:
        """Which price applies, and from where. Raises LookupError when there is none."""
        resolved = self._resolve(provider, model, when, context or {})
        if isinstance(resolved, str):
            raise LookupError(resolved)
        matched = self._models.get((canonical_provider(provider), model.lower()))
        matched_model = matched[1].id if isinstance(matched, tuple) else model
        prices: dict[str, Any] = {}
        for key, value in resolved.price.__dict__.items():
            if value is None or key.startswith("_"):
                continue
            if isinstance(value, TieredPrices):
                prices[key] = {
                    "base": str(value.base),
                    "tiers": [{"above_input_tokens": t.start, "price": str(t.price)} for t in value.tiers],
                }
            else:
                prices[key] = str(value)
        return Quote(
            provider=canonical_provider(provider),
            model=model,
            matched_model=matched_model,
            at=when,
            source=resolved.source,
            prices=prices,
            context=dict(context or {}),
        )

    def bound_rates(
        self, provider: str, model: str, when: datetime, context: Mapping[str, str] | None = None
    ) -> tuple[Decimal, Decimal, Decimal] | None:
        """The highest USD rates per input token, per output token and per request that any usage of this
        call could be charged at ``when`` (every tier's price, cache writes as input); None when the model
        has no price or a price in a unit this cannot bound. Charges per tool use (web searches) are not
        included."""
        resolved = self._resolve(provider, model, when, context or {})
        if isinstance(resolved, str):
            return None
        per_input = per_output = per_request = Decimal(0)
        for key, value in resolved.price.__dict__.items():
            if value is None or key.startswith("_"):
                continue
            prices = [value.base, *(t.price for t in value.tiers)] if isinstance(value, TieredPrices) else [value]
            top = max(Decimal(str(p)) for p in prices)
            if key == "requests_kcount":
                per_request = max(per_request, top / 1000)
            elif key.endswith("_mtok") and key.startswith("output"):
                per_output = max(per_output, top / 1_000_000)
            elif key.endswith("_mtok"):
                per_input = max(per_input, top / 1_000_000)
            elif not key.endswith("_kcount"):
                return None  # a unit without a known relation to tokens: not bounded, so not priced
            # Other per-use charges (web_searches_kcount, ...) depend on what the model decides to do, not on
            # the request's size: outside the bound (README, "Reservations", says so).
        return per_input, per_output, per_request

    # -- resolution ---------------------------------------------------------------------------------------

    def _resolve(self, provider: str, model: str, when: datetime, context: Mapping[str, str]) -> _Resolved | str:
        provider_id = canonical_provider(provider)
        model_key = model.lower()
        override = self._override(provider_id, model_key, when, context)
        if override is not None:
            key: tuple[Any, ...] = ("override", id(override))
            cached = self._resolved.get(key)
            if cached is None:
                cached = _Resolved(override.price, override.source, _tier_starts(override.price))
                self._resolved[key] = cached
            return cached
        found = self._find(provider_id, model_key)
        if isinstance(found, str):
            return found
        provider_info, model_info = found
        if context and not any(model_info is m for m in provider_info.models):
            # genai-prices ignores the context for a model found through a fallback provider; so do we,
            # and then the variant the event asked for is not known.
            return self._no_variant(provider_id, model, context, when)
        standard, variants = _signature(model_info, when, context)
        if context and not variants:
            return self._no_variant(provider_id, model, context, when)
        key = (provider_info.id, model_info.id, standard, variants)
        cached = self._resolved.get(key)
        if cached is None:
            model_price = model_info.get_prices(when, context or None)
            cached = _Resolved(
                model_price,
                f"{genai_prices_source()} {provider_info.id}/{model_info.id}",
                _tier_starts(model_price),
            )
            self._resolved[key] = cached
        return cached

    def _override(self, provider: str, model: str, when: datetime, context: Mapping[str, str]) -> _Override | None:
        """The latest rule in effect whose price context is exactly the event's: a batch call is not
        priced by a rule for standard calls, nor the other way round."""
        chosen = None
        for override in self._overrides.get((provider, model), ()):
            if override.effective_from > when:
                break
            if override.when == context:
                chosen = override
        return chosen

    def _find(self, provider: str, model: str) -> tuple[Provider, ModelInfo] | str:
        key = (provider, model)
        found = self._models.get(key)
        if found is None:
            if len(self._models) >= _MAX_CACHED_MODELS:
                # Model names are client input: do not let a stream of made-up names grow memory forever.
                self._models.clear()
            try:
                found = get_snapshot().find_provider_model(model, None, provider, None)
            except LookupError as exc:
                found = f"no price known for {provider}/{model}: {exc}"
            self._models[key] = found
        return found

    @staticmethod
    def _no_variant(provider: str, model: str, context: Mapping[str, str], when: datetime) -> str:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(context.items()))
        return (
            f"no {wanted} price known for {provider}/{model} on {when.date().isoformat()} "
            f"({genai_prices_source()}); add a price override"
        )

    @staticmethod
    def _slow(resolved: _Resolved, usage: Mapping[str, int]) -> Price | Unpriced:
        try:
            result = resolved.price.calc_price(Usage(**usage))
        except (ValueError, TypeError) as exc:
            return Unpriced(f"usage cannot be priced with {resolved.source}: {exc}")
        return Price(
            round_to_atto(result["input_price"]),
            round_to_atto(result["output_price"]),
            round_to_atto(result["total_price"]),
            resolved.source,
        )


_MISSING: Final[Any] = object()
_MAX_CACHED_MODELS: Final = 10_000
_MAX_CACHE_ENTRIES: Final = 100_000


def _signature(model: ModelInfo, when: datetime, context: Mapping[str, str]) -> tuple[int, tuple[int, ...]]:
    """Which of the model's dated prices, and which price variants, apply: equal signatures, equal prices.
    Mirrors ``ModelInfo.get_prices``."""
    standard = 0
    if not isinstance(model.prices, ModelPrice):
        for index in range(len(model.prices) - 1, -1, -1):
            constraint = model.prices[index].constraint
            if constraint is None or constraint.active(when):
                standard = index
                break
    variants: tuple[int, ...] = ()
    if context:
        variants = tuple(
            index
            for index, variant in enumerate(model.price_variants or ())
            if (variant.constraint is None or variant.constraint.active(when))
            and all(context.get(key) == value for key, value in variant.when.items())
        )
    return standard, variants


def _tier_starts(price: ModelPrice) -> tuple[int, ...]:
    starts = {
        tier.start for value in price.__dict__.values() if isinstance(value, TieredPrices) for tier in value.tiers
    }
    return tuple(sorted(starts))


def _bucket(starts: tuple[int, ...], input_tokens: int) -> int:
    """Index of the tier that applies (tiers apply when input_tokens is strictly above their start)."""
    return sum(1 for start in starts if input_tokens > start)


def _learn(resolved: _Resolved, keys: tuple[str, ...], bucket: int) -> _Affine | None:
    """Coefficients of calc_price for these keys within this tier bucket, or None if it is not exactly
    affine at atto-dollar resolution."""
    units = {u.usage_key: u for u in _get_registry().units.values()}
    if any(key not in units or units[key].per not in _EXACT_PER for key in keys):
        return None
    base = _base_point(keys, units, resolved.tier_starts, bucket)
    if base is None:
        return None
    try:
        at_base = _atto(resolved.price.calc_price(Usage(**base)))
        coefficients = []
        for key in keys:
            bumped = dict(base)
            bumped[key] += 1
            after = _atto(resolved.price.calc_price(Usage(**bumped)))
            if after is None or at_base is None:
                return None
            coefficients.append(tuple(a - b for a, b in zip(after, at_base, strict=True)))
    except (ValueError, TypeError):
        return None
    if at_base is None:
        return None
    constant = tuple(
        total - sum(c[i] * base[k] for k, c in zip(keys, coefficients, strict=True)) for i, total in enumerate(at_base)
    )
    affine = _Affine(keys, tuple(coefficients), constant)  # type: ignore[arg-type]
    # Check at a second, different point of the same bucket before trusting it.
    probe = {k: v * 3 + 7 for k, v in base.items()}
    if bucket == 0 and resolved.tier_starts and probe.get("input_tokens", 0) > resolved.tier_starts[0]:
        probe = {k: v + 1 for k, v in base.items()}
    if _bucket(resolved.tier_starts, probe.get("input_tokens", 0)) != bucket:
        return None
    try:
        expected = _atto(resolved.price.calc_price(Usage(**probe)))
    except (ValueError, TypeError):
        return None
    return affine if expected == affine.apply(probe) else None


def _base_point(
    keys: tuple[str, ...], units: Mapping[str, Any], starts: tuple[int, ...], bucket: int
) -> dict[str, int] | None:
    """A valid usage with room to add one to any key: each key gets 1,000 plus all its descendants."""
    point: dict[str, int] = {}
    for key in keys:
        dims = units[key].dimensions.items()
        descendants = [k for k in keys if k != key and dims <= units[k].dimensions.items()]
        point[key] = 1000 * (1 + len(descendants))
    if "input_tokens" in point and starts:
        low = starts[bucket - 1] + 1 if bucket > 0 else 0
        high = starts[bucket] - 1 if bucket < len(starts) else None
        target = max(point["input_tokens"], low + 1)
        if high is not None and target + 1 > high:
            return None
        point["input_tokens"] = target
    return point


def _atto(result: Mapping[str, Any]) -> tuple[int, int, int] | None:
    try:
        return (
            to_atto(result["input_price"]),
            to_atto(result["output_price"]),
            to_atto(result["total_price"]),
        )
    except ValueError:
        return None

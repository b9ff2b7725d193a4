"""LLM usage: provider usage objects in, canonical token counts out.

Providers disagree on whether cached and reasoning tokens are inside their input and output counts
(OpenAI and Gemini put cache reads inside the prompt count; Anthropic and Bedrock report them beside it;
Gemini's thoughts are outside the candidates count). Every tool in this field has shipped double counts
here, so the mapping is not ours: we use genai-prices' own per-provider extractors and its usage
convention, which is also OpenTelemetry's:

* ``input_tokens`` is the whole input, **including** cache reads and cache writes;
* ``output_tokens`` is the whole output, **including** reasoning;
* every other count (``cache_read_tokens``, ``cache_write_1h_tokens``, ``output_reasoning_tokens``,
  ``input_audio_tokens`` ...) is a subset of those, named as genai-prices names it.

The result is checked for consistency (a subset never exceeds its parent, disjoint subsets never exceed
their parent together), and a violation names the offending field of the *event*, so the 400 the client
gets points at what it sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, Final

from genai_prices.data_snapshot import get_snapshot
from genai_prices.units import UnitDef, _get_registry

#: Largest count accepted for one field of one event. Far above any real LLM call (the largest context
#: windows are ~10M tokens); keeps sums of billions of events far inside UInt64.
MAX_COUNT: Final = 10**12

#: Short names accepted in the canonical payload, mapped to genai-prices usage keys.
ALIASES: Final[Mapping[str, str]] = {"reasoning_tokens": "output_reasoning_tokens"}

#: OpenAI has several API flavours with different usage shapes; these two are the ones that carry tokens.
OPENAI_FLAVOURS: Final = ("chat", "responses")


class UsageError(ValueError):
    """Usage that cannot be accepted. ``field`` is the event field at fault, e.g. ``data.usage.prompt_tokens``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class CanonicalUsage:
    """Token counts in the canonical convention, keyed by genai-prices usage key (only reported keys)."""

    counts: Mapping[str, int]

    def get(self, key: str) -> int:
        return self.counts.get(key, 0)

    @property
    def input_tokens(self) -> int:
        return self.get("input_tokens")

    @property
    def output_tokens(self) -> int:
        return self.get("output_tokens")

    @property
    def cache_read_tokens(self) -> int:
        return self.get("cache_read_tokens")

    @property
    def cache_write_tokens(self) -> int:
        return self.get("cache_write_tokens")

    @property
    def reasoning_tokens(self) -> int:
        return self.get("output_reasoning_tokens")

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@cache
def _units() -> Mapping[str, UnitDef]:
    registry = _get_registry()
    return {unit.usage_key: unit for unit in registry.units.values() if unit.usage_key != "requests"}


@cache
def usage_keys() -> frozenset[str]:
    """Every usage key genai-prices knows (``input_tokens``, ``cache_write_1h_tokens``, ...)."""
    return frozenset(_units())


@lru_cache(maxsize=4096)
def canonical_provider(provider: str) -> str:
    """The genai-prices provider id for a provider name or alias (``gemini`` → ``google``,
    ``bedrock`` → ``aws``); unknown providers are kept, lower-cased, so their tokens still count."""
    try:
        return str(get_snapshot().find_provider(None, provider, None).id)
    except LookupError:
        return provider.strip().lower()


@lru_cache(maxsize=4096)
def resolve_model(model: str) -> tuple[str, str]:
    """(provider, model) for a model name as LiteLLM reports it: ``openai/gpt-4o`` names its provider;
    ``gpt-4o`` is looked up in genai-prices' data (the provider whose models match it); a model no provider
    is known for keeps the provider ``unknown`` (its calls count, unpriced)."""
    prefix, slash, rest = model.partition("/")
    if slash and rest:
        try:
            return str(get_snapshot().find_provider(None, prefix, None).id), rest
        except LookupError:
            pass
    try:
        provider, _ = get_snapshot().find_provider_model(model, None, None, None)
    except LookupError:
        return "unknown", model
    return str(provider.id), model


def _check_count(field: str, value: Any) -> int:
    # bool is an int subclass: `true` is not a token count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(field, f"{field} must be a non-negative integer, got {_describe(value)}")
    if value < 0:
        raise UsageError(field, f"{field} must be a non-negative integer, got {value}")
    if value > MAX_COUNT:
        raise UsageError(field, f"{field} must be at most {MAX_COUNT}, got {value}")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, float):
        return f"the fraction {value!r}"
    return f"{type(value).__name__} {str(value)[:40]}"


def _check_numbers(node: Any, path: str) -> None:
    """Every number anywhere in a provider usage object must be a valid count (or null)."""
    if isinstance(node, Mapping):
        for key, child in node.items():
            _check_numbers(child, f"{path}.{key}")
    elif isinstance(node, list):
        for index, child in enumerate(node):
            _check_numbers(child, f"{path}[{index}]")
    elif isinstance(node, bool) or node is None or isinstance(node, str):
        return
    else:
        _check_count(path, node)


def check_consistency(counts: Mapping[str, int], field_of: Mapping[str, str]) -> None:
    """Reject counts where a subset exceeds its parent, or disjoint subsets exceed it together.

    Subsets are genai-prices units whose dimensions extend the parent's (``cache_read_tokens`` is
    ``input_tokens`` with ``token_type=cache_read``); children that differ from the parent in one and the
    same dimension (cache read vs cache write; 5m vs 1h) are disjoint.
    """
    for parent, children in _constraints(frozenset(counts)):
        total = sum(counts[child] for child in children)
        if total <= counts[parent]:
            continue
        if len(children) == 1:
            child = children[0]
            message = (
                f"{field_of.get(child, child)} ({counts[child]}) exceeds "
                f"{field_of.get(parent, parent)} ({counts[parent]})"
            )
        else:
            names = " + ".join(f"{field_of.get(c, c)} ({counts[c]})" for c in children)
            message = f"{names} = {total} exceeds {field_of.get(parent, parent)} ({counts[parent]})"
        raise UsageError(field_of.get(children[0], children[0]), message)


@lru_cache(maxsize=4096)  # keyed by client input: bounded
def _constraints(keys: frozenset[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(parent, children whose sum must not exceed it) for a set of reported keys; single children first,
    so that the simplest violation is the one reported. Cached: events repeat a handful of key sets."""
    units = _units()
    reported = sorted((units[key] for key in keys if key in units), key=lambda u: u.usage_key)
    singles: list[tuple[str, tuple[str, ...]]] = []
    groups: list[tuple[str, tuple[str, ...]]] = []
    for parent in reported:
        parent_dims = parent.dimensions.items()
        by_dimension: dict[str, list[str]] = {}
        for child in reported:
            if child is parent or not parent_dims <= child.dimensions.items():
                continue
            singles.append((parent.usage_key, (child.usage_key,)))
            extra = set(child.dimensions) - set(parent.dimensions)
            if len(extra) == 1:
                by_dimension.setdefault(extra.pop(), []).append(child.usage_key)
        groups.extend((parent.usage_key, tuple(c)) for c in by_dimension.values() if len(c) > 1)
    return tuple(singles + groups)


def normalize_usage(data: Mapping[str, Any]) -> CanonicalUsage:
    """Canonical counts from an ``llm.usage`` event's ``data``.

    ``data`` carries either canonical counts (``input_tokens``, ``output_tokens``, ``cache_read_tokens``,
    ``cache_write_tokens``, ``reasoning_tokens`` and any other genai-prices usage key) or the provider's own
    usage object verbatim under ``usage``, with ``provider`` (and for OpenAI optionally ``api``:
    ``chat`` or ``responses``, detected from the shape when absent).

    Raises:
        UsageError: naming the field at fault.
    """
    raw = data.get("usage")
    if raw is None:
        return _normalize_canonical(data)
    if not isinstance(raw, Mapping):
        raise UsageError("data.usage", "data.usage must be an object (the provider's usage as returned)")
    return _normalize_provider(data, raw)


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a canonical payload with these field names holds: (field, usage key) per count, and the
    subset constraints between those keys. Computed once per distinct set of field names."""

    fields: tuple[tuple[str, str], ...]
    constraints: tuple[tuple[str, tuple[str, ...]], ...]
    error: UsageError | None


@lru_cache(maxsize=4096)  # keyed by client input: bounded
def _shape(names: tuple[str, ...]) -> _Shape:
    known = usage_keys()
    fields: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for name in names:
        key = ALIASES.get(name, name)
        if key in known:
            if key in seen:
                error = UsageError(f"data.{name}", f"data.{name} repeats {key}, which data.{seen[key]} already gives")
                return _Shape((), (), error)
            seen[key] = name
            fields.append((name, key))
        elif "token" in name:
            # A misspelt count would otherwise be silently billed as zero.
            return _Shape((), (), UsageError(f"data.{name}", f"data.{name} is not a known token count"))
    return _Shape(tuple(fields), _constraints(frozenset(seen)), None)


def _normalize_canonical(data: Mapping[str, Any]) -> CanonicalUsage:
    # Every usage event passes here at ingest: the per-shape work is cached, the per-event work is a loop
    # over a handful of counts.
    shape = _shape(tuple(data))
    if shape.error is not None:
        raise shape.error
    counts: dict[str, int] = {}
    for name, key in shape.fields:
        value = data[name]
        if type(value) is int and 0 <= value <= MAX_COUNT:
            counts[key] = value
        elif value is not None:
            _check_count(f"data.{name}", value)  # raises, naming the problem
    if not counts:
        raise UsageError(
            "data",
            "data carries no usage: give input_tokens / output_tokens (canonical counts) "
            "or the provider's usage object under data.usage",
        )
    if len(counts) == len(shape.fields):
        for parent, children in shape.constraints:
            total = 0
            for child in children:
                total += counts[child]
            if total > counts[parent]:
                check_consistency(counts, {key: f"data.{name}" for name, key in shape.fields})  # raises
    else:  # some counts were null: the constraints of the keys actually given
        check_consistency(counts, {key: f"data.{name}" for name, key in shape.fields})
    return CanonicalUsage(counts)


def _normalize_provider(data: Mapping[str, Any], raw: Mapping[str, Any]) -> CanonicalUsage:
    provider_name = data.get("provider")
    if not isinstance(provider_name, str) or not provider_name:
        raise UsageError("data.provider", "data.provider is required with data.usage")
    _check_numbers(raw, "data.usage")
    try:
        provider = get_snapshot().find_provider(None, provider_name, None)
    except LookupError:
        raise UsageError(
            "data.provider",
            f"no usage format is known for provider {provider_name!r}; send canonical counts instead",
        ) from None
    extractors = {extractor.api_flavor: extractor for extractor in provider.extractors or []}
    flavour = _flavour(provider.id, data, raw, extractors)
    extractor = extractors[flavour]
    if provider.id == "google" and any("_" in key for key in raw):
        raw = _camel(raw)
    # The extractors read a whole response body; wrap the usage object the way the provider nests it.
    try:
        _, usage = extractor.extract(_wrap(extractor.root, raw))
    except ValueError as exc:
        raise UsageError("data.usage", f"data.usage is not usage of {provider.id}'s {flavour} API: {exc}") from None
    # Only what the response reported: genai-prices infers unreported keys on attribute access.
    counts = {key: int(value) for key, value in usage._reported_values().items()}
    field_of = {m.dest: f"data.usage.{_path(m.path)}" for m in extractor.mappings}
    # A destination fed by several fields (Anthropic's input = input + cache writes + cache reads) has no
    # single field to blame; name the key itself.
    dests = [m.dest for m in extractor.mappings]
    for dest in {d for d in dests if dests.count(d) > 1}:
        field_of[dest] = f"data.usage ({dest})"
    check_consistency(counts, field_of)
    return CanonicalUsage(counts)


def _flavour(provider_id: str, data: Mapping[str, Any], raw: Mapping[str, Any], extractors: Mapping[str, Any]) -> str:
    api = data.get("api")
    if api is not None:
        if not isinstance(api, str) or api not in extractors:
            raise UsageError("data.api", f"data.api must be one of {sorted(extractors)} for {provider_id}")
        return api
    if "default" in extractors:
        return "default"
    if set(OPENAI_FLAVOURS) <= set(extractors):
        # Chat Completions says prompt/completion, Responses says input/output.
        return "chat" if "prompt_tokens" in raw else "responses"
    raise UsageError("data.api", f"data.api is required for provider {provider_id}: one of {sorted(extractors)}")


def _camel(node: Any) -> Any:
    """google-genai's ``usage_metadata.model_dump()`` is snake_case; the REST API (and the extractor) camelCase."""
    if isinstance(node, Mapping):
        return {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), k): _camel(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_camel(v) for v in node]
    return node


def _wrap(root: Any, usage: Mapping[str, Any]) -> dict[str, Any]:
    path = [root] if isinstance(root, str) else list(root)
    if not path or not all(isinstance(p, str) for p in path):
        raise UsageError("data.usage", "this provider's usage format is not supported")
    body: dict[str, Any] = dict(usage)
    for key in reversed(path):
        body = {key: body}
    return body


def _path(path: Any) -> str:
    if isinstance(path, str):
        return path
    parts: list[str] = []
    for step in path:
        if isinstance(step, str):
            parts.append(step)
        else:  # an ArrayMatch: the array element whose `field` equals a value, e.g. modality=TEXT
            parts[-1] += f"[{step.field}={getattr(step.match, 'equals', '?')}]"
    return ".".join(parts)

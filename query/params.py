"""Meter query parameters, GET query string or POST body, parsed as OpenMeter's v1 API defines them.

Two leniencies beyond the spec, both for clients written for OpenMeter: ``filterGroupBy`` is accepted as
``filterGroupBy[model]=gpt-4o`` (the spec's deepObject form) and as one ``filterGroupBy`` value holding a
JSON or Python-literal object (what OpenMeter's own Python client sends on GET).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from schemas.meters import Meter, UserMeter
from schemas.problems import bad
from schemas.query import MeterQuery, WindowSize
from schemas.times import parse_time, parse_time_zone

MAX_LIST: Final = 100
_OPERATORS: Final = ("$eq", "$ne", "$in", "$nin")


def _strings(field: str, values: Any) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise bad(field, "must be a list of strings")
    if len(values) > MAX_LIST:
        raise bad(field, f"at most {MAX_LIST} values are accepted")
    return tuple(values)


def _dimension(field: str, key: str, keys: Sequence[str]) -> str:
    if key not in keys:
        raise bad(field, f"invalid group by: {key} (one of {', '.join(keys)})")
    return key


def _filter_object(field: str, raw: Any, keys: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``{"model": ["gpt-4o"]}`` or ``{"model": "gpt-4o"}``."""
    if not isinstance(raw, Mapping):
        raise bad(field, "must be an object of group-by key to value(s)")
    return {_dimension(field, str(k), keys): _strings(f"{field}.{k}", v) for k, v in raw.items()}


def _advanced(raw: Any, keys: Sequence[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    field = "advancedMeterGroupByFilters"
    if isinstance(raw, str):
        _bounded(field, raw)
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise bad(field, "must be a JSON object") from None
    if not isinstance(raw, Mapping):
        raise bad(field, "must be an object of group-by key to filter")
    include: dict[str, tuple[str, ...]] = {}
    exclude: dict[str, tuple[str, ...]] = {}
    for key, condition in raw.items():
        dimension = _dimension(field, str(key), keys)
        if not isinstance(condition, Mapping) or not condition:
            raise bad(f"{field}.{key}", f"must be an object with one of {', '.join(_OPERATORS)}")
        for operator, operand in condition.items():
            if operator not in _OPERATORS:
                raise bad(f"{field}.{key}", f"unsupported operator {operator} (supported: {', '.join(_OPERATORS)})")
            values = _strings(f"{field}.{key}.{operator}", operand)
            if operator in ("$eq", "$in"):
                # Several positive conditions on one key must all hold: keep the intersection.
                include[dimension] = tuple(v for v in include.get(dimension, values) if v in values)
            else:
                exclude[dimension] = exclude.get(dimension, ()) + values
    return include, exclude


#: Longest and most deeply nested filter accepted in a query string (a valid one is a flat object).
MAX_FILTER_CHARS = 16_384
MAX_FILTER_DEPTH = 8


def _bounded(field: str, raw: str) -> None:
    """Refuse a filter too long or too deeply nested to be a filter, before a parser recurses into it."""
    if len(raw) > MAX_FILTER_CHARS:
        raise bad(field, f"is longer than {MAX_FILTER_CHARS} characters")
    depth = deepest = 0
    for c in raw:  # brackets inside strings count too: an overestimate, harmless for a flat object
        if c in "{[(":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "}])":
            depth -= 1
    if deepest > MAX_FILTER_DEPTH:
        raise bad(field, f"nests deeper than {MAX_FILTER_DEPTH} levels")


def _bare_filter(raw: str) -> Any:
    """``filterGroupBy`` as one object: JSON, or the Python literal some clients send (``{'model': 'x'}``,
    read by ``ast.literal_eval``: literals only, never code, and only after the bounds above)."""
    _bounded("filterGroupBy", raw)
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(raw)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            continue
    raise bad("filterGroupBy", "must be filterGroupBy[key]=value, or an object")


def build_query(meter: Meter | UserMeter, raw: Mapping[str, Any]) -> MeterQuery:
    """A MeterQuery from already-decoded parameters (query string or JSON body, same names)."""
    start = parse_time("from", raw["from"]) if raw.get("from") is not None else None
    end = parse_time("to", raw["to"]) if raw.get("to") is not None else None
    if start is not None and end is not None:
        if start == end:
            raise bad("from", "from and to cannot be equal")
        if start > end:
            raise bad("from", "from must be before to")
    window_size = None
    if raw.get("windowSize") is not None:
        try:
            window_size = WindowSize(raw["windowSize"])
        except ValueError:
            raise bad("windowSize", f"must be one of {', '.join(w.value for w in WindowSize)}") from None
    zone = raw.get("windowTimeZone")
    time_zone = parse_time_zone("windowTimeZone", zone) if zone is not None else "UTC"
    client_id = raw.get("clientId")
    if client_id is not None and (not isinstance(client_id, str) or not 1 <= len(client_id) <= 36):
        raise bad("clientId", "must be 1 to 36 characters")
    if raw.get("filterCustomerId"):
        raise bad("filterCustomerId", "customers are not supported; filter by subject")
    keys = meter.group_keys
    group_by = list(
        dict.fromkeys(_dimension("groupBy", g, keys) for g in _strings("groupBy", raw.get("groupBy") or []))
    )
    include: dict[str, tuple[str, ...]] = {}
    exclude: dict[str, tuple[str, ...]] = {}
    filter_group_by = raw.get("filterGroupBy")
    advanced = raw.get("advancedMeterGroupByFilters")
    if filter_group_by and advanced:
        raise bad("filterGroupBy", "filterGroupBy and advancedMeterGroupByFilters cannot be used together")
    if filter_group_by:
        include.update(_filter_object("filterGroupBy", filter_group_by, keys))
    if advanced:
        include, exclude = _advanced(advanced, keys)
    subjects = _strings("subject", raw.get("subject") or [])
    if subjects:
        # As OpenMeter: filtering by subject also groups by subject.
        include["subject"] = tuple(v for v in include["subject"] if v in subjects) if "subject" in include else subjects
        if "subject" not in group_by:
            group_by.append("subject")
    return MeterQuery(
        meter=meter,
        start=start,
        end=end,
        window_size=window_size,
        time_zone=time_zone,
        group_by=tuple(group_by),
        include=include,
        exclude=exclude,
    )


def from_query_string(items: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Decode a query string into the POST body's shape: repeated keys become lists,
    ``filterGroupBy[k]=v`` an object."""
    raw: dict[str, Any] = {}
    deep: dict[str, list[str]] = {}
    for key, value in items:
        if key.startswith("filterGroupBy[") and key.endswith("]"):
            deep.setdefault(key[len("filterGroupBy[") : -1], []).append(value)
        elif key in ("subject", "groupBy", "filterCustomerId"):
            raw.setdefault(key, []).append(value)
        elif key == "filterGroupBy":
            raw[key] = _bare_filter(value)
        else:
            raw[key] = value
    if deep:
        if "filterGroupBy" in raw:
            raise bad("filterGroupBy", "use either filterGroupBy[key]=value or one filterGroupBy object")
        raw["filterGroupBy"] = deep
    return raw

"""Meters users define: through the API (kept in the control-plane store) or in the meters file (read at
start, in OpenMeter's ``meters:`` format). Both are served beside the built-in LLM meters.

A user meter is aggregated by the sink into 1-minute states from the deduplicated audit log, backfilled
first when it is made after its events arrived (so it covers them), and answered from the audit log until
then (sinks/clickhouse/meter_states.py). What would change the meaning of its numbers (its event type, aggregation,
value property, start) cannot be edited: 409, with what to do instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from control.service import new_id
from control.store import ControlStore, StoreUnavailable
from schemas.meters import Meter, UserMeter, find_meter, parse_meter, stable_ulid
from schemas.problems import Problem, bad

log = logging.getLogger(__name__)

#: How long this process trusts its copy of the API's meters (another process's change shows within it).
CACHE_S: Final = 1.0
#: What an update may not change (OpenMeter's MeterUpdate leaves them out), by API name and attribute.
_FIXED: Final = {
    "slug": "slug",
    "aggregation": "aggregation",
    "eventType": "event_type",
    "valueProperty": "value_property",
    "eventFrom": "event_from",
}


class MeterService:
    """The meters of this installation: built-in, from the meters file (``configured``), from the store."""

    def __init__(
        self,
        store: ControlStore | None,
        configured: Sequence[UserMeter] = (),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._configured = list(configured)
        self._clock = clock
        self._cached: list[UserMeter] | None = None
        self._cached_at = 0.0
        #: Bumped by every change made here: a read that began before a change must not be kept as the
        #: copy (it would hide the change for CACHE_S, e.g. a meter just made answering 404).
        self._generation = 0

    async def user_meters(self) -> list[UserMeter]:
        """The user meters: the file's, then the API's (oldest first); the API's read at most CACHE_S ago."""
        if self._store is None:
            return list(self._configured)
        if self._cached is None or time.monotonic() - self._cached_at > CACHE_S:
            generation = self._generation
            try:
                async with self._store.tx() as tx:
                    stored = await tx.meters()
            except StoreUnavailable as exc:
                if self._cached is None:
                    raise Problem(503, f"the API's meters cannot be read: {exc}", headers={"Retry-After": "5"}) from exc
                # PostgreSQL away: the meters as last read (they change rarely; ingest and queries go on).
                log.warning("meters: %s; answering with the meters as last read", exc)
                if generation == self._generation:
                    self._cached_at = time.monotonic()
                return self._configured + self._cached
            if generation == self._generation:
                self._cached, self._cached_at = stored, time.monotonic()
            elif self._cached is None:
                self._cached = stored  # kept, but as already out of date (_cached_at stays 0)
            return self._configured + stored
        return self._configured + self._cached

    async def find(self, id_or_slug: str) -> Meter | UserMeter | None:
        """The meter with this slug or id, built-in or user-defined."""
        builtin = find_meter(id_or_slug)
        if builtin is not None:
            return builtin
        for meter in await self.user_meters():
            if id_or_slug in (meter.slug, meter.id):
                return meter
        return None

    async def create(self, raw: Any) -> UserMeter:
        store = self._writable()
        meter = parse_meter(raw, meter_id=new_id(), now=self._clock(), origin="api")
        for other in self._configured:
            if other.slug == meter.slug:
                where = "built in" if other.origin == "builtin" else "defined in the meters file"
                raise Problem(409, f"a meter with slug {meter.slug} is {where}")
        async with store.tx() as tx:
            await tx.insert_meter(meter)  # Conflict (409) when a live meter has the slug
        self._changed()
        return meter

    async def update(self, id_or_slug: str, raw: Any) -> UserMeter:
        store = self._writable()
        meter = await self._own(id_or_slug)
        if not isinstance(raw, dict):
            raise bad("body", "a meter update must be an object")
        for name, attribute in _FIXED.items():
            if name in raw and _api_value(raw[name]) != _api_value(getattr(meter, attribute)):
                raise Problem(
                    409,
                    f"the {name} of meter {meter.slug} cannot be changed: it would change the meaning of every "
                    f"value it has reported. Create a meter with another slug and the new {name} (it covers "
                    "the events already stored), move its users to it, then delete this one",
                )
        # What may change, validated as a new definition would be (the same rules and messages).
        changes = {k: raw[k] for k in ("name", "description", "groupBy", "metadata") if k in raw}
        parsed = parse_meter(meter.to_api() | changes, meter_id=meter.id, now=self._clock(), origin="api")
        updated = dataclasses.replace(parsed, created_at=meter.created_at)
        async with store.tx() as tx:
            await tx.update_meter(updated)
        self._changed()
        return updated

    async def delete(self, id_or_slug: str) -> None:
        store = self._writable()
        meter = await self._own(id_or_slug)
        async with store.tx() as tx:
            await tx.delete_meter(meter.id, self._clock())
        self._changed()

    def _changed(self) -> None:
        """After a change committed here: the next read goes to the store, and no read begun before is kept."""
        self._generation += 1
        self._cached_at = 0.0

    async def _own(self, id_or_slug: str) -> UserMeter:
        """A meter of the API's, or why it cannot be changed through the API."""
        self._cached_at = 0.0  # read what is stored now, not a second-old copy
        meter = await self.find(id_or_slug)
        if meter is None:
            raise Problem(404, f"meter not found: {id_or_slug}")
        if isinstance(meter, Meter) or meter.origin == "builtin":
            raise Problem(409, f"{meter.slug} is a built-in meter: it cannot be changed or deleted")
        if meter.origin == "config":
            raise Problem(409, f"meter {meter.slug} is defined in the meters file: change it there")
        return meter

    def _writable(self) -> ControlStore:
        if self._store is None:
            raise Problem(
                501,
                "this service has no control-plane store (POSTGRES__DSN): define meters in the meters file "
                "(METERS_FILE) instead",
            )
        return self._store


def _api_value(value: Any) -> Any:
    """A value as the API would write it, so an update that repeats an unchanged field is accepted."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, str) and value.endswith("+00:00"):
        return value.replace("+00:00", "Z")
    return value


def meters_from_file(document: Any, now: datetime) -> list[UserMeter]:
    """The meters of a meters file, OpenMeter's format (``meters:`` a list of MeterCreate objects; snake_case
    names as in OpenMeter's own config are accepted too). A stable id per slug, so ids survive restarts."""
    if not isinstance(document, dict) or not isinstance(document.get("meters"), list):
        raise bad("meters", "the meters file must hold a list under `meters:`")
    meters: list[UserMeter] = []
    for i, entry in enumerate(document["meters"]):
        raw = {_camel(k): v for k, v in entry.items()} if isinstance(entry, dict) else entry
        slug = raw.get("slug") if isinstance(raw, dict) else None
        meter = parse_meter(
            raw, meter_id=stable_ulid(f"config:{slug}"), now=now, origin="config", prefix=f"meters[{i}]."
        )
        if any(m.slug == meter.slug for m in meters):
            raise bad(f"meters[{i}].slug", f"{meter.slug} is defined twice")
        meters.append(meter)
    return meters


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)

"""MeterService's copy of the API's meters: a read begun before a change is never kept as the copy.

Found by tests/e2e/test_user_meters.py: a background read of the meters (begun before a create committed)
finished after it and was kept for a second, so the meter just made answered 404. The store here is a
stand-in whose reads can be held open, to make that interleaving happen every time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from control.meters import MeterService
from schemas.meters import UserMeter


class Store:
    """Meters in a list; a read can be made to wait (after it took its snapshot) until released."""

    def __init__(self) -> None:
        self.meters: list[UserMeter] = []
        self.hold: asyncio.Event | None = None
        self.reading = asyncio.Event()

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        yield Tx(self)


class Tx:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def meters(self, include_deleted: bool = False) -> list[UserMeter]:
        snapshot, hold = list(self.store.meters), self.store.hold
        if hold is not None:
            self.store.reading.set()
            await hold.wait()
        return snapshot

    async def insert_meter(self, meter: UserMeter) -> None:
        self.store.meters.append(meter)


RAW = {"slug": "m1", "eventType": "openai", "aggregation": "SUM", "valueProperty": "$.tokens"}


def test_a_read_begun_before_a_create_does_not_hide_the_new_meter() -> None:
    async def scenario() -> None:
        store = Store()
        service = MeterService(store, clock=lambda: datetime(2026, 12, 3, tzinfo=UTC))  # type: ignore[arg-type]
        assert await service.user_meters() == []
        service._cached_at = 0.0  # the copy is due: the next read goes to the store
        store.hold = held = asyncio.Event()
        early = asyncio.create_task(service.user_meters())  # e.g. a background loop's read
        await store.reading.wait()  # it has read the store: no meter yet
        store.hold = None
        made = await service.create(RAW)
        assert store.meters == [made]
        # The early read ends after the create: it answers what it read, but is not kept as the copy.
        held.set()
        assert await early == []
        assert (await service.find("m1")) == made
        assert [m.slug for m in await service.user_meters()] == ["m1"]

    asyncio.run(scenario())

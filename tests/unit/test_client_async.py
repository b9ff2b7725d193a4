"""AsyncMeterstreamClient against an in-process fake of Meterstream."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import meterstream_client as mc
import pytest
from meterstream_client._query import METERS

from tests.helpers.fake_meterstream import FakeMeterstream
from tests.unit.test_client_sync import FAST, KEY, Recorder, emit


def client(fake: FakeMeterstream, **options: object) -> mc.AsyncMeterstreamClient:
    settings: dict[str, object] = {"flush_interval": 5.0, "retry": FAST, "source": "unit"}
    settings.update(options)
    return mc.AsyncMeterstreamClient("http://meterstream.test", transport=fake.transport, **settings)  # type: ignore[arg-type]


async def test_emit_is_an_enqueue_and_flush_delivers_in_batches() -> None:
    fake = FakeMeterstream()
    async with client(fake, max_batch_events=4) as meter:
        ids = emit(meter, 10)
        assert fake.requests == [], "nothing is sent by emit itself"
        assert await meter.flush(timeout=5)
        assert meter.stats == mc.DeliveryStats(10, 10, 0, 0, 0, 0)
    assert [len(r) for r in fake.requests] == [4, 4, 2]
    assert {e["id"] for e in fake.stored.values()} == set(ids)


async def test_batches_go_after_flush_interval() -> None:
    fake = FakeMeterstream()
    async with client(fake, flush_interval=0.02) as meter:
        emit(meter, 2)
        for _ in range(200):
            if meter.stats.delivered == 2:
                break
            await asyncio.sleep(0.01)
        assert meter.stats.delivered == 2


async def test_retries_keep_event_ids_and_lost_acks_count_once() -> None:
    fake = FakeMeterstream(script=[503, "lost", 500])
    async with client(fake) as meter:
        emit(meter, 3)
        assert await meter.flush(timeout=5)
        assert meter.stats.retries == 3
    assert len(set(fake.bodies)) == 1 and len(fake.bodies) == 4
    assert len(fake.stored) == 3


async def test_invalid_events_are_rejected_and_the_rest_delivered() -> None:
    fake = FakeMeterstream()
    dropped: list[mc.DroppedEvent] = []
    async with client(fake, on_drop=dropped.append) as meter:
        emit(meter, 2)
        emit(meter, 1, subject="invalid")
        assert await meter.flush(timeout=5)
        assert (meter.stats.delivered, meter.stats.rejected) == (2, 1)
    assert [d.reason for d in dropped] == ["rejected"]


async def test_full_buffer_drops_at_once() -> None:
    release = threading.Event()
    fake = FakeMeterstream(before=lambda: release.wait(10))
    async with client(fake, max_buffer=2) as meter:
        emit(meter, 2)
        started = time.monotonic()
        assert emit(meter, 1) == [None]
        assert time.monotonic() - started < 0.05, "the async client never waits in emit"
        assert meter.stats.dropped == 1
        release.set()
        assert await meter.flush(timeout=5)


async def test_emit_from_another_thread_wakes_the_sender() -> None:
    fake = FakeMeterstream()
    async with client(fake, flush_interval=0.01) as meter:
        emit(meter, 1)  # starts the sender on this loop
        await asyncio.to_thread(emit, meter, 5)
        for _ in range(200):
            if meter.stats.delivered == 6:
                break
            await asyncio.sleep(0.01)
        assert meter.stats.delivered == 6


async def test_aclose_gives_up_at_its_deadline() -> None:
    fake = FakeMeterstream(script=[503] * 10_000)
    dropped: list[mc.DroppedEvent] = []
    meter = client(fake, on_drop=dropped.append, retry=mc.RetryPolicy(initial_delay=5, max_delay=5))
    emit(meter, 2)
    assert not await meter.flush(timeout=0.1)
    started = time.monotonic()
    await meter.aclose(timeout=0.3)
    assert time.monotonic() - started < 3
    assert (meter.stats.dropped, meter.stats.pending) == (2, 0)
    assert {d.reason for d in dropped} == {"shutdown"}
    with pytest.raises(RuntimeError, match="closed"):
        emit(meter, 1)


def test_events_survive_the_end_of_an_event_loop() -> None:
    """asyncio.run() ends with a batch in flight (its request cancelled) and more events queued: the next
    loop's sender delivers all of them."""
    fake = FakeMeterstream()
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(60)  # still in flight when the loop ends
        return fake.handle(request)

    meter = mc.AsyncMeterstreamClient(
        "http://meterstream.test", transport=httpx.MockTransport(handler), flush_interval=0, retry=FAST
    )

    async def first() -> None:
        emit(meter, 3)
        await asyncio.sleep(0.05)
        emit(meter, 2)

    asyncio.run(first())
    assert meter.stats.pending == 5

    async def second() -> None:
        assert await meter.flush(timeout=5)
        await meter.aclose()

    asyncio.run(second())
    assert meter.stats.pending == 0 and len(fake.stored) == 5


# -- the API key -------------------------------------------------------------------------------------------


async def events_and_query(recorder: Recorder, **options: object) -> None:
    settings: dict[str, object] = {"flush_interval": 5.0, "retry": FAST, "source": "unit"}
    settings.update(options)
    async with mc.AsyncMeterstreamClient("http://meterstream.test", transport=recorder.transport, **settings) as meter:  # type: ignore[arg-type]
        emit(meter, 3)
        assert await meter.flush(timeout=5)
        await meter.query_usage("alice")


async def test_the_api_key_is_sent_on_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERSTREAM_API_KEY", raising=False)
    recorder = Recorder()
    await events_and_query(recorder, api_key=KEY)
    assert recorder.paths() == {"/api/v1/events", *(f"/api/v1/meters/{m}/query" for m in METERS)}
    assert recorder.headers() == {f"Bearer {KEY}"}


async def test_the_api_key_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERSTREAM_API_KEY", KEY)
    recorder = Recorder()
    await events_and_query(recorder)
    assert recorder.headers() == {f"Bearer {KEY}"}
    recorder = Recorder()
    await events_and_query(recorder, api_key="")
    assert recorder.headers() == {None}


async def test_an_explicit_authorization_header_wins_over_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERSTREAM_API_KEY", KEY)
    recorder = Recorder()
    await events_and_query(recorder, api_key="ms_read_ignored", headers={"authorization": "Basic Z2F0ZXdheQ=="})
    assert recorder.headers() == {"Basic Z2F0ZXdheQ=="}


def test_the_exit_delivery_of_an_unclosed_client_keeps_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Events of a client whose loop is gone go out through a blocking sender: with the same key, even when
    the environment has changed since."""
    monkeypatch.setenv("METERSTREAM_API_KEY", KEY)
    recorder = Recorder()
    meter = mc.AsyncMeterstreamClient("http://meterstream.test", transport=recorder.transport, flush_interval=60)
    emit(meter, 2)  # outside a loop: queued, no sender started
    monkeypatch.setenv("METERSTREAM_API_KEY", "ms_ingest_changed")
    meter._deliver_at_exit()
    assert recorder.paths() == {"/api/v1/events"}
    assert recorder.headers() == {f"Bearer {KEY}"}

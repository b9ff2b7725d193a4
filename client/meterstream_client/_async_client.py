"""The asyncio client: ``emit`` enqueues (it never awaits), a task on the event loop batches and delivers."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

import httpx

from meterstream_client._base import BaseClient, FullPolicy
from meterstream_client._client import MeterstreamClient
from meterstream_client._delivery import (
    BATCH_CONTENT_TYPE,
    EVENTS_PATH,
    Delivery,
    DroppedEvent,
    Item,
    Outcome,
    RetryPolicy,
    classify,
    failure,
)
from meterstream_client._events import DEFAULT_EVENT_TYPE
from meterstream_client._query import METERS, UsageWindow, WindowSize, merge, parse_rows, query_params
from meterstream_client._reservations import (
    ApiCall,
    Estimate,
    Reservation,
    check_ok,
    commit_body,
    estimate_call,
    parse_estimate,
    parse_reservation,
    reservation_call,
)

log = logging.getLogger("meterstream_client")

_LIVE: weakref.WeakSet[AsyncMeterstreamClient] = weakref.WeakSet()

#: How often ``flush`` checks for completion (it may run on another loop or thread than the sender).
_FLUSH_POLL_S = 0.005


class AsyncMeterstreamClient(BaseClient):
    """The asyncio flavour of :class:`MeterstreamClient` (same options, same delivery guarantees).

    ``emit`` is a plain method: it only validates and enqueues, so it can be called from async code, sync
    callbacks and other threads alike; it never waits, so a full buffer applies ``on_full`` at once
    (``full_timeout`` is not used). The sender is a task on the event loop where the client is first used;
    ``await flush()`` waits for delivery and ``await aclose()`` (or ``async with``) flushes and stops it.
    A client never closed has its buffer delivered synchronously at interpreter exit, within
    ``exit_timeout``.

    ``api_key`` (default: the ``METERSTREAM_API_KEY`` environment variable) is sent as
    ``Authorization: Bearer <key>`` on every request, events and queries; an ``Authorization`` in
    ``headers`` wins over it.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8888",
        *,
        source: str | None = None,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        max_batch_events: int = 250,
        max_batch_bytes: int = 512 * 1024,
        flush_interval: float = 0.5,
        max_buffer: int = 50_000,
        on_full: FullPolicy = "drop",
        retry: RetryPolicy | None = None,
        on_drop: Callable[[DroppedEvent], None] | None = None,
        exit_timeout: float = 10.0,
        event_type: str = DEFAULT_EVENT_TYPE,
        api_attempts: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            source=source,
            api_key=api_key,
            headers=headers,
            timeout=timeout,
            max_batch_events=max_batch_events,
            max_batch_bytes=max_batch_bytes,
            flush_interval=flush_interval,
            max_buffer=max_buffer,
            full_timeout=0.0,
            on_full=on_full,
            retry=retry,
            on_drop=on_drop,
            exit_timeout=exit_timeout,
            event_type=event_type,
            api_attempts=api_attempts,
        )
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._closed = False
        self._failing = False
        self._query_http: httpx.AsyncClient | None = None
        _LIVE.add(self)

    # -- public API ----------------------------------------------------------------------------------

    # A timeout parameter rather than asyncio.timeout(): the same contract as the sync client's (False,
    # not an exception, when events are still pending), and for aclose() it is a delivery deadline.
    async def flush(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Send everything buffered now and wait until Meterstream acknowledged it (or rejected it).

        Returns True when nothing is pending, False if ``timeout`` seconds passed first (the events stay
        buffered and keep being retried).
        """
        outbox = self._outbox
        if not self._closed:
            self._before_offer()
        deadline = None if timeout is None else time.monotonic() + timeout
        with outbox.lock:
            outbox.flushing += 1
        self._wake()
        try:
            while outbox.pending():
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(_FLUSH_POLL_S)
            return True
        finally:
            with outbox.lock:
                outbox.flushing -= 1

    async def aclose(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Deliver what is buffered (trying for up to ``timeout`` seconds, ``exit_timeout`` by default),
        then stop. Events still undelivered are dropped: logged and handed to ``on_drop``."""
        if self._closed:
            return
        outbox = self._outbox
        if outbox.pending():
            self._before_offer()
        self._closed = True
        _LIVE.discard(self)
        wait = self._exit_timeout if timeout is None else timeout
        with outbox.changed:
            outbox.closed = True
            outbox.deadline = time.monotonic() + wait
        self._wake()
        task = self._task
        if task is not None and not task.done() and self._loop is not None:
            # A request in flight at the deadline is itself cut at the deadline (its timeout is capped).
            if self._loop is asyncio.get_running_loop():
                await asyncio.wait({task}, timeout=wait + 2)
            else:
                waiting = asyncio.run_coroutine_threadsafe(asyncio.wait({task}, timeout=wait + 2), self._loop)
                await asyncio.wrap_future(waiting)
            if not task.done():
                log.error("meterstream: the sender did not stop within %.1f s", wait)
                task.cancel()
        if outbox.pending():
            outbox.abandon(outbox.pop_all(), "the client closed before they could be delivered")
        if self._query_http is not None:
            await self._query_http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def query_usage(
        self,
        subject: str,
        *,
        window: WindowSize | None = "DAY",
        start: datetime | None = None,
        end: datetime | None = None,
        time_zone: str = "UTC",
        by_model: bool = False,
    ) -> list[UsageWindow]:
        """A subject's tokens and cost per window; see :meth:`MeterstreamClient.query_usage`."""
        params = query_params(subject, window=window, start=start, end=end, time_zone=time_zone, by_model=by_model)
        http = self._api_client()

        async def one(meter: str) -> list[dict[str, object]]:
            response = await http.get(f"/api/v1/meters/{meter}/query", params=params)
            response.raise_for_status()
            return parse_rows(response.content)

        results = await asyncio.gather(*(one(meter) for meter in METERS))
        return merge(subject, dict(zip(METERS, results, strict=True)))

    # -- reservations (see MeterstreamClient for the details) -----------------------------------------

    async def reserve(
        self,
        subject: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        estimate: Mapping[str, int] | None = None,
        request: Mapping[str, Any] | None = None,
        amounts: Mapping[str, Decimal | int | float | str] | None = None,
        ttl_seconds: int | None = None,
        reservation_id: str | None = None,
    ) -> Reservation:
        """Hold part of ``subject``'s budget for one call; see :meth:`MeterstreamClient.reserve`.

        Raises:
            LimitExceededError: the call does not fit (HTTP 429).
            MeterstreamAPIError: any other error answer.
        """
        call, rid = self._reserve_request(
            subject,
            provider=provider,
            model=model,
            estimate=estimate,
            request=request,
            amounts=amounts,
            ttl_seconds=ttl_seconds,
            reservation_id=reservation_id,
        )
        return parse_reservation(check_ok(await self._api(call), subject=subject, reservation_id=rid))

    async def commit(
        self, reservation_id: str, usage: Mapping[str, Any], *, provider: str | None = None, model: str | None = None
    ) -> Reservation:
        """Replace a hold by what the call used; see :meth:`MeterstreamClient.commit`."""
        call = reservation_call(reservation_id, "commit", commit_body(usage, provider=provider, model=model))
        return parse_reservation(check_ok(await self._api(call)))

    async def release(self, reservation_id: str) -> Reservation:
        """Free a hold; see :meth:`MeterstreamClient.release`."""
        return parse_reservation(check_ok(await self._api(reservation_call(reservation_id, "release"))))

    async def get_reservation(self, reservation_id: str) -> Reservation:
        """A reservation's state; see :meth:`MeterstreamClient.get_reservation`."""
        return parse_reservation(check_ok(await self._api(reservation_call(reservation_id))))

    async def estimate(self, provider: str, model: str, request: Mapping[str, Any]) -> Estimate:
        """Meterstream's bound on a call; see :meth:`MeterstreamClient.estimate`."""
        return parse_estimate(check_ok(await self._api(estimate_call(provider, model, request))))

    async def _api(self, call: ApiCall) -> httpx.Response:
        http = self._api_client()
        headers = {"Content-Type": "application/json"} if call.body is not None else None
        attempt = 0
        while True:
            try:
                response = await http.request(call.method, call.path, content=call.body, headers=headers)
            except httpx.TransportError as exc:
                delay = self._retry_delay(call, attempt, None)
                if delay is None:
                    raise
                reason = f"{type(exc).__name__}: {exc}"
            else:
                delay = self._retry_delay(call, attempt, response)
                if delay is None:
                    return response
                reason = f"HTTP {response.status_code}"
            log.warning("meterstream: %s %s failed (%s); retrying in %.2f s", call.method, call.path, reason, delay)
            await asyncio.sleep(delay)
            attempt += 1

    def _api_client(self) -> httpx.AsyncClient:
        if self._query_http is None:
            self._query_http = httpx.AsyncClient(
                base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=self._transport
            )
        return self._query_http

    # -- the sender ----------------------------------------------------------------------------------

    def _before_offer(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Not on a loop (a sync callback in another thread): the running sender, if any, is woken in
            # _after_offer; otherwise one starts at the next emit or flush made on a loop (or at exit).
            return
        task = self._task
        if task is not None and not task.done() and self._loop is not None and not self._loop.is_closed():
            return
        if self._closed:
            return
        # The previous sender's loop is gone (asyncio.run() ended): what it held goes to the new one.
        self._outbox.reclaim()
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._task = loop.create_task(self._run(), name="meterstream-sender")

    def _after_offer(self) -> None:
        self._wake()

    def _wake(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is None or wakeup is None or loop.is_closed():
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wakeup.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wakeup.set)

    async def _wait(self, seconds: float | None) -> None:
        """Until woken (an emit, a flush, close) or ``seconds``. A stale wake-up costs one loop."""
        wakeup = self._wakeup
        assert wakeup is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), seconds)
        wakeup.clear()

    async def _run(self) -> None:
        outbox = self._outbox
        http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=self._transport
        )
        try:
            while (batch := await self._next_batch()) is not None:
                await self._deliver(http, batch)
        except asyncio.CancelledError:
            outbox.reclaim()
            raise
        except Exception:
            log.exception("meterstream: the sender failed; restarting at the next emit or flush")
            outbox.reclaim()
        finally:
            await http.aclose()

    async def _next_batch(self) -> list[Item] | None:
        outbox = self._outbox
        while outbox.queued == 0:
            if outbox.closed:
                return None
            await self._wait(None)
        end = time.monotonic() + self._flush_interval
        while not (
            outbox.closed or outbox.flushing or outbox.batch_ready(self._max_batch_events, self._max_batch_bytes)
        ):
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            await self._wait(remaining)
        if outbox.deadline is not None and time.monotonic() >= outbox.deadline:
            outbox.abandon(outbox.drain_queue(), "Meterstream did not accept them before the close timeout")
            return None
        return outbox.take(self._max_batch_events, self._max_batch_bytes)

    async def _deliver(self, http: httpx.AsyncClient, batch: Sequence[Item]) -> None:
        outbox = self._outbox
        delivery = Delivery(batch, self._retry)
        while (items := delivery.next()) is not None:
            outcome = await self._post(http, items)
            outbox.settle(outcome)
            delay = delivery.record(outcome)
            if delay is None:
                if self._failing:
                    self._failing = False
                    log.info("meterstream: delivery recovered")
                continue
            log.log(
                logging.DEBUG if self._failing else logging.WARNING,
                "meterstream: delivery failed (%s); retrying in %.1f s, %d events pending",
                outcome.reason,
                delay,
                outbox.pending(),
            )
            self._failing = True
            if not await self._pause(delay):
                why = f"Meterstream unreachable until the close timeout: {outcome.reason}"
                outbox.abandon(delivery.remaining(), why)
                outbox.abandon(outbox.drain_queue(), why)
                return

    async def _post(self, http: httpx.AsyncClient, items: Sequence[Item]) -> Outcome:
        timeout = self._timeout
        deadline = self._outbox.deadline
        if deadline is not None:
            timeout = max(0.1, min(timeout, deadline - time.monotonic()))
        try:
            response = await http.post(
                EVENTS_PATH,
                content=b"[" + b",".join(item.body for item in items) + b"]",
                headers={"Content-Type": BATCH_CONTENT_TYPE},
                timeout=timeout,
            )
        except httpx.HTTPError as exc:
            return failure(exc)
        return classify(items, response.status_code, response.headers, response.content)

    async def _pause(self, delay: float) -> bool:
        outbox = self._outbox
        end = time.monotonic() + delay
        while True:
            now = time.monotonic()
            if outbox.deadline is not None:
                if now >= outbox.deadline:
                    return False
                end = min(end, now + max(0.05, (outbox.deadline - now) / 2))
            if now >= end:
                return True
            await self._wait(end - now)

    def _deliver_at_exit(self) -> None:
        """The loop is gone and the client was never closed: deliver its buffer with a blocking sender."""
        items = self._outbox.pop_all()
        if not items:
            return
        log.warning("meterstream: AsyncMeterstreamClient was not closed; delivering %d events at exit", len(items))
        sender = MeterstreamClient(
            self.base_url,
            source=self.source,
            api_key="",  # the headers already hold this client's Authorization, if it has one
            headers=self._headers,
            timeout=self._timeout,
            max_batch_events=self._max_batch_events,
            max_batch_bytes=self._max_batch_bytes,
            flush_interval=0,
            max_buffer=max(len(items), 1),
            retry=self._retry,
            on_drop=self._on_drop,
            exit_timeout=self._exit_timeout,
            event_type=self._event_type,
            # The same transport if it can also serve a blocking client (a test's MockTransport can).
            transport=self._transport if isinstance(self._transport, httpx.BaseTransport) else None,
        )
        # close() delivers in this thread: no sender thread is started at exit.
        sender._adopt(items)
        sender.close()


def _deliver_all_at_exit() -> None:
    for client in list(_LIVE):
        try:
            client._deliver_at_exit()
        except Exception:
            log.exception("meterstream: delivering an async client's events at exit failed")


atexit.register(_deliver_all_at_exit)

"""Delivering notification events from the outbox in PostgreSQL to their webhooks, in every API process.

At least once, never lost: a delivery row is written with its event; a sender leases due rows, posts each
outside any transaction, and records the attempt under its lease (``control/postgres/alerts.py``). Killed
mid-request, the row falls due again when the lease runs out, and is sent again with the same webhook-id.
A failed attempt (no answer, a timeout, any non-2xx) is retried with exponential backoff and jitter until
the retry horizon has passed; then the delivery is FAILED. At most ``max_concurrent`` requests are in
flight per process and ``per_channel`` per channel, so a slow receiver holds up only its own deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

from prometheus_client import Counter, Gauge, Histogram

from control.alerts.model import Attempt, DeliveryState, backoff
from control.alerts.store import Lease
from control.service import ControlService
from control.store import StoreUnavailable
from schemas.settings import AlertSettings

log = logging.getLogger(__name__)

PENDING: Final = Gauge("meterstream_notifications_pending", "Notification deliveries not yet delivered or given up")
DELIVERED: Final = Counter("meterstream_notifications_delivered", "Notification deliveries that succeeded")
FAILED: Final = Counter("meterstream_notifications_failed", "Notification deliveries given up", ["reason"])
ATTEMPTS: Final = Counter("meterstream_notification_attempts", "Webhook requests made", ["outcome"])
LATENCY: Final = Histogram(
    "meterstream_notification_delivery_seconds",
    "From a notification event's creation to its successful delivery",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
#: How often a sender looks for due deliveries without being woken (others processes' events, retries).
POLL_S: Final = 0.5
#: How often the pending gauge is counted.
COUNT_EVERY_S: Final = 5.0


class Outcome(Protocol):
    @property
    def status_code(self) -> int | None: ...
    @property
    def body(self) -> str: ...
    @property
    def duration_ms(self) -> int: ...
    @property
    def error(self) -> str | None: ...
    @property
    def retry_after_s(self) -> float | None: ...
    @property
    def ok(self) -> bool: ...
    @property
    def permanent(self) -> bool: ...


class Sender(Protocol):
    async def send(
        self, url: str, custom_headers: Mapping[str, str], secret: str, event_id: str, body: str
    ) -> Outcome: ...


@dataclass(frozen=True, slots=True)
class _Failed:
    """An attempt that failed before a request was made (a bug)."""

    error: str | None
    status_code: int | None = None
    body: str = ""
    duration_ms: int = 0
    retry_after_s: float | None = None
    ok: bool = False
    permanent: bool = False


class Deliverer:
    def __init__(self, control: ControlService, sender: Sender, settings: AlertSettings, wake: asyncio.Event) -> None:
        self._control = control
        self._store = control.store
        self._sender = sender
        self._settings = settings
        self._wake = wake
        self._per_channel: dict[str, int] = {}
        self._running: set[asyncio.Task[None]] = set()

    def _lease_for(self) -> timedelta:
        # Past the request's own timeout, so a live sender always records before its lease runs out.
        return timedelta(seconds=self._settings.timeout_s + self._settings.connect_timeout_s + 5)

    async def run(self) -> None:
        """Deliver until cancelled (requests in flight are cancelled with it; their rows fall due again)."""
        loop = asyncio.get_running_loop()
        counted_at = 0.0
        try:
            while True:
                self._wake.clear()
                try:
                    await self._lease_and_start()
                    if loop.time() - counted_at >= COUNT_EVERY_S:
                        async with self._store.tx() as tx:
                            PENDING.set(await tx.open_deliveries())
                        counted_at = loop.time()
                except StoreUnavailable:
                    pass  # PostgreSQL away: what is due stays due
                except Exception:
                    log.exception("alerts: the sender failed; retrying")
                waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait()), *self._running]
                await asyncio.wait(waits, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
                waits[0].cancel()
        finally:
            for task in self._running:
                task.cancel()

    async def _lease_and_start(self) -> None:
        free = self._settings.max_concurrent - len(self._running)
        if free <= 0:
            return
        now = self._control.now()
        async with self._store.tx() as tx:
            leases = await tx.lease_due(
                now, free, dict(self._per_channel), self._settings.per_channel, now + self._lease_for()
            )
        for lease in leases:
            channel_id = lease.delivery.channel_id
            self._per_channel[channel_id] = self._per_channel.get(channel_id, 0) + 1
            task = asyncio.create_task(self._deliver(lease))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _deliver(self, lease: Lease) -> None:
        channel_id = lease.delivery.channel_id
        try:
            await self._attempt(lease)
        except StoreUnavailable as exc:
            log.warning(
                "alerts: outcome of %s to %s not recorded (%s); it is sent again", lease.event.id, channel_id, exc
            )
        except Exception as exc:
            # A bug, not the receiver: recorded as a failed attempt (retried within the horizon, then FAILED),
            # never left SENDING for ever.
            log.exception("alerts: delivering %s to %s failed", lease.event.id, channel_id)
            with contextlib.suppress(Exception):
                await self._record(lease, _Failed(f"internal error: {type(exc).__name__}: {exc}"[:300]))
        finally:
            self._per_channel[channel_id] -= 1
            if not self._per_channel[channel_id]:
                del self._per_channel[channel_id]

    async def _attempt(self, lease: Lease) -> None:
        c, e = lease.channel, lease.event
        started = self._control.now()
        if c is None or c.deleted_at is not None or c.disabled:
            why = "the channel was deleted" if c is None or c.deleted_at is not None else "the channel is disabled"
            attempt = Attempt(started, DeliveryState.FAILED, None, "", 0, None)
            async with self._store.tx() as tx:
                await tx.record_attempt(lease, attempt, DeliveryState.FAILED, why, None)
            FAILED.labels("channel").inc()
            return
        out = await self._sender.send(c.url, c.custom_headers, c.signing_secret, e.id, e.payload)
        await self._record(lease, out, started)

    async def _record(self, lease: Lease, out: Outcome, started: datetime | None = None) -> None:
        """The attempt's outcome and what comes next: delivered, retried after a backoff, or given up."""
        d, c, e = lease.delivery, lease.channel, lease.event
        now = self._control.now()
        started = started or now
        n = d.attempts + 1
        attempt = Attempt(
            started,
            DeliveryState.SUCCESS if out.ok else DeliveryState.FAILED,
            out.status_code,
            out.body,
            out.duration_ms,
            c.url if c is not None else None,
        )
        if out.ok:
            state, reason, next_at = DeliveryState.SUCCESS, "", None
        else:
            wait = backoff(n, self._settings.retry_initial_s, self._settings.retry_max_s)
            if out.retry_after_s is not None:
                wait = max(wait, timedelta(seconds=min(out.retry_after_s, self._settings.retry_max_s)))
            next_at = now + wait
            if out.permanent:
                state, reason, next_at = DeliveryState.FAILED, f"not sent: {out.error}", None
            elif next_at > d.give_up_at:
                state, reason, next_at = DeliveryState.FAILED, f"gave up after {n} attempts: {out.error}", None
            else:
                state = DeliveryState.RESENDING if d.state is DeliveryState.RESENDING else DeliveryState.SENDING
                reason = out.error or ""
        async with self._store.tx() as tx:
            recorded = await tx.record_attempt(lease, attempt, state, reason, next_at)
        ATTEMPTS.labels("ok" if out.ok else "error").inc()
        if not recorded:
            return
        if state is DeliveryState.SUCCESS:
            DELIVERED.inc()
            # From the (re)send: a delivery's horizon starts there.
            sent_from = max(e.created_at, d.give_up_at - timedelta(seconds=self._settings.retry_horizon_s))
            LATENCY.observe(max(0.0, (now - sent_from).total_seconds()))
        elif state is DeliveryState.FAILED:
            FAILED.labels("gave_up").inc()
            log.warning("alerts: gave up delivering %s to channel %s: %s", e.id, d.channel_id, reason)

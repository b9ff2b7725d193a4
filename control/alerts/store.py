"""The alerts' part of the store contract (implemented by ``control/postgres/alerts.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from control.alerts.model import Attempt, Channel, Crossing, Delivery, DeliveryState, Event, Rule
from control.listing import Listing


@dataclass(frozen=True, slots=True)
class EventFilter:
    start: datetime | None = None
    end: datetime | None = None
    #: Feature ids or keys, subject keys, rule ids, channel ids (each: any of them).
    features: Sequence[str] = ()
    subjects: Sequence[str] = ()
    rules: Sequence[str] = ()
    channels: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Lease:
    """A delivery a sender may attempt now: only the holder of ``token`` records its outcome."""

    delivery: Delivery
    token: str
    event: Event
    channel: Channel | None


class AlertTx(Protocol):
    async def lock_alerts(self, subject_key: str) -> None: ...

    async def insert_channel(self, c: Channel) -> None: ...
    async def update_channel(self, c: Channel) -> None: ...
    async def channel(self, channel_id: str) -> Channel | None: ...
    async def channels(
        self, *, include_deleted: bool, include_disabled: bool, listing: Listing
    ) -> tuple[list[Channel], int]: ...
    async def delete_channel(self, channel_id: str, at: datetime) -> None: ...
    async def rules_using(self, channel_id: str) -> list[str]: ...

    async def insert_rule(self, r: Rule) -> None: ...
    async def update_rule(self, r: Rule) -> None: ...
    async def rule(self, rule_id: str) -> Rule | None: ...
    async def rules(
        self,
        *,
        include_deleted: bool,
        include_disabled: bool,
        features: Sequence[str],
        channels: Sequence[str],
        listing: Listing,
    ) -> tuple[list[Rule], int]: ...
    async def live_rules(self, rule_type: str) -> list[Rule]: ...
    async def delete_rule(self, rule_id: str, at: datetime) -> None: ...

    async def crossings(self, subject_key: str, feature_id: str, period_start: datetime) -> list[Crossing]: ...
    async def save_crossing(self, c: Crossing, at: datetime) -> bool: ...
    async def insert_event(
        self, e: Event, feature_key: str | None, channel_ids: Sequence[str], give_up_at: datetime
    ) -> None: ...
    async def event(self, event_id: str) -> Event | None: ...
    async def events(self, where: EventFilter, listing: Listing) -> tuple[list[Event], int]: ...
    async def resend(self, event_id: str, channel_ids: Sequence[str], at: datetime, give_up_at: datetime) -> None: ...

    async def lease_due(
        self, now: datetime, limit: int, in_flight: Mapping[str, int], per_channel: int, lease_until: datetime
    ) -> list[Lease]: ...
    async def record_attempt(
        self,
        lease: Lease,
        attempt: Attempt,
        state: DeliveryState,
        reason: str,
        next_attempt_at: datetime | None,
    ) -> bool: ...
    async def open_deliveries(self) -> int: ...

    async def notice_reset(self, rule_id: str, entitlement_id: str, reset_at: datetime) -> bool: ...
    async def claim_sweep(self, now: datetime, next_at: datetime) -> bool: ...
    async def metered_subjects(self, among: Sequence[str] | None) -> list[str]: ...

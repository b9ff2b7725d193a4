"""A meter query, as the query API parses it and the storage layer answers it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import NamedTuple

from schemas.meters import Meter, UserMeter


class WindowSize(StrEnum):
    MINUTE = "MINUTE"
    HOUR = "HOUR"
    DAY = "DAY"
    MONTH = "MONTH"


@dataclass(frozen=True, slots=True)
class MeterQuery:
    """What to sum, over which time range, bucketed and grouped how.

    ``start`` is inclusive and ``end`` exclusive, to the microsecond; either may be open. Windows are
    aligned to local boundaries of ``time_zone`` (DAY and MONTH are calendar days and months there, so a
    DST day is 23 or 25 hours long). ``group_by`` holds dimension names from the meter's ``group_keys``
    (it already includes ``subject`` when subjects are filtered, as OpenMeter does). ``include`` and
    ``exclude`` restrict dimensions to, or away from, sets of values.
    """

    meter: Meter | UserMeter
    start: datetime | None = None
    end: datetime | None = None
    window_size: WindowSize | None = None
    time_zone: str = "UTC"
    group_by: tuple[str, ...] = ()
    include: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    exclude: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


class QueryRow(NamedTuple):
    """One window of one group. ``group`` maps each grouped dimension (subject included) to its value.
    (A tuple: a large grouped query makes tens of thousands of them.)"""

    window_start: datetime
    window_end: datetime
    group: Mapping[str, str]
    value: Decimal


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which audit-log events to list: event time in ``[start, end)``, newest first."""

    start: datetime
    end: datetime | None = None
    subject: str | None = None
    #: Substring of the event id.
    id_contains: str | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class Difference:
    """A window whose stored totals differ from the totals recomputed from the audit log."""

    subject: str
    provider: str
    model: str
    window_start: datetime
    #: meter column -> (recomputed from the audit log, stored)
    values: Mapping[str, tuple[Decimal, Decimal]]


@dataclass(frozen=True, slots=True)
class AcceptedGap:
    """Source offsets an operator recorded as lost for good (``meterstream accept-gap``): the sink goes on
    past them; ``reconcile`` lists them, since the events they held are in no total."""

    topic_id: str
    partition: int
    first_offset: int
    last_offset: int
    reason: str
    accepted_at: datetime

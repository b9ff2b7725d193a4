"""The windows' usage a reserve read, kept and brought forward by what the sink of this process stores.

A reserve needs a subject's usage per segment of its entitlement's timeline (``segment_totals``), a
ClickHouse query that costs more than the rest of the reserve (BENCHMARKS.md, "Reservations"). Without this
cache every write touching the subject (its own commit's usage event, a moment later) meant a new query.
Here a usage read is kept with the subject's *write version* (``UsageClock.usage_version``): equal before
and after the read, so the read saw no write in flight. When the sink has stored a write, it tells the
windows it changed with the versions before and after; a kept usage at the version before gets the changes
added (exactly what the windows now hold more) and the version after. Anything else is dropped:

* a kept usage at another version (a write it did not see whole);
* a change in the minute of a range's unaligned start: that minute is read from the audit log, counting
  only the events from the start on, which a window's total cannot tell apart.

So a kept usage equals, at its version, what ``segment_totals`` would answer then: exact, never ahead and
never behind. Pure logic, thread-safe (the sink tells from its own thread).
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Final

from schemas.meters import WindowChange
from schemas.money import EXACT

MINUTE: Final = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class Segments:
    """What a kept usage sums: one subject's ``column`` from ``start`` on (no end), with the feature's
    filters, cut at ``cuts`` (whole UTC minutes after ``start``, ascending) into ``len(cuts) + 1`` totals."""

    subject: str
    column: str
    filters: Mapping[str, str]
    start: datetime
    cuts: tuple[datetime, ...]

    def segment_of(self, change: WindowChange) -> int | None:
        """The segment ``change`` adds to; None if it is outside the range; -1 if it cannot be told (the
        minute of an unaligned start)."""
        if change.subject != self.subject:
            return None
        for key, value in self.filters.items():
            if key not in ("provider", "model"):
                return -1  # a filter a window cannot be checked against
            if (change.provider if key == "provider" else change.model) != value:
                return None
        if change.minute < self.start:
            return -1 if change.minute + MINUTE > self.start else None
        return bisect_right(self.cuts, change.minute)


@dataclass(slots=True)
class _Kept:
    version: Hashable
    segments: Segments
    usage: list[Decimal]


class UsageCache:
    """Usage per segment by key (whatever identifies the entitlement's timeline), at most ``max_kept``."""

    def __init__(self, max_kept: int) -> None:
        self._max = max_kept
        self._lock = threading.Lock()
        self._kept: dict[Hashable, _Kept] = {}
        self._by_subject: dict[str, set[Hashable]] = {}
        #: Kept usages brought forward by a write, and dropped by one (for tests and metrics).
        self.advanced = 0
        self.dropped = 0

    def get(self, key: Hashable, version: Hashable | None) -> list[Decimal] | None:
        """The usage kept for ``key`` at ``version`` (a copy), if any."""
        if version is None:
            return None
        with self._lock:
            kept = self._kept.get(key)
            return list(kept.usage) if kept is not None and kept.version == version else None

    def put(self, key: Hashable, version: Hashable, segments: Segments, usage: Sequence[Decimal]) -> None:
        """Keep ``usage``, read with no write in flight between two reads of ``version``."""
        if len(usage) != len(segments.cuts) + 1:
            raise ValueError("one total per segment")
        with self._lock:
            if key not in self._kept and len(self._kept) >= self._max:
                self._kept.clear()
                self._by_subject.clear()
            self._kept[key] = _Kept(version, segments, list(usage))
            self._by_subject.setdefault(segments.subject, set()).add(key)

    def stored(self, changes: Sequence[WindowChange], versions: Mapping[str, tuple[Hashable, Hashable]]) -> None:
        """A write is stored: ``changes`` are what it added to the windows, ``versions`` each changed
        subject's write version before and after it."""
        by_subject: dict[str, list[WindowChange]] = {}
        for change in changes:
            by_subject.setdefault(change.subject, []).append(change)
        with self._lock:
            for subject, (before, after) in versions.items():
                for key in list(self._by_subject.get(subject, ())):
                    kept = self._kept[key]
                    usage = _advanced(kept, before, by_subject.get(subject, ()))
                    if usage is None:
                        self._forget(key, subject)
                        self.dropped += 1
                    else:
                        kept.usage, kept.version = usage, after
                        self.advanced += 1

    def _forget(self, key: Hashable, subject: str) -> None:
        del self._kept[key]
        keys = self._by_subject[subject]
        keys.discard(key)
        if not keys:
            del self._by_subject[subject]


def _advanced(kept: _Kept, before: Hashable, changes: Sequence[WindowChange]) -> list[Decimal] | None:
    """``kept``'s usage with ``changes`` added, or None if that cannot be known exactly."""
    if kept.version != before:
        return None
    usage = list(kept.usage)
    for change in changes:
        segment = kept.segments.segment_of(change)
        if segment is None:
            continue
        if segment < 0:
            return None
        usage[segment] = EXACT.add(usage[segment], change.value(kept.segments.column))  # (28 digits would round)
    return usage

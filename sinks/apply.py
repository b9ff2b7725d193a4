"""Which processor outputs to apply, and what they add up to. Pure logic, no I/O.

Exactly-once rests on two checks made here, per batch of windows records:

1. **Offsets.** Each source partition's records are applied in offset order, each once: a record at or
   below the partition's applied offset is a replay (skipped); one beyond the next offset is a gap: not
   applied, and reported (``Plan.gapped``) so the sink holds that partition where it is until the missing
   record comes or an operator accepts the hole (``accepted``: offsets taken as applied). The new applied
   offsets are written with the deltas, atomically.
2. **Event identity.** An event whose (source, id) is already stored from another occurrence (another
   offset, or earlier in this batch) is a duplicate: it is not stored again, and its contribution is taken
   back out of the window deltas the processor computed. An occurrence identical to the stored one is a
   replay of a batch that stored its audit rows and then failed before its deltas: it counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from schemas.meters import WINDOW_COUNTS, UserMeter
from schemas.records import AuditColumns, WindowsRecord, atto

#: (source, id) of an event.
EventKey = tuple[str, str]
#: Where one occurrence of an event came from: (events topic id, partition, offset, index in record).
Coords = tuple[str, int, int, int]
#: (subject, provider, model, window start in epoch seconds).
WindowKey = tuple[str, str, str, int]
#: (events topic id, partition).
Source = tuple[str, int]


@dataclass(frozen=True, slots=True)
class MeterStep:
    """Bring ``meter``'s states up to offset ``upto`` of each source partition of ``ranges`` (from where its
    marker stands); ``caught_up``: ``upto`` is the partition's applied offset (its backfill is done).
    ``events`` False: no event in those ranges is of the meter's type, so only its markers move (the audit
    log is not read)."""

    meter: UserMeter
    ranges: tuple[tuple[Source, int, bool], ...]
    events: bool = True


@dataclass(frozen=True, slots=True)
class Marker:
    offset: int
    caught_up: bool


@dataclass(slots=True)
class Totals:
    """Counts (in ``WINDOW_COUNTS`` order) and cost in atto-dollars of one window."""

    counts: list[int] = field(default_factory=lambda: [0] * len(WINDOW_COUNTS))
    cost_atto: int = 0

    def is_zero(self) -> bool:
        return self.cost_atto == 0 and not any(self.counts)


@dataclass(frozen=True, slots=True)
class Kept:
    """The audit rows of one applied record that are stored: ``rows`` are positions in its columns
    (None: all of them, the common case)."""

    record: WindowsRecord
    rows: list[int] | None

    def positions(self) -> range | list[int]:
        return range(len(self.record["events"]["id"])) if self.rows is None else self.rows

    def keys_and_coords(self) -> Iterator[tuple[EventKey, Coords]]:
        r = self.record
        events = r["events"]
        topic, partition, offset = r["topic_id"], r["partition"], r["offset"]
        if self.rows is None:  # every row: zipped columns, no indexing per row
            keys = zip(events["source"], events["id"], strict=True)
            return zip(keys, ((topic, partition, offset, index) for index in events["index"]), strict=True)
        sources, ids, indexes = events["source"], events["id"], events["index"]
        return (((sources[i], ids[i]), (topic, partition, offset, indexes[i])) for i in self.rows)


@dataclass(slots=True)
class Plan:
    """What one sink batch writes."""

    events: list[Kept] = field(default_factory=list)
    windows: dict[WindowKey, Totals] = field(default_factory=dict)
    #: New applied offset of every source partition this batch advances.
    offsets: dict[Source, int] = field(default_factory=dict)
    replays: int = 0
    #: Positions (in the input) of the records not applied because an offset before them is missing, and
    #: the first missing offset of each source partition that has one.
    gapped: list[int] = field(default_factory=list)
    missing: dict[Source, int] = field(default_factory=dict)
    duplicates: int = 0

    @property
    def gaps(self) -> int:
        return len(self.gapped)

    def stored_count(self) -> int:
        return sum(len(k.positions()) for k in self.events)

    def event_types(self) -> set[str]:
        """The types of every event of the applied records (stored or not)."""
        return {kind for kept in self.events for kind in kept.record["events"]["type"]}


def plan_batch(
    records: Iterable[WindowsRecord],
    applied: Mapping[Source, int],
    lookup: Callable[[list[EventKey]], Mapping[EventKey, Coords]],
    holes: Mapping[Source, Sequence[tuple[int, int]]] | None = None,
) -> Plan:
    """Decide what a batch of windows records writes.

    ``applied`` holds each source partition's applied offset (absent: nothing applied, -1). ``lookup``
    returns, for the keys it is given, where the stored occurrence of each came from (keys never stored
    are absent). ``holes`` holds the offset ranges (inclusive) an operator accepted as missing.
    """
    plan = Plan()
    accepted: list[WindowsRecord] = []
    for position, record in enumerate(records):
        source = (record["topic_id"], record["partition"])
        last = plan.offsets.get(source, applied.get(source, -1))
        offset = record["offset"]
        if offset <= last:
            plan.replays += 1
        elif offset != last + 1 and not (holes and covered(holes.get(source, ()), last + 1, offset - 1)):
            plan.gapped.append(position)
            plan.missing.setdefault(source, last + 1)
        else:
            plan.offsets[source] = offset
            accepted.append(record)

    windows = plan.windows
    for record in accepted:
        for delta in record["windows"]:
            window = (delta["subject"], delta["provider"], delta["model"], delta["window_start"])
            totals = windows.get(window)
            if totals is None:
                # The common case (a window first seen in this batch): built from the delta at once. Each
                # value is still added to 0, so a corrupt record (a count that is null or text) fails here,
                # in planning, where the sink tells a poison record, as it did when every delta was added.
                windows[window] = Totals(
                    [
                        0 + delta["requests"],
                        0 + delta["input_tokens"],
                        0 + delta["output_tokens"],
                        0 + delta["cache_read_tokens"],
                        0 + delta["cache_write_tokens"],
                        0 + delta["reasoning_tokens"],
                        0 + delta["total_tokens"],
                        0 + delta["unpriced_requests"],
                    ],
                    0 + atto(delta["cost_atto"]),
                )
                continue
            counts = totals.counts
            counts[0] += delta["requests"]
            counts[1] += delta["input_tokens"]
            counts[2] += delta["output_tokens"]
            counts[3] += delta["cache_read_tokens"]
            counts[4] += delta["cache_write_tokens"]
            counts[5] += delta["reasoning_tokens"]
            counts[6] += delta["total_tokens"]
            counts[7] += delta["unpriced_requests"]
            totals.cost_atto += atto(delta["cost_atto"])

    keys = [key for record in accepted for key in zip(record["events"]["source"], record["events"]["id"], strict=True)]
    unique = list(dict.fromkeys(keys))
    stored = lookup(unique)
    if not stored and len(unique) == len(keys):
        # The common case: every event is new, nothing to take back.
        plan.events = [Kept(record, None) for record in accepted]
    else:
        _deduplicate(plan, accepted, stored)

    # Only a window without requests can be zero (the requests count is checked first: it is cheap).
    for window in [w for w, totals in plan.windows.items() if totals.counts[0] == 0 and totals.is_zero()]:
        del plan.windows[window]
    return plan


def _deduplicate(plan: Plan, accepted: list[WindowsRecord], stored: Mapping[EventKey, Coords]) -> None:
    kept: set[EventKey] = set()
    for record in accepted:
        events = record["events"]
        rows: list[int] | None = None
        for i, key in enumerate(zip(events["source"], events["id"], strict=True)):
            prior = stored.get(key)  # never a "failed" row: the store does not count them as stored
            occurrence = (record["topic_id"], record["partition"], record["offset"], events["index"][i])
            failed = events["status"][i] == "failed"
            if key in kept or (prior is not None and (failed or prior != occurrence)):
                if rows is None:
                    rows = list(range(i))
                plan.duplicates += 1
                if events["status"][i] == "counted":
                    _take_back(plan.windows, events, i)
                continue
            if not failed:
                kept.add(key)
            if rows is not None:
                rows.append(i)
        plan.events.append(Kept(record, rows))


def covered(holes: Iterable[tuple[int, int]], first: int, last: int) -> bool:
    """Whether every offset from ``first`` to ``last`` (inclusive) lies in one of ``holes``."""
    position = first
    for start, end in sorted(holes):
        if start <= position <= end:
            position = end + 1
        if position > last:
            return True
    return position > last


def _take_back(windows: dict[WindowKey, Totals], events: AuditColumns, i: int) -> None:
    key = (events["subject"][i], events["provider"][i], events["model"][i], (events["time_us"][i] // 60_000_000) * 60)
    totals = windows[key]
    input_tokens, output_tokens = events["input_tokens"][i], events["output_tokens"][i]
    wired = events["cost_atto"][i]
    cost = None if wired is None else atto(wired)
    values = (
        1,
        input_tokens,
        output_tokens,
        events["cache_read_tokens"][i],
        events["cache_write_tokens"][i],
        events["reasoning_tokens"][i],
        input_tokens + output_tokens,
        1 if cost is None else 0,
    )
    for n, value in enumerate(values):
        totals.counts[n] -= value
    if cost is not None:
        totals.cost_atto -= cost
    if any(count < 0 for count in totals.counts):
        raise AssertionError(
            f"window {key} went negative taking back duplicate {events['source'][i]}/{events['id'][i]}"
        )

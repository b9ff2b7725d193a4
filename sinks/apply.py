"""Which processor outputs to apply, and what they add up to. Pure logic, no I/O.

Exactly-once rests on two checks made here, per batch of windows records:

1. **Offsets.** Each source partition's records are applied in offset order, each once: a record at or
   below the partition's applied offset is a replay (skipped); one beyond the next offset is a gap (skipped
   too: the processor never acknowledges an input before its output, so the missing record will be
   redelivered, and this one with it). The new applied offsets are written with the deltas, atomically.
2. **Event identity.** An event whose (source, id) is already stored from another occurrence (another
   offset, or earlier in this batch) is a duplicate: it is not stored again, and its contribution is taken
   back out of the window deltas the processor computed. An occurrence identical to the stored one is a
   replay of a batch that stored its audit rows and then failed before its deltas: it counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from schemas.money import to_atto
from schemas.records import AuditRow, WindowsRecord

#: (source, id) of an event.
EventKey = tuple[str, str]
#: Where one occurrence of an event came from: (events topic id, partition, offset, index in record).
Coords = tuple[str, int, int, int]
#: (subject, provider, model, window start in epoch seconds).
WindowKey = tuple[str, str, str, int]
#: (events topic id, partition).
Source = tuple[str, int]

_COUNTS: Final = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
    "unpriced_requests",
)


@dataclass(slots=True)
class Totals:
    """Counts (in ``_COUNTS`` order) and cost in atto-dollars of one window."""

    counts: list[int] = field(default_factory=lambda: [0] * len(_COUNTS))
    cost_atto: int = 0

    def is_zero(self) -> bool:
        return self.cost_atto == 0 and not any(self.counts)


@dataclass(slots=True)
class Plan:
    """What one sink batch writes."""

    events: list[tuple[AuditRow, Coords]] = field(default_factory=list)
    windows: dict[WindowKey, Totals] = field(default_factory=dict)
    #: New applied offset of every source partition this batch advances.
    offsets: dict[Source, int] = field(default_factory=dict)
    replays: int = 0
    gaps: int = 0
    duplicates: int = 0


def plan_batch(
    records: Iterable[WindowsRecord],
    applied: Mapping[Source, int],
    lookup: Callable[[list[EventKey]], Mapping[EventKey, Coords]],
) -> Plan:
    """Decide what a batch of windows records writes.

    ``applied`` holds each source partition's applied offset (absent: nothing applied, -1). ``lookup``
    returns, for the keys it is given, where the stored occurrence of each came from (keys never stored
    are absent).
    """
    plan = Plan()
    accepted: list[WindowsRecord] = []
    for record in records:
        source = (record["topic_id"], record["partition"])
        last = plan.offsets.get(source, applied.get(source, -1))
        if record["offset"] <= last:
            plan.replays += 1
        elif record["offset"] != last + 1:
            plan.gaps += 1
        else:
            plan.offsets[source] = record["offset"]
            accepted.append(record)

    for record in accepted:
        for delta in record["windows"]:
            window = (delta["subject"], delta["provider"], delta["model"], delta["window_start"])
            totals = plan.windows.get(window)
            if totals is None:
                totals = plan.windows[window] = Totals()
            for i, name in enumerate(_COUNTS):
                totals.counts[i] += delta[name]  # type: ignore[literal-required]
            totals.cost_atto += to_atto(delta["cost_usd"])

    occurrences = [
        (row, (record["topic_id"], record["partition"], record["offset"], row["index"]))
        for record in accepted
        for row in record["events"]
    ]
    stored = lookup(list(dict.fromkeys((row["source"], row["id"]) for row, _ in occurrences)))
    kept: dict[EventKey, Coords] = {}
    for row, coords in occurrences:
        key = (row["source"], row["id"])
        prior = stored.get(key)
        if key in kept or (prior is not None and prior != coords):
            plan.duplicates += 1
            if row["status"] == "counted":
                _take_back(plan.windows, row)
            continue
        kept[key] = coords
        plan.events.append((row, coords))

    for window in [w for w, totals in plan.windows.items() if totals.is_zero()]:
        del plan.windows[window]
    return plan


def _take_back(windows: dict[WindowKey, Totals], row: AuditRow) -> None:
    key = (row["subject"], row["provider"], row["model"], (row["time_us"] // 60_000_000) * 60)
    totals = windows[key]
    input_tokens, output_tokens = row["input_tokens"], row["output_tokens"]
    values = (
        1,
        input_tokens,
        output_tokens,
        row["cache_read_tokens"],
        row["cache_write_tokens"],
        row["reasoning_tokens"],
        input_tokens + output_tokens,
        1 if row["cost_usd"] is None else 0,
    )
    for i, value in enumerate(values):
        totals.counts[i] -= value
    if row["cost_usd"] is not None:
        totals.cost_atto -= to_atto(row["cost_usd"])
    if any(count < 0 for count in totals.counts):
        raise AssertionError(f"window {key} went negative taking back duplicate {row['source']}/{row['id']}")

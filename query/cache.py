"""Answers of the built-in meters for named subjects, kept until a write may change them.

A dashboard asks the same question again and again (one user's usage over the month, every few seconds),
and each time the storage engine has a fixed cost per query. A kept answer is given again only while no write
has touched its subjects since it was read: the process that writes the windows (the sink) tells, per
subject, a version that changes when a write that may change the subject's windows starts and when it ends
(``Sink.usage_version``). An answer is kept only if the versions of its subjects were the same, and no write
was in flight, before and after it was read; it is given again only while they still are. So a kept answer
is always the answer a query would give at that moment: exact, never stale.

The answer is kept as the rows and as sent (JSON, CSV), rendered once: a kept answer costs the HTTP
request and a dictionary lookup.

Only where the versions are known: in the process that runs the sink, while it holds every windows
partition (elsewhere ``version`` answers None and nothing is kept). Not for user meters (their states are
written for events that have no built-in windows, which the versions do not track) nor for queries without
a subject filter (every subject's version would be needed).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import Counter

from schemas.meters import Meter
from schemas.query import MeterQuery, QueryRow

#: The subjects a kept answer may name (a version is read for each, twice per query).
MAX_SUBJECTS: Final = 20
#: Rows kept in all (the least recently used answers go first) and in one answer.
MAX_ROWS: Final = 200_000
MAX_ANSWER_ROWS: Final = 20_000

ANSWERS = Counter(
    "meterstream_query_cache_answers",
    "Meter queries for named subjects, by whether a kept answer was given (hit) or storage was read (miss)",
    ["outcome"],
)

Version = Callable[[str], Hashable | None]
_Key = tuple[Hashable, ...]


@dataclass(slots=True)
class _Kept:
    versions: tuple[Hashable, ...]
    rows: list[QueryRow]
    #: The answer as sent, by form ("json", "csv"): rendered once.
    rendered: dict[str, bytes | str] = field(default_factory=dict)


class QueryCache:
    """``rows(query, read)``: ``read()``'s answer to ``query``, or the same answer kept from before while no
    write has touched its subjects; ``answer(query, read, form, render)`` the same answer rendered (kept
    rendered too). Thread-safe (queries are answered in worker threads)."""

    def __init__(self, version: Version, max_rows: int = MAX_ROWS) -> None:
        self._version = version
        self._max_rows = max_rows
        self._kept: OrderedDict[_Key, _Kept] = OrderedDict()
        self._rows = 0
        self._lock = threading.Lock()

    def rows(self, query: MeterQuery, read: Callable[[], list[QueryRow]]) -> list[QueryRow]:
        return self._answer(query, read, None, None)[0]

    def answer(
        self,
        query: MeterQuery,
        read: Callable[[], list[QueryRow]],
        form: str,
        render: Callable[[list[QueryRow]], bytes | str],
    ) -> bytes | str:
        rendered = self._answer(query, read, form, render)[1]
        assert rendered is not None
        return rendered

    def _answer(
        self,
        query: MeterQuery,
        read: Callable[[], list[QueryRow]],
        form: str | None,
        render: Callable[[list[QueryRow]], bytes | str] | None,
    ) -> tuple[list[QueryRow], bytes | str | None]:
        subjects = query.include.get("subject", ())
        if not isinstance(query.meter, Meter) or not subjects or len(subjects) > MAX_SUBJECTS:
            return _rendered(read(), form, render)
        before = self._versions(subjects)
        if before is None:
            return _rendered(read(), form, render)
        key = _key(query)
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept.versions == before:
                self._kept.move_to_end(key)
                ANSWERS.labels("hit").inc()
                hit = kept
            else:
                hit = None
        if hit is not None:
            if form is None or render is None:
                return hit.rows, None
            out = hit.rendered.get(form)
            if out is None:  # rendered outside the lock; two threads at once render the same bytes
                out = hit.rendered[form] = render(hit.rows)
            return hit.rows, out
        ANSWERS.labels("miss").inc()
        rows, out = _rendered(read(), form, render)
        # Kept only if no write began or ended while it was read (a write in flight makes a version None).
        if len(rows) <= MAX_ANSWER_ROWS and self._versions(subjects) == before:
            self._keep(key, _Kept(before, rows, {form: out} if form is not None and out is not None else {}))
        return rows, out

    def _versions(self, subjects: Sequence[str]) -> tuple[Hashable, ...] | None:
        versions = tuple(self._version(s) for s in subjects)
        return None if any(v is None for v in versions) else versions

    def _keep(self, key: _Key, kept: _Kept) -> None:
        with self._lock:
            old = self._kept.pop(key, None)
            if old is not None:
                self._rows -= len(old.rows)
            self._kept[key] = kept
            self._rows += len(kept.rows)
            while self._rows > self._max_rows and self._kept:
                _, dropped = self._kept.popitem(last=False)
                self._rows -= len(dropped.rows)


def _rendered(
    rows: list[QueryRow], form: str | None, render: Callable[[list[QueryRow]], bytes | str] | None
) -> tuple[list[QueryRow], bytes | str | None]:
    return rows, (render(rows) if form is not None and render is not None else None)


def _key(query: MeterQuery) -> _Key:
    return (
        query.meter.slug,
        query.start,
        query.end,
        query.window_size,
        query.time_zone,
        query.group_by,
        tuple(sorted(query.include.items())),
        tuple(sorted(query.exclude.items())),
    )

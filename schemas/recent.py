"""A bounded memory of recently seen keys, oldest forgotten first."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class RecentKeys(Generic[K, V]):
    """At most ``capacity`` keys with a value each, and at least the ``capacity // 2`` added last.

    Used only in front of an authoritative check, never as one: forgetting a key costs a lookup, not a
    double count.

    Two generations of plain dicts: keys go into the young one; when it holds half the capacity, the old
    one is dropped whole and the young one becomes old. Not an exact LRU (an ``OrderedDict`` evicting its
    first key on every add): under a steady stream of new keys that one keeps reallocating its tables in
    place, and a process holding one took ~10 capacities' worth of keys (~1,000 s at 2,000 events/s) to
    reach its plateau of memory, which was twice this one's for the same capacity; it also cost ~1 µs more
    per key (BENCHMARKS.md, "Soak").
    """

    def __init__(self, capacity: int) -> None:
        self._generation = capacity // 2
        self._young: dict[K, V] = {}
        self._old: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        if key in self._young:
            return self._young[key]
        return self._old.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._young or key in self._old

    def add(self, key: K, value: V) -> None:
        if self._generation <= 0:
            return
        self._young[key] = value
        if len(self._young) >= self._generation:
            self._old, self._young = self._young, {}

    def add_all(self, items: Iterable[tuple[K, V]]) -> None:
        """``add`` each of ``items`` in turn (the same generations), without a method call per key."""
        if self._generation <= 0:
            return
        young, generation = self._young, self._generation
        for key, value in items:
            young[key] = value
            if len(young) >= generation:
                self._old, self._young = young, {}
                young = self._young

    def clear(self) -> None:
        self._young, self._old = {}, {}

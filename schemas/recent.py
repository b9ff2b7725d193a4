"""A bounded memory of recently seen keys, oldest forgotten first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class RecentKeys(Generic[K, V]):
    """At most ``capacity`` keys with a value each; adding beyond that forgets the oldest.

    Used only in front of an authoritative check, never as one: forgetting a key costs a lookup, not a
    double count.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # OrderedDict, not dict: evicting a plain dict's first key again and again makes finding the first
        # key ever slower (deleted slots pile up in front), O(n) per eviction.
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def add(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def add_all(self, items: Iterable[tuple[K, V]]) -> None:
        for key, value in items:
            self.add(key, value)

    def clear(self) -> None:
        self._items.clear()

"""The query cache's rules (pure logic; the versions are the sink's, tested with it): an answer is given
again only while its subjects' versions are unchanged, and kept only if no write began or ended while it was
read."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from decimal import Decimal

from query.cache import QueryCache
from schemas.meters import UserMeter, find_meter
from schemas.query import MeterQuery, QueryRow

TOKENS = find_meter("tokens_total")
assert TOKENS is not None
T = datetime(2025, 1, 1, tzinfo=UTC)


class Versions:
    def __init__(self) -> None:
        self.of: dict[str, Hashable | None] = {}

    def __call__(self, subject: str) -> Hashable | None:
        return self.of.get(subject, (0, 0))


class Storage:
    def __init__(self) -> None:
        self.reads = 0
        self.value = Decimal(1)
        self.during: list[object] = []

    def read(self) -> list[QueryRow]:
        self.reads += 1
        for action in self.during:
            action()  # type: ignore[operator]
        return [QueryRow(T, T, {"subject": "alice"}, self.value)]


def query(*subjects: str, **kw: object) -> MeterQuery:
    return MeterQuery(meter=TOKENS, include={"subject": subjects}, **kw)


def test_an_answer_is_given_again_until_a_write_touches_its_subject() -> None:
    versions, storage = Versions(), Storage()
    cache = QueryCache(versions)
    q = query("alice")
    assert cache.rows(q, storage.read)[0].value == 1
    assert cache.rows(q, storage.read)[0].value == 1
    assert storage.reads == 1
    versions.of["bob"] = (0, 2)  # another subject's write
    cache.rows(q, storage.read)
    assert storage.reads == 1
    versions.of["alice"] = (0, 2)
    storage.value = Decimal(2)
    assert cache.rows(q, storage.read)[0].value == 2
    assert storage.reads == 2
    versions.of["alice"] = (1, 2)  # a rebalance: a new generation
    cache.rows(q, storage.read)
    assert storage.reads == 3


def test_nothing_is_kept_while_a_write_is_in_flight_or_one_ran_during_the_read() -> None:
    versions, storage = Versions(), Storage()
    cache = QueryCache(versions)
    q = query("alice", "bob")
    versions.of["bob"] = None  # a write touching bob in flight (or the sink cannot tell)
    cache.rows(q, storage.read)
    cache.rows(q, storage.read)
    assert storage.reads == 2
    versions.of["bob"] = (0, 2)
    storage.during = [lambda: versions.of.__setitem__("alice", (0, 4))]  # a write began and ended meanwhile
    cache.rows(q, storage.read)
    storage.during = []
    cache.rows(q, storage.read)
    assert storage.reads == 4  # the answer read during the write was not kept
    cache.rows(q, storage.read)
    assert storage.reads == 4


def test_only_built_in_meters_for_named_subjects_are_kept() -> None:
    storage, cache = Storage(), QueryCache(Versions())
    everyone = MeterQuery(meter=TOKENS)
    user = UserMeter("01J", "u", "u", "x", "COUNT", None, {}, T, T)
    for q in (everyone, MeterQuery(meter=user, include={"subject": ("alice",)}), query(*(f"s{i}" for i in range(21)))):
        cache.rows(q, storage.read)
        cache.rows(q, storage.read)
    assert storage.reads == 6


def test_queries_differing_in_anything_are_kept_apart_and_the_size_is_bounded() -> None:
    storage, cache = Storage(), QueryCache(Versions(), max_rows=2)
    variants = [query("alice"), query("alice", time_zone="Europe/Budapest"), query("alice", start=T)]
    for q in variants:
        cache.rows(q, storage.read)
    assert storage.reads == 3
    cache.rows(variants[2], storage.read)
    cache.rows(variants[1], storage.read)
    assert storage.reads == 3
    cache.rows(variants[0], storage.read)  # the least recently used went first
    assert storage.reads == 4


def test_a_kept_answer_is_rendered_once_per_form() -> None:
    versions, storage = Versions(), Storage()
    cache = QueryCache(versions)
    q = query("alice")
    renders: list[str] = []

    def render(form: str) -> Callable[[list[QueryRow]], str]:
        def out(rows: list[QueryRow]) -> str:
            renders.append(form)
            return f"{form}:{rows[0].value}"

        return out

    assert cache.answer(q, storage.read, "json", render("json")) == "json:1"
    assert cache.answer(q, storage.read, "json", render("json")) == "json:1"
    assert cache.answer(q, storage.read, "csv", render("csv")) == "csv:1"
    assert cache.answer(q, storage.read, "csv", render("csv")) == "csv:1"
    assert (storage.reads, renders) == (1, ["json", "csv"])
    versions.of["alice"] = (0, 2)
    storage.value = Decimal(5)
    assert cache.answer(q, storage.read, "json", render("json")) == "json:5"
    assert (storage.reads, renders) == (2, ["json", "csv", "json"])

"""The processor's pure core: window assignment, aggregation, duplicates, lateness."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from genai_prices import Usage, calc_price

from processors.pricing import Pricer
from processors.windows import WindowPolicy, process_record, window_start_s
from schemas.events import to_micros
from schemas.money import from_atto
from schemas.records import AcceptedEvent, EventsRecord

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = WindowPolicy(allowed_lateness_us=7 * 86400 * 1_000_000)


def accepted(
    i: int, *, time: datetime = T0, subject: str = "alice", late_by: timedelta = timedelta(0), **usage: int
) -> AcceptedEvent:
    event: AcceptedEvent = {
        "id": f"e{i}",
        "source": "app",
        "subject": subject,
        "type": "llm.usage",
        "time_us": to_micros(time),
        "received_us": to_micros(time + late_by),
        "data": f'{{"n": {i}}}',
        "provider": "openai",
        "model": "gpt-4o-mini",
        "usage": usage or {"input_tokens": 1000, "output_tokens": 500},
    }
    return event


def run(*events: AcceptedEvent, known: set[tuple[str, str]] | None = None) -> Any:
    record: EventsRecord = {"v": 1, "events": list(events)}
    return process_record(record, topic_id="T", partition=2, offset=41, policy=POLICY, pricer=Pricer(), known=known)


def test_window_start_is_the_utc_minute() -> None:
    assert window_start_s(to_micros(datetime(2026, 3, 1, 12, 0, 59, 999999, tzinfo=UTC))) == int(
        datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()
    )
    assert window_start_s(to_micros(datetime(2026, 3, 1, 12, 1, tzinfo=UTC))) % 60 == 0
    assert window_start_s(0) == 0


def test_events_of_one_window_are_summed() -> None:
    out = run(
        accepted(1, input_tokens=100, output_tokens=10, cache_read_tokens=40),
        accepted(2, time=T0 + timedelta(seconds=59), input_tokens=200, output_tokens=20, output_reasoning_tokens=5),
        accepted(3, time=T0 + timedelta(seconds=60)),
    )
    assert out.windows["topic_id"] == "T" and out.windows["partition"] == 2 and out.windows["offset"] == 41
    first, second = sorted(out.windows["windows"], key=lambda w: w["window_start"])
    assert first["requests"] == 2 and second["requests"] == 1
    assert (first["input_tokens"], first["output_tokens"], first["cache_read_tokens"], first["reasoning_tokens"]) == (
        300,
        30,
        40,
        5,
    )
    assert first["total_tokens"] == 330
    expected = sum(
        calc_price(Usage(**u), "gpt-4o-mini", provider_id="openai", genai_request_timestamp=T0).total_price
        for u in (
            {"input_tokens": 100, "output_tokens": 10, "cache_read_tokens": 40},
            {"input_tokens": 200, "output_tokens": 20, "output_reasoning_tokens": 5},
        )
    )
    assert from_atto(first["cost_atto"]) == expected
    assert out.windows["events"]["status"] == ["counted"] * 3


def test_subjects_get_their_own_windows() -> None:
    out = run(accepted(1, subject="a"), accepted(2, subject="b"))
    assert sorted(w["subject"] for w in out.windows["windows"]) == ["a", "b"]


def test_duplicates_inside_a_record_and_known_keys_are_dropped() -> None:
    out = run(accepted(1), accepted(1), accepted(2), known={("app", "e2")})
    assert out.duplicates == 2
    assert [w["requests"] for w in out.windows["windows"]] == [1]
    assert out.keys == [("app", "e1")]


def test_late_events_are_dead_lettered_not_counted() -> None:
    out = run(accepted(1, late_by=timedelta(days=7, seconds=1)), accepted(2, late_by=timedelta(days=6)))
    assert [w["requests"] for w in out.windows["windows"]] == [1]
    assert [letter["event"]["id"] for letter in out.dead_letters] == ["e1"]
    assert out.windows["events"]["status"] == ["late", "counted"]


def test_unknown_model_counts_tokens_but_no_cost() -> None:
    event = accepted(1)
    event["model"] = "my-private-model"
    out = run(event)
    (window,) = out.windows["windows"]
    assert window["requests"] == 1 and window["unpriced_requests"] == 1 and window["input_tokens"] == 1000
    assert window["cost_atto"] == 0
    audit = out.windows["events"]
    assert audit["cost_atto"] == [None] and "no price known" in audit["price_source"][0]


def test_other_types_are_stored_but_not_metered() -> None:
    event = accepted(1)
    event["type"] = "page.view"
    del event["usage"]
    out = run(event)
    assert out.windows["windows"] == []
    assert out.windows["events"]["status"] == ["not_metered"]


def test_costs_past_64_bits_of_atto_dollars_travel_exactly() -> None:
    """A call costing USD 20 (2e19 atto-dollars), and three of USD 7 in one window (each fits in 64 bits,
    their sum does not): the record is written (orjson cannot write such integers) and read back exact."""
    from decimal import Decimal

    from schemas.records import BIG_AMOUNTS_VERSION, RECORD_VERSION, atto, decode_windows, encode
    from sinks.apply import plan_batch

    def price(tokens: int) -> Decimal:
        return calc_price(
            Usage(output_tokens=tokens), "gpt-4o", provider_id="openai", genai_request_timestamp=T0
        ).total_price

    big = [accepted(1, subject="big", output_tokens=2_000_000, input_tokens=0)]
    three = [accepted(i, subject="three", output_tokens=700_000, input_tokens=0) for i in (2, 3, 4)]
    for events in (big, three):
        for e in events:
            e["model"] = "gpt-4o"
        out = run(*events)
        assert out.windows["v"] == BIG_AMOUNTS_VERSION
        back = decode_windows(encode(out.windows))
        (window,) = back["windows"]
        assert from_atto(atto(window["cost_atto"])) == price(2_000_000 if events is big else 700_000) * len(events)
        costs = [from_atto(atto(c)) for c in back["events"]["cost_atto"] if c is not None]
        assert costs == [price(2_000_000 if events is big else 700_000)] * len(events)
        plan = plan_batch([back], {("T", 2): 40}, lambda keys: {}, {})
        (totals,) = plan.windows.values()
        assert from_atto(totals.cost_atto) == sum(costs, Decimal(0))
    # Every other record keeps the first version, readable by readers that know no other.
    assert run(accepted(5)).windows["v"] == RECORD_VERSION == 1

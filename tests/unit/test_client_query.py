"""The client's usage query helper: one query per meter, merged into typed windows, values exact."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import httpx
import meterstream_client as mc
import pytest

DAY1 = ("2025-03-01T00:00:00-05:00", "2025-03-02T00:00:00-05:00")
DAY2 = ("2025-03-02T00:00:00-05:00", "2025-03-03T00:00:00-05:00")


def row(value: str, window: tuple[str, str], model: str | None = None) -> str:
    group = f'{{"model":"{model}"}}' if model else "{}"
    return (
        f'{{"value":{value},"windowStart":"{window[0]}","windowEnd":"{window[1]}","subject":"alice","groupBy":{group}}}'
    )


# Meter -> rows, as the server writes them (numbers exact, never through a float).
ANSWERS = {
    "requests": [row("2", DAY1, "gpt-4o"), row("1", DAY2, "gpt-4o"), row("1", DAY2, "claude-haiku-4-5")],
    "input_tokens": [row("3000", DAY1, "gpt-4o"), row("10", DAY2, "gpt-4o"), row("7", DAY2, "claude-haiku-4-5")],
    "output_tokens": [row("12", DAY1, "gpt-4o"), row("1", DAY2, "gpt-4o"), row("9", DAY2, "claude-haiku-4-5")],
    "cache_read_tokens": [row("1024", DAY1, "gpt-4o")],
    "cache_write_tokens": [],
    "reasoning_tokens": [],
    "tokens_total": [row("3012", DAY1, "gpt-4o"), row("11", DAY2, "gpt-4o"), row("16", DAY2, "claude-haiku-4-5")],
    "cost_usd": [
        row("0.006040000000000001", DAY1, "gpt-4o"),
        row("0.000000075", DAY2, "gpt-4o"),
        row("0.0000520", DAY2, "claude-haiku-4-5"),
    ],
    "unpriced_requests": [row("0", DAY1, "gpt-4o"), row("0", DAY2, "gpt-4o"), row("0", DAY2, "claude-haiku-4-5")],
}


def serve(seen: list[httpx.Request], status: int = 200) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        meter = request.url.path.split("/")[-2]
        if status != 200:
            return httpx.Response(status, json={"status": status, "detail": "no"})
        return httpx.Response(200, text='{"windowSize":"DAY","data":[' + ",".join(ANSWERS[meter]) + "]}")

    return httpx.MockTransport(handle)


def expected() -> list[mc.UsageWindow]:
    d1 = (datetime.fromisoformat(DAY1[0]), datetime.fromisoformat(DAY1[1]))
    d2 = (datetime.fromisoformat(DAY2[0]), datetime.fromisoformat(DAY2[1]))
    return [
        mc.UsageWindow(*d1, "alice", "gpt-4o", 2, 3000, 12, 1024, 0, 0, 3012, Decimal("0.006040000000000001"), 0),
        mc.UsageWindow(*d2, "alice", "claude-haiku-4-5", 1, 7, 9, 0, 0, 0, 16, Decimal("0.0000520"), 0),
        mc.UsageWindow(*d2, "alice", "gpt-4o", 1, 10, 1, 0, 0, 0, 11, Decimal("0.000000075"), 0),
    ]


def test_query_usage_merges_every_meter_exactly() -> None:
    seen: list[httpx.Request] = []
    meter = mc.MeterstreamClient("http://meterstream.test", transport=serve(seen))
    windows = meter.query_usage(
        "alice",
        window="DAY",
        start=datetime(2025, 3, 1, 5, tzinfo=UTC),
        end=datetime(2025, 3, 3, 5, tzinfo=UTC),
        time_zone="America/New_York",
        by_model=True,
    )
    meter.close()
    assert windows == expected()
    assert str(windows[0].cost_usd) == "0.006040000000000001", "not rounded through a float"
    assert sorted(r.url.path for r in seen) == sorted(f"/api/v1/meters/{m}/query" for m in ANSWERS)
    assert {tuple(r.url.params.multi_items()) for r in seen} == {
        (
            ("subject", "alice"),
            ("windowTimeZone", "America/New_York"),
            ("windowSize", "DAY"),
            ("from", "2025-03-01T05:00:00.000000Z"),
            ("to", "2025-03-03T05:00:00.000000Z"),
            ("groupBy", "model"),
        )
    }


async def test_async_query_usage() -> None:
    seen: list[httpx.Request] = []
    async with mc.AsyncMeterstreamClient("http://meterstream.test", transport=serve(seen)) as meter:
        assert await meter.query_usage("alice", window="MONTH", by_model=True) == expected()
    assert all(r.url.params["windowSize"] == "MONTH" for r in seen) and len(seen) == len(ANSWERS)


def test_query_without_window_or_model() -> None:
    seen: list[httpx.Request] = []
    meter = mc.MeterstreamClient("http://meterstream.test", transport=serve(seen))
    meter.query_usage("alice", window=None)
    meter.close()
    assert all("windowSize" not in r.url.params and "groupBy" not in r.url.params for r in seen)


def test_query_errors_raise() -> None:
    meter = mc.MeterstreamClient("http://meterstream.test", transport=serve([], status=400))
    with pytest.raises(httpx.HTTPStatusError):
        meter.query_usage("alice")
    with pytest.raises(ValueError, match="window"):
        meter.query_usage("alice", window="WEEK")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="after"):
        meter.query_usage("alice", start=datetime(2025, 1, 2, tzinfo=UTC), end=datetime(2025, 1, 1, tzinfo=UTC))
    meter.close()

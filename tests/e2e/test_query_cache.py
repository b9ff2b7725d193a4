"""A dashboard's repeated query is answered from the kept answer, and never stale: every event stored for the
subject shows in the very next answer, while a load for other subjects keeps the sink writing."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from tests.helpers.events import post_batch
from tests.helpers.stack import LocalStack

pytestmark = pytest.mark.e2e

UTC = dt.UTC


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("query-cache") / "data").start()
    yield stack
    stack.stop()


def event(event_id: str, subject: str, tokens: int) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "dashboard-test",
        "type": "llm.usage",
        "subject": subject,
        "time": (dt.datetime.now(UTC) - dt.timedelta(seconds=5)).isoformat().replace("+00:00", "Z"),
        "data": {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": tokens, "output_tokens": 0},
    }


def hits(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith('meterstream_query_cache_answers_total{outcome="hit"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_repeated_query_is_kept_and_never_stale(stack: LocalStack) -> None:
    url = stack.url
    params = [("subject", "dash"), ("windowSize", "HOUR"), ("groupBy", "model"), ("from", "2020-01-01T00:00:00Z")]

    def total() -> Decimal:
        r = httpx.get(f"{url}/api/v1/meters/tokens_total/query", params=params, timeout=30)
        assert r.status_code == 200, r.text
        return sum((Decimal(str(row["value"])) for row in r.json()["data"]), Decimal(0))

    stop = threading.Event()

    def others() -> None:  # other subjects' events: writes go on, and must not be mistaken for this one's
        i = 0
        while not stop.is_set():
            post_batch(url, [event(f"other-{i}-{j}", f"other-{j}", 1) for j in range(20)])
            i += 1
            time.sleep(0.05)

    background = threading.Thread(target=others)
    background.start()
    try:
        expected = Decimal(0)
        for n in range(1, 16):
            post_batch(url, [event(f"dash-{n}", "dash", n)])
            expected += n
            deadline = time.monotonic() + 30
            while (got := total()) != expected:
                assert got < expected, (got, expected)  # never more than was sent
                assert time.monotonic() < deadline, (got, expected)
                time.sleep(0.05)
            before = hits(url)
            for _ in range(5):  # the dashboard refreshing, nothing new for this subject
                assert total() == expected
        assert hits(url) > before  # the refreshes were answered from the kept answer
    finally:
        stop.set()
        background.join()
    assert total() == expected

"""A gap in a partition's offset chain, on the real topology (issue 19 item 1).

Before: the sink skipped a windows record ahead of a missing offset *and* committed past it, so a missing
record that never came lost every later record of its source partition with only a counter to show. Now
the partition is held (nothing committed past the record), the sink turns not-ready with the offsets
named once the gap outlives ``gap_wait_s``, a kill -9 meanwhile loses and doubles nothing, and
``meterstream accept-gap`` records the hole, after which the sink goes on and reconcile lists it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import Producer

from tests.e2e.test_faults import metric
from tests.helpers.load import Load, assert_exact, query, wait_until_stored
from tests.helpers.stack import BIN, MultiProcessStack

pytestmark = pytest.mark.e2e

LOST = "a-recreated-events-topic"  # a source whose offsets 0..4 are gone (say, retention removed them)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[MultiProcessStack]:
    yield from MultiProcessStack(tmp_path / "stack", extra_env={"METERSTREAM_SINK_GAP_WAIT_S": "2"}).running()


def orphan_record() -> bytes:
    """A processor output for offset 5 of LOST's partition 0: one counted request of subject "ghost"."""
    now_us = int(time.time() * 1_000_000)
    minute = now_us // 60_000_000 * 60
    counts = dict.fromkeys(
        ["input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens"], 0
    )
    audit = {
        "index": [0],
        "id": ["ghost-1"],
        "source": ["gap-test"],
        "subject": ["ghost"],
        "type": ["llm.usage"],
        "time_us": [now_us],
        "received_us": [now_us],
        "data": ["{}"],
        "provider": ["openai"],
        "model": ["gpt-4o-mini"],
        **{name: [0] for name in counts},
        "usage": ["{}"],
        "cost_atto": [0],
        "cost_input_atto": [0],
        "cost_output_atto": [0],
        "price_source": ["test"],
        "status": ["counted"],
    }
    delta = {"subject": "ghost", "provider": "openai", "model": "gpt-4o-mini", "window_start": minute}
    delta |= counts | {"requests": 1, "total_tokens": 0, "cost_atto": 0, "unpriced_requests": 0}
    record = {"v": 1, "topic_id": LOST, "partition": 0, "offset": 5, "windows": [delta], "events": audit}
    return orjson.dumps(record)


def rfc3339(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def readiness(stack: MultiProcessStack) -> tuple[int, str]:
    try:
        response = httpx.get(f"{stack.query_url}/readyz", timeout=10)
    except httpx.HTTPError as exc:
        return 0, str(exc)
    return response.status_code, response.text


def until(condition: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.2)


def ghost_requests(stack: MultiProcessStack) -> int:
    return int(sum(query(stack.query_url, "requests", [("subject", "ghost")]).values()))


def test_a_gap_holds_blocks_visibly_survives_a_kill_and_is_accepted(stack: MultiProcessStack) -> None:
    assert stack.sink is not None
    load = Load(stack.ingest_url, seed=31, batch=50)
    load.run(5)
    producer = Producer({"bootstrap.servers": stack.broker.bootstrap})
    producer.produce("meterstream.windows", orphan_record(), partition=0)
    assert producer.flush(10) == 0
    load.run(5)  # the held partition still applies the other sources' records behind the orphan
    wait_until_stored(stack.query_url, len(load.sent))

    until(lambda: readiness(stack)[0] == 503)
    _, body = readiness(stack)
    assert LOST in body and "first missing offset 0" in body, body
    assert metric(stack.query_url, "meterstream_sink_blocked_partitions") == 1
    assert ghost_requests(stack) == 0

    # kill -9 while held: the restart reads again from the held record (never committed past), skips
    # what it had applied, and holds again. Nothing lost, nothing doubled.
    stack.sink.kill()
    stack.sink.start()
    until(lambda: readiness(stack)[0] == 503 and LOST in readiness(stack)[1])
    load.run(3)
    wait_until_stored(stack.query_url, len(load.sent))
    assert_exact(stack.query_url, load.sent)  # every meter, every subject and model: nothing lost or doubled
    assert ghost_requests(stack) == 0

    accepted = subprocess.run(
        [
            str(BIN / "meterstream"),
            "accept-gap",
            "--url",
            stack.query_url,
            "--topic-id",
            LOST,
            "--partition",
            "0",
            "--first",
            "0",
            "--last",
            "4",
            "--reason",
            "events topic recreated; offsets 0-4 expired",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert accepted.returncode == 0, accepted.stderr
    until(lambda: readiness(stack)[0] == 200)
    until(lambda: ghost_requests(stack) == 1)
    assert metric(stack.query_url, "meterstream_sink_blocked_partitions") == 0
    wait_until_stored(stack.query_url, len(load.sent) + 1)  # the load's events and the ghost's, each once
    now = time.time()
    response = httpx.get(
        f"{stack.query_url}/api/v1/admin/reconcile",
        params={"from": rfc3339(now - 86400), "to": rfc3339(now + 3600)},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["differences"] == []
    (gap,) = report["acceptedGaps"]
    assert (gap["topicId"], gap["partition"], gap["firstOffset"], gap["lastOffset"]) == (LOST, 0, 0, 4)
    assert "recreated" in gap["reason"]

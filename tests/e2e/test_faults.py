"""Exactness under crashes: processes of the production topology killed with SIGKILL at chosen moments
(the sink in the middle of a write, every process before a resend, local mode mid-stream) or stopped with
SIGTERM, while clients keep sending and retrying. Each scenario ends with every answer equal to the ground
truth and a reconciliation report with zero differences. Random kills of every process, over and over,
are tests/e2e/test_chaos.py."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.load import Load, assert_exact, wait_until_stored
from tests.helpers.stack import MultiProcessStack

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[MultiProcessStack]:
    stack = MultiProcessStack(tmp_path / "stack")
    yield from stack.running()


def finish(stack: MultiProcessStack, load: Load) -> None:
    load.stop()
    assert not load.errors, load.errors
    try:
        wait_until_stored(stack.query_url, len(load.sent))
        assert_exact(stack.query_url, load.sent)
    except AssertionError:
        print(stack.logs())
        raise


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_sink_killed_mid_write(stack: MultiProcessStack) -> None:
    load = Load(stack.ingest_url, seed=2)
    load.start()
    assert stack.sink is not None
    for _ in range(3):
        # Kill right after a batch starts being written (a new batch-latency observation is pending).
        time.sleep(1.0)
        before = metric(stack.query_url, "meterstream_sink_batch_seconds_count")
        deadline = time.monotonic() + 10
        while metric(stack.query_url, "meterstream_sink_batch_seconds_count") == before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.6))
        stack.sink.kill()
        stack.restart(stack.sink)
    finish(stack, load)


def test_sigterm_drains_every_process(stack: MultiProcessStack) -> None:
    """A graceful stop (SIGTERM) of each process in turn, under load: in-flight requests are answered,
    the producer is flushed, the sink writes its batch; every process exits 0 and nothing is lost."""
    load = Load(stack.ingest_url, seed=4)
    load.start()
    assert stack.ingest is not None and stack.sink is not None
    for service in (stack.ingest, stack.processors[0], stack.sink):
        time.sleep(1.5)
        assert service.stop() == 0, service.log()[-2000:]
        stack.restart(service)
    finish(stack, load)


def test_events_resent_after_every_process_restarted_count_once(stack: MultiProcessStack) -> None:
    """Every in-memory cache is gone after restarts; the audit log still knows the events."""
    load = Load(stack.ingest_url, seed=6, batch=50)
    load.run(20)
    wait_until_stored(stack.query_url, len(load.sent))
    assert stack.ingest is not None and stack.sink is not None
    for service in (stack.ingest, stack.processors[0], stack.sink):
        service.stop()
        stack.restart(service)
    duplicate = Load(stack.ingest_url, seed=6, batch=50)  # the same seed: the very same events again
    duplicate.run(20)
    assert [e.id for e in duplicate.sent] == [e.id for e in load.sent]
    time.sleep(3)
    assert_exact(stack.query_url, load.sent)
    assert metric(stack.query_url, "meterstream_sink_duplicates_total") == len(load.sent)


def test_two_ingest_worker_processes(tmp_path: Path) -> None:
    stack = MultiProcessStack(tmp_path / "stack", extra_env={"METERSTREAM_INGEST_WORKERS": "2"})
    stack.start()
    try:
        load = Load(stack.ingest_url, seed=8)
        load.start()
        time.sleep(4)
        assert stack.ingest is not None
        assert stack.ingest.stop() == 0, stack.ingest.log()[-2000:]  # SIGTERM reaches both workers, which drain
        stack.restart(stack.ingest)
        finish(stack, load)
    finally:
        stack.stop()


def test_local_mode_killed_mid_stream_resumes_on_the_same_broker(tmp_path: Path) -> None:
    """`meterstream up` killed with SIGKILL under load: its broker (a session of its own) survives, and the
    next `meterstream up` picks it up again, so nothing acknowledged is lost and nothing is doubled."""
    from tests.helpers.stack import LocalStack

    stack = LocalStack(tmp_path / "data").start()
    try:
        broker_pid = stack.broker_pid()
        load = Load(stack.url, seed=9)
        load.start()
        time.sleep(3)
        stack.kill()
        time.sleep(1)
        stack.start()
        assert stack.broker_pid() == broker_pid, "the broker should have been reused"
        time.sleep(2)
        load.stop()
        assert not load.errors, load.errors
        wait_until_stored(stack.url, len(load.sent))
        assert_exact(stack.url, load.sent)
    finally:
        stack.stop()
        stack.kill_broker()

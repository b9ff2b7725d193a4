"""Outages: ClickHouse failing for 20 s (its disk full), the broker unreachable; ingest keeps its promises,
the sink retries, and afterwards nothing is lost or doubled."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.e2e.test_faults import finish, metric
from tests.helpers.load import Load
from tests.helpers.stack import MultiProcessStack

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def small_disk(path: Path, size_mb: int) -> Iterator[None]:
    """A tmpfs of ``size_mb`` at ``path``: a disk that can be filled up for real."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs to simulate a full disk (needs root): {mounted.stderr.decode()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Fill the file system of ``path`` to the last byte."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def test_clickhouse_failing_for_20s_loses_and_doubles_nothing(tmp_path: Path) -> None:
    base = tmp_path / "stack"
    with small_disk(base / "clickhouse", 512):
        stack = MultiProcessStack(base)
        stack.start()
        try:
            load = Load(stack.ingest_url, seed=21)
            load.start(pause_s=0.05)
            time.sleep(3)
            filler = fill(base / "clickhouse")
            failures_before = metric(stack.query_url, "meterstream_sink_write_failures_total")
            accepted_before = load.requests
            time.sleep(20)
            # Storage was failing the whole time, yet ingest kept accepting.
            assert metric(stack.query_url, "meterstream_sink_write_failures_total") > failures_before
            assert metric(stack.query_url, "meterstream_sink_storage_up") == 0
            assert load.requests > accepted_before + 20
            filler.unlink()
            finish(stack, load)
            assert metric(stack.query_url, "meterstream_sink_storage_up") == 1
        finally:
            stack.stop()


def test_broker_unreachable_is_503_and_loses_nothing(tmp_path: Path) -> None:
    stack = MultiProcessStack(tmp_path / "stack")
    stack.start()
    try:
        load = Load(stack.ingest_url, seed=22)
        load.start(pause_s=0.05)
        time.sleep(3)
        # The broker stops answering (a partition, a stuck node): paused, not killed, so what it
        # acknowledged is still there when it comes back, as with a replicated Kafka cluster.
        os.kill(stack.broker.pid, signal.SIGSTOP)
        try:
            # Not metered: a 503 promises nothing either way, and this probe may well be stored once the
            # broker wakes up (its request can be in flight); it must not disturb the totals checked below.
            event = {"specversion": "1.0", "id": "during-outage", "source": "probe", "type": "probe", "subject": "p"}
            started = time.monotonic()
            response = httpx.post(
                f"{stack.ingest_url}/api/v1/events",
                content=orjson.dumps(event),
                headers={"Content-Type": "application/cloudevents+json"},
                timeout=30,
            )
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) > 0
            assert response.headers["Content-Type"] == "application/problem+json"
            assert response.json()["status"] == 503
            assert time.monotonic() - started < 10
            assert httpx.get(f"{stack.ingest_url}/readyz", timeout=10).status_code == 503
            time.sleep(5)
        finally:
            os.kill(stack.broker.pid, signal.SIGCONT)
        finish(stack, load)
    finally:
        stack.stop()

"""Chaos: the production topology (ingest, two processors, sink) under steady load for a minute while a loop
kills a random process with SIGKILL every few seconds and restarts it. At the end every answer equals the
ground truth and reconciliation reports no difference (issue 19 item 8).

It replaces the one-kill-at-a-time tests of the processor, of ingest while clients retry, and of one of two
processors sharing the partitions: each of those kills happens here several times, in random order and at
random moments, overlapping the recovery of the one before."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_faults import finish, metric
from tests.helpers.load import Load
from tests.helpers.stack import MultiProcessStack, Service

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: How long the kills go on (the issue asks for at least 60 s); CHAOS_SECONDS lengthens a local run.
DURATION_S = float(os.environ.get("CHAOS_SECONDS", "60"))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[MultiProcessStack]:
    yield from MultiProcessStack(tmp_path / "stack").running(processors=2)


def test_random_kill_9_of_every_process_for_a_minute_loses_and_doubles_nothing(stack: MultiProcessStack) -> None:
    assert stack.ingest is not None and stack.sink is not None
    seed = int(os.environ.get("CHAOS_SEED", "19"))
    rng = random.Random(seed)
    loads = [Load(stack.ingest_url, seed=seed + i, source=f"chaos-{i}", batch=100) for i in range(2)]
    for load in loads:
        load.start(pause_s=0.05)
    victims: dict[str, Service] = {"ingest": stack.ingest, "sink": stack.sink}
    victims |= {f"processor-{i}": p for i, p in enumerate(stack.processors)}
    killed: list[str] = []
    deadline = time.monotonic() + DURATION_S
    order: list[str] = []
    restarts_s: list[float] = []
    # Rounds: every process once per round, in a random order. A round started is finished even past the
    # deadline, so each process is killed at least once however slow the machine's restarts are.
    while time.monotonic() < deadline or order:
        if not order:
            order = rng.sample(sorted(victims), len(victims))
        name = order.pop()
        time.sleep(rng.uniform(1.0, 4.0))
        victims[name].kill()
        killed.append(name)
        time.sleep(rng.uniform(0.0, 1.0))
        started = time.monotonic()
        stack.restart(victims[name])
        restarts_s.append(time.monotonic() - started)
    for load in loads[1:]:
        load.stop()
        loads[0].sent.extend(load.sent)
        loads[0].errors.extend(load.errors)
    assert set(killed) == set(victims), killed
    assert sum(load.retries for load in loads) > 0, "killing ingest should have made clients retry"
    print(
        f"chaos (seed {seed}): {len(killed)} kills: {killed}; {len(loads[0].sent)} events;"
        f" restarts took {', '.join(f'{s:.1f}' for s in restarts_s)} s"
    )
    finish(stack, loads[0])
    # Nothing held back behind a gap either: the sink applied every record it was given.
    assert metric(stack.query_url, "meterstream_sink_blocked_partitions") == 0

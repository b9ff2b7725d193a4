"""HTTP load generator for ``POST /api/v1/events``, in processes of its own so it is not the bottleneck.

Each worker process runs an asyncio loop (uvloop when installed) over raw HTTP/1.1 keep-alive
connections: request bodies are pre-encoded templates whose event ids are filled in per request (every
event is new, so none is dropped by ingest's duplicate cache), the response is read with a minimal parser.
Two modes:

* closed loop (``rate=None``): ``concurrency`` connections, each sending its next request as soon as the
  previous one is answered: the maximum throughput at that concurrency;
* open loop (``rate`` requests/s): requests are sent on a fixed schedule over ``concurrency`` connections
  and latency is measured from the *scheduled* time, so a stall is not hidden by the client waiting
  (no coordinated omission).

Only answers given after the warm-up count (latency: only requests sent after it). Each worker reports its own CPU use.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult
from typing import Any

from bench.events import BodyTemplate, body_templates

PATH = "/api/v1/events"


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    events_per_request: int
    concurrency: int
    duration_s: float
    #: Requests per second over all workers (open loop), or None for closed loop.
    rate: float | None = None
    workers: int = 1
    warmup_s: float = 1.0
    subjects: int = 1000
    seed: int = 1
    #: Distinct bodies pre-encoded per worker (rotated; ids differ on every request).
    templates: int = 32
    #: Prefix of event ids (unique per run, so that reruns against the same stack are new events).
    id_prefix: str = "b"
    #: An API key sent as ``Authorization: Bearer <key>`` on every request (None: no header).
    api_key: str | None = None


@dataclass
class LoadResult:
    requests_ok: int = 0
    requests_failed: int = 0
    events_ok: int = 0
    measured_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    #: CPU of the client processes, in cores.
    client_cpu_cores: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.events_ok / self.measured_s if self.measured_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests_ok / self.measured_s if self.measured_s else 0.0

    def merge(self, other: LoadResult) -> None:
        self.requests_ok += other.requests_ok
        self.requests_failed += other.requests_failed
        self.events_ok += other.events_ok
        self.measured_s = max(self.measured_s, other.measured_s)
        self.latencies_s.extend(other.latencies_s)
        self.client_cpu_cores += other.client_cpu_cores
        for status, n in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n
        self.errors.extend(other.errors[:5])


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.find(b"\r\n", at + 2)
        length = int(lower[at + 17 : end].strip())
    body = await reader.readexactly(length) if length else b""
    return status, body


class _Bodies:
    """Rotates through the templates, giving each request fresh ids."""

    def __init__(self, templates: list[BodyTemplate], host: str, prefix: str, api_key: str | None = None) -> None:
        self._templates = templates
        self._host = host.encode() + (b"\r\nAuthorization: Bearer " + api_key.encode() if api_key else b"")
        self._prefix = prefix.encode()
        self._seq = 0
        self._next = 0

    def next_request(self) -> bytes:
        template = self._templates[self._next % len(self._templates)]
        self._next += 1
        seq = self._seq
        self._seq += template.events
        prefix = self._prefix
        body = template.render([b"%s-%d" % (prefix, i) for i in range(seq, seq + template.events)])
        head = (
            b"POST "
            + PATH.encode()
            + b" HTTP/1.1\r\nHost: "
            + self._host
            + b"\r\nContent-Type: "
            + template.content_type.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        return head + body


async def _worker_main(spec: LoadSpec, index: int, start_wall: float) -> LoadResult:
    templates = body_templates(spec.templates, spec.events_per_request, subjects=spec.subjects, seed=spec.seed + index)
    bodies = _Bodies(templates, spec.host, f"{spec.id_prefix}{index}", spec.api_key)
    connections = max(1, spec.concurrency // spec.workers + (1 if index < spec.concurrency % spec.workers else 0))
    streams = [await asyncio.open_connection(spec.host, spec.port) for _ in range(connections)]
    result = LoadResult()
    loop_start = time.perf_counter() + (start_wall - time.time())
    measure_from = loop_start + spec.warmup_s
    end = measure_from + spec.duration_s
    await asyncio.sleep(max(0.0, loop_start - time.perf_counter()))
    cpu_start = _cpu_s()

    def done(status: int, body: bytes, sent_at: float, answered: float) -> None:
        # Throughput counts the answers given inside the window; latency, the requests sent inside it.
        if answered < measure_from or answered > end:
            return
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status == 204:
            result.requests_ok += 1
            result.events_ok += spec.events_per_request
            if sent_at >= measure_from:
                result.latencies_s.append(answered - sent_at)
        else:
            result.requests_failed += 1
            if len(result.errors) < 5:
                result.errors.append(f"{status}: {body[:300]!r}")

    if spec.rate is None:

        async def closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while (now := time.perf_counter()) < end:
                writer.write(bodies.next_request())
                status, body = await _read_response(reader)
                done(status, body, now, time.perf_counter())

        await asyncio.gather(*(closed(r, w) for r, w in streams))
    else:
        idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        for stream in streams:
            idle.put_nowait(stream)
        interval = spec.workers / spec.rate
        tasks: set[asyncio.Task[None]] = set()

        async def one(scheduled: float) -> None:
            reader, writer = await idle.get()
            try:
                writer.write(bodies.next_request())
                status, body = await _read_response(reader)
                done(status, body, scheduled, time.perf_counter())
            finally:
                idle.put_nowait((reader, writer))

        i = 0
        while (scheduled := loop_start + i * interval) < end:
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(tasks, timeout=30)
    elapsed = max(1e-9, time.perf_counter() - loop_start)
    result.client_cpu_cores = (_cpu_s() - cpu_start) / elapsed
    result.measured_s = spec.duration_s
    for _, writer in streams:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return result


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_worker(spec: LoadSpec, index: int, start_wall: float) -> LoadResult:
    # No cyclic garbage collection in the load generator: its collections stop its event loop for
    # milliseconds, and every request in flight then looks that much slower. Measured against a server that
    # answers at once, at 1,000 requests/s: p99 13.6-15.3 ms with collections, 1.9-2.9 ms without. A worker
    # lives for one run; what it allocates is freed by reference counting.
    gc.collect()
    gc.disable()
    run: Callable[..., Any] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    try:
        result: LoadResult = run(_worker_main(spec, index, start_wall))
    except Exception as exc:  # reported, not raised: the harness decides what a failed run means
        result = LoadResult(errors=[f"load worker {index}: {type(exc).__name__}: {exc}"])
    return result


class Load:
    """Runs a :class:`LoadSpec` in worker processes; ``start()`` returns at once, ``join()`` gathers."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self._pool: Any = None
        self._pending: list[AsyncResult[LoadResult]] = []

    def start(self, lead_s: float = 1.5) -> Load:
        """Start the workers; they begin sending ``lead_s`` from now (time to build their bodies)."""
        context = multiprocessing.get_context("spawn")
        self._pool = context.Pool(self.spec.workers)
        start_wall = time.time() + lead_s
        self._pending = [
            self._pool.apply_async(_run_worker, (self.spec, i, start_wall)) for i in range(self.spec.workers)
        ]
        return self

    def pids(self) -> list[int]:
        return [p.pid for p in self._pool._pool] if self._pool is not None else []

    def join(self) -> LoadResult:
        total = LoadResult()
        timeout = self.spec.duration_s + self.spec.warmup_s + 120
        for pending in self._pending:
            total.merge(pending.get(timeout))
        self._pool.close()
        self._pool.join()
        return total


def run_load(spec: LoadSpec) -> LoadResult:
    return Load(spec).start().join()

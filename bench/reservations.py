"""The reservations scenario's clients, each run in a process of its own (spawned, so it competes for the
CPU like any other client and not for the bench's GIL):

* :func:`paced` — Meterstream's API at a fixed rate (open loop): reservation ``i`` is due at
  ``start + i / rate``, on the subjects in turn, its reserve latency is measured from that
  due time (a stall is not hidden by the client waiting: no coordinated omission), and as soon as it is
  held it is committed with its actual usage on the same connection (the commit's latency from its send);
* :func:`closed` — N clients, each reserving and releasing as fast as it is answered (saturation);
* :func:`naive_paced` / :func:`naive_closed` — the same, on the pattern an application writes by hand in
  plain PostgreSQL: a ``(subject, used, lim)`` table, check-then-increment in one transaction
  (``SELECT ... FOR UPDATE`` then ``UPDATE``) or the single conditional ``UPDATE ... WHERE used + x <= lim``,
  with psycopg (async) through a pool as large as Meterstream's (8);
* :func:`sequential` against :func:`instrumented_sink` — where the time of one reserve (and commit) goes:
  reserve + commit (or release) one at a time over HTTP against a second sink process (its own windows,
  the same PostgreSQL) in which every PostgreSQL operation, the transaction's begin and commit, every
  thread hop (ClickHouse reads, the sink's applied offsets) and the broker's acknowledgement are timed.

HTTP is raw HTTP/1.1 on keep-alive connections (as bench/loadgen.py), uvloop when installed, cyclic GC
off (its pauses would show as latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import multiprocessing
import resource
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from bench.loadgen import _read_response

T = TypeVar("T")

#: What each reservation holds (an upper bound) and then commits (what the call used).
ESTIMATE: dict[str, Any] = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "estimate": {"input_tokens": 1200, "output_tokens": 500},
    "ttlSeconds": 60,
}
USAGE: dict[str, Any] = {"usage": {"input_tokens": 812, "output_tokens": 230}}
#: The same amounts in the naive baseline's units (tokens).
HOLD, ACTUAL = 1700, 1042
NAIVE_TABLE = "bench_naive_limits"
NAIVE_POOL = 8  # Meterstream's default ..._POSTGRES__POOL_MAX


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    subjects: tuple[str, ...]
    id_prefix: str


@dataclass
class Result:
    reserve_s: list[float] = field(default_factory=list)
    commit_s: list[float] = field(default_factory=list)
    #: Reservations completed (reserve and commit or release answered) within the measured seconds.
    reservations: int = 0
    #: Reservations due (open loop) or sent (closed loop) within the measured seconds.
    issued: int = 0
    #: Open loop: denied (429) and failed (any other error), the warm-up's included.
    denied: int = 0
    failed: int = 0
    #: Open loop: measured reservations not answered by the end (see :class:`_Pacer`).
    unfinished: int = 0
    measured_s: float = 0.0
    client_cpu_cores: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.reservations / self.measured_s if self.measured_s else 0.0

    def count(self, what: str, status: int, body: bytes = b"") -> None:
        key = f"{what} {status}"
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if status >= 400 and status != 429 and len(self.errors) < 5:
            self.errors.append(f"{key}: {body[:300]!r}")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(main: Callable[..., Awaitable[T]], *args: Any) -> T:
    gc.collect()
    gc.disable()
    run: Callable[..., Any] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    return run(main(*args))  # type: ignore[no-any-return]


def in_process(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a spawned process of its own; blocks until it returns."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(fn, args)


# -- Meterstream's API over raw HTTP -----------------------------------------------------------------------


class _Conn:
    """One keep-alive HTTP/1.1 connection. The server closes one left idle (uvicorn: after 5 s): a request
    that finds it closed, before any byte of an answer, is sent again on a new connection (it was not
    received: a server closes only idle connections)."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0

    async def open(self) -> _Conn:
        self.reader, self.writer = await asyncio.open_connection(self._host, self._port)
        return self

    async def post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        payload = orjson.dumps(body) if body is not None else b""
        head = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n" % (
            path.encode(), self._host.encode(), len(payload))  # fmt: skip
        if body is not None:
            head += b"Content-Type: application/json\r\n"
        request = head + b"\r\n" + payload
        for attempt in (1, 2):
            if self.writer is None or self.writer.is_closing() or (self.reader and self.reader.at_eof()):
                self.close()
                await self.open()
                self.reconnects += attempt == 1
            assert self.reader is not None
            assert self.writer is not None
            try:
                self.writer.write(request)
                return await _read_response(self.reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                partial = getattr(exc, "partial", b"")
                self.close()
                if attempt == 2 or partial:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _connect(t: Target, n: int) -> list[_Conn]:
    return [await _Conn(t.host, t.port).open() for _ in range(n)]


def _reserve_path(subject: str) -> str:
    return f"/api/v1/subjects/{subject}/reservations"


class _Pacer:
    """Open-loop arrivals: reservation ``i`` is due at ``start + i / rate``; its reserve latency runs from
    then. Those due after the warm-up are measured; any not answered ``grace_s`` after the last is due are
    given up, counted as unfinished, with their latency so far (a lower bound) in the percentiles."""

    def __init__(self, rate: float, seconds: float, warmup_s: float, grace_s: float) -> None:
        self.rate = rate
        self.result = Result(measured_s=seconds)
        self.start = time.perf_counter() + 0.2
        self.measure_from = self.start + warmup_s
        self.end = self.measure_from + seconds
        self.cutoff = self.end + grace_s
        self._due: dict[int, float] = {}  # not answered yet
        self._held: dict[int, float] = {}  # held, commit not answered yet

    def measured(self, i: int) -> bool:
        return self.start + i / self.rate >= self.measure_from

    def reserved(self, i: int, outcome: str) -> None:
        """``outcome``: held, denied or failed. Denials and failures count whenever they happen (warm-up too)."""
        due = self._due.pop(i)
        now = time.perf_counter()
        if outcome == "held":
            self._held[i] = now
        elif outcome == "denied":
            self.result.denied += 1
        else:
            self.result.failed += 1
        if self.measured(i):
            self.result.reserve_s.append(now - due)

    def committed(self, i: int, ok: bool) -> None:
        held = self._held.pop(i)
        now = time.perf_counter()
        # Throughput: every reservation completed inside the measured seconds, whenever it was due.
        self.result.reservations += ok and self.measure_from <= now <= self.end
        if not ok:
            self.result.failed += 1
        elif self.measured(i):
            self.result.commit_s.append(now - held)

    async def run(self, one: Callable[[int], Coroutine[Any, Any, None]]) -> Result:
        cpu0 = _cpu_s()
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while (due := self.start + i / self.rate) < self.end:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self._due[i] = due
            self.result.issued += self.measured(i)
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, self.cutoff - time.perf_counter()))
        for pending, latencies in ((self._due, self.result.reserve_s), (self._held, self.result.commit_s)):
            for i, started in pending.items():
                if self.measured(i):
                    latencies.append(self.cutoff - started)
                    self.result.unfinished += 1
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.result.client_cpu_cores = (_cpu_s() - cpu0) / max(1e-9, time.perf_counter() - self.start)
        return self.result


async def _paced(t: Target, rate: float, seconds: float, warmup_s: float, grace_s: float, connections: int) -> Result:
    conns = await _connect(t, connections)
    # Last in, first out: at a low rate the same few connections serve, the others stay idle.
    idle: asyncio.LifoQueue[_Conn] = asyncio.LifoQueue()
    for c in conns:
        idle.put_nowait(c)
    pacer = _Pacer(rate, seconds, warmup_s, grace_s)
    result = pacer.result

    async def one(i: int) -> None:
        conn = await idle.get()
        held = False
        try:
            rid = f"{t.id_prefix}{i}"
            status, body = await conn.post(_reserve_path(t.subjects[i % len(t.subjects)]), ESTIMATE | {"id": rid})
            held = status == 201
            pacer.reserved(i, "held" if held else "denied" if status == 429 else "failed")
            result.count("reserve", status, body)
            if status != 201:
                return
            status, body = await conn.post(f"/api/v1/reservations/{rid}/commit", USAGE)
            pacer.committed(i, status == 200)
            result.count("commit", status, body)
        except (OSError, asyncio.IncompleteReadError) as exc:
            if held:
                pacer.committed(i, False)
            else:
                pacer.reserved(i, "failed")
            if len(result.errors) < 5:
                result.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            idle.put_nowait(conn)

    await pacer.run(one)
    for c in conns:
        c.close()
    return result


def paced(t: Target, rate: float, seconds: float, warmup_s: float = 1.0, grace_s: float = 5.0,
          connections: int = 64) -> Result:  # fmt: skip
    """Reserve + commit at ``rate`` reservations/s for ``seconds`` after ``warmup_s`` (see :class:`_Pacer`)."""
    return _run(_paced, t, rate, seconds, warmup_s, grace_s, connections)


async def _closed(t: Target, clients: int, seconds: float, warmup_s: float, limit: int | None) -> Result:
    conns = await _connect(t, clients)
    result = Result()
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + seconds
    cpu0 = _cpu_s()
    issued = 0

    async def client(k: int, conn: _Conn) -> None:
        nonlocal issued
        while (sent := time.perf_counter()) < end and (limit is None or issued < limit):
            n = issued
            issued += 1
            rid = f"{t.id_prefix}{n}"
            subject = t.subjects[n % len(t.subjects)]
            status, body = await conn.post(_reserve_path(subject), ESTIMATE | {"id": rid})
            held = time.perf_counter()
            # Latency of the cycles sent after the warm-up; throughput, the cycles completed inside the window.
            measured = sent >= measure_from
            result.issued += measured
            if measured:
                result.count("reserve", status, body)
                result.reserve_s.append(held - sent)
            if status != 201:
                if measured:
                    result.denied += status == 429
                    result.failed += status != 429
                continue
            status, body = await conn.post(f"/api/v1/reservations/{rid}/release")
            done = time.perf_counter()
            result.reservations += status == 200 and measure_from <= done <= end
            if measured:
                result.count("release", status, body)
                if status == 200:
                    result.commit_s.append(done - held)
                else:
                    result.failed += 1

    await asyncio.gather(*(client(k, c) for k, c in enumerate(conns)))
    result.measured_s = seconds
    result.client_cpu_cores = (_cpu_s() - cpu0) / max(1e-9, time.perf_counter() - start)
    for c in conns:
        c.close()
    return result


def closed(t: Target, clients: int, seconds: float, warmup_s: float = 1.0, limit: int | None = None) -> Result:
    """``clients`` connections, each reserve then release, back to back (``limit``: at most that many in
    all, the subjects in turn); ``commit_s`` holds the releases."""
    return _run(_closed, t, clients, seconds, warmup_s, limit)


# -- the naive pattern in plain PostgreSQL -----------------------------------------------------------------

_CHECK = f"SELECT used, lim FROM {NAIVE_TABLE} WHERE subject = %s FOR UPDATE"
_ADD = f"UPDATE {NAIVE_TABLE} SET used = used + %s WHERE subject = %s"
_ADD_IF = f"UPDATE {NAIVE_TABLE} SET used = used + %s WHERE subject = %s AND used + %s <= lim RETURNING used"
_SETTLE = f"UPDATE {NAIVE_TABLE} SET used = used - %s + %s WHERE subject = %s"


def naive_setup(dsn: str, subjects: tuple[str, ...], limit: int) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {NAIVE_TABLE}")
        conn.execute(
            f"CREATE TABLE {NAIVE_TABLE} (subject text PRIMARY KEY, used numeric NOT NULL, lim numeric NOT NULL)"
        )
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {NAIVE_TABLE} VALUES (%s, 0, %s)", [(s, limit) for s in subjects])


async def _naive_reserve(pool: Any, subject: str, conditional: bool) -> bool:
    async with pool.connection() as conn:
        if conditional:
            cur = await conn.execute(_ADD_IF, (HOLD, subject, HOLD))
            return await cur.fetchone() is not None
        async with conn.transaction():
            cur = await conn.execute(_CHECK, (subject,))
            row = await cur.fetchone()
            if row is None or row[0] + HOLD > row[1]:
                return False
            await conn.execute(_ADD, (HOLD, subject))
            return True


async def _naive_settle(pool: Any, subject: str, actual: int) -> None:
    async with pool.connection() as conn:
        await conn.execute(_SETTLE, (HOLD, actual, subject))


async def _pool(dsn: str) -> Any:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(dsn, min_size=NAIVE_POOL, max_size=NAIVE_POOL, open=False, kwargs={"autocommit": True})
    await pool.open(wait=True)
    return pool


async def _naive_paced(dsn: str, subjects: tuple[str, ...], rate: float, seconds: float, warmup_s: float,
                       grace_s: float, conditional: bool) -> Result:  # fmt: skip
    pool = await _pool(dsn)
    pacer = _Pacer(rate, seconds, warmup_s, grace_s)

    async def one(i: int) -> None:
        subject = subjects[i % len(subjects)]
        try:
            ok = await _naive_reserve(pool, subject, conditional)
        except Exception as exc:  # counted, as an HTTP error is
            pacer.reserved(i, "failed")
            if len(pacer.result.errors) < 5:
                pacer.result.errors.append(f"{type(exc).__name__}: {exc}")
            return
        pacer.reserved(i, "held" if ok else "denied")
        if not ok:
            return
        try:
            await _naive_settle(pool, subject, ACTUAL)
        except Exception as exc:
            pacer.committed(i, False)
            if len(pacer.result.errors) < 5:
                pacer.result.errors.append(f"{type(exc).__name__}: {exc}")
            return
        pacer.committed(i, True)

    result = await pacer.run(one)
    await pool.close()
    return result


def naive_paced(dsn: str, subjects: tuple[str, ...], rate: float, seconds: float, warmup_s: float = 1.0,
                grace_s: float = 5.0, conditional: bool = False) -> Result:  # fmt: skip
    """Check-then-increment (or the conditional UPDATE), then settle to the actual usage, at ``rate``/s."""
    return _run(_naive_paced, dsn, subjects, rate, seconds, warmup_s, grace_s, conditional)


async def _naive_closed(dsn: str, subjects: tuple[str, ...], clients: int, seconds: float, warmup_s: float,
                        conditional: bool) -> Result:  # fmt: skip
    pool = await _pool(dsn)
    result = Result()
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + seconds
    cpu0 = _cpu_s()

    async def client(k: int) -> None:
        n = 0
        while (sent := time.perf_counter()) < end:
            subject = subjects[(k + n * clients) % len(subjects)]
            n += 1
            ok = await _naive_reserve(pool, subject, conditional)
            held = time.perf_counter()
            if ok:
                await _naive_settle(pool, subject, 0)  # the release: the hold given back
            done = time.perf_counter()
            result.reservations += ok and measure_from <= done <= end
            if sent < measure_from:
                continue
            result.issued += 1
            result.reserve_s.append(held - sent)
            if not ok:
                result.denied += 1
                continue
            result.commit_s.append(done - held)

    await asyncio.gather(*(client(k) for k in range(clients)))
    result.measured_s = seconds
    result.client_cpu_cores = (_cpu_s() - cpu0) / max(1e-9, time.perf_counter() - start)
    await pool.close()
    return result


def naive_closed(dsn: str, subjects: tuple[str, ...], clients: int, seconds: float, warmup_s: float = 1.0,
                 conditional: bool = True) -> Result:  # fmt: skip
    return _run(_naive_closed, dsn, subjects, clients, seconds, warmup_s, conditional)


# -- where the time of a reserve goes ----------------------------------------------------------------------

#: The file an instrumented sink writes its timings to when it gets SIGUSR1.
CLOCK_ENV = "BENCH_RESERVATIONS_CLOCK"
#: The operation (reserve, commit) the current task is inside, if any: only its parts are counted.
_OPERATION: contextvars.ContextVar[str | None] = contextvars.ContextVar("bench_operation", default=None)
#: PostgreSQL operations in progress in this task (one calling another is timed once, as the outer one).
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("bench_depth", default=0)


class _Clock:
    """Seconds and calls per part of each operation, summed."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = {}
        self.calls: dict[str, dict[str, int]] = {}

    def add(self, part: str, seconds: float) -> None:
        operation = _OPERATION.get()
        if operation is None:
            return
        seconds_of, calls_of = self.seconds.setdefault(operation, {}), self.calls.setdefault(operation, {})
        seconds_of[part] = seconds_of.get(part, 0.0) + seconds
        calls_of[part] = calls_of.get(part, 0) + 1

    def dump(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "calls": self.calls}


def _instrument(clock: _Clock) -> None:
    """Time, inside ``ReservationService.reserve`` and ``.commit``: every PostgreSQL operation of the store
    (``PgTx``'s methods, by name), the transaction's begin (a pooled connection, BEGIN) and end (COMMIT), the
    statements sent (round trips), every thread hop (the ClickHouse reads, the balance engine) by function,
    and the commit's hand-over to the broker. Names are found at run time, so this follows the code."""
    import functools
    import inspect

    import psycopg

    from control import holds
    from control.postgres import store
    from meterstream import reserving

    def timed(fn: Any, part: str, nested: bool = False) -> Any:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            depth = _DEPTH.get()
            token = _DEPTH.set(depth + 1) if nested else None
            try:
                return await fn(*args, **kwargs)
            finally:
                if token is not None:
                    _DEPTH.reset(token)
                if not nested or depth == 0:
                    clock.add(part, time.perf_counter() - t0)

        return wrapper

    for name, fn in list(vars(store.PgTx).items()):
        if not name.startswith("__") and inspect.iscoroutinefunction(fn):
            setattr(store.PgTx, name, timed(fn, f"postgres: {name.lstrip('_')}", nested=True))

    # Connection.execute runs a cursor's: statements are counted once, on the cursor.
    def counted(fn: Any) -> Any:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            clock.add("postgres statements sent (not BEGIN, COMMIT; a pipeline's share one round trip)", 0.0)
            return await fn(*args, **kwargs)

        return wrapper

    psycopg.AsyncCursor.execute = counted(psycopg.AsyncCursor.execute)  # type: ignore[method-assign]
    psycopg.AsyncCursor.executemany = counted(psycopg.AsyncCursor.executemany)  # type: ignore[method-assign]

    original_tx = store.PostgresStore.tx

    @contextlib.asynccontextmanager
    async def tx(self: Any) -> Any:
        cm = original_tx(self)
        t0 = time.perf_counter()
        handle = await cm.__aenter__()
        clock.add("postgres: pool + BEGIN", time.perf_counter() - t0)
        try:
            yield handle
        except BaseException as exc:
            if not await cm.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            t1 = time.perf_counter()
            await cm.__aexit__(None, None, None)
            clock.add("postgres: COMMIT", time.perf_counter() - t1)

    store.PostgresStore.tx = tx  # type: ignore[method-assign]

    to_thread = asyncio.to_thread

    async def timed_to_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        t0 = time.perf_counter()
        try:
            return await to_thread(fn, *args, **kwargs)
        finally:
            name = getattr(fn, "__qualname__", repr(fn))
            where = "clickhouse" if name.startswith("MeterReader.") else "thread"
            clock.add(f"{where}: {name} (in a thread)", time.perf_counter() - t0)

    asyncio.to_thread = timed_to_thread

    emit = getattr(reserving, "IngestUsageEvents", None)
    if emit is not None:
        emit.emit = timed(emit.emit, "broker: produce, wait for the acknowledgement")

    for operation in ("reserve", "commit"):
        original = getattr(holds.ReservationService, operation)

        def whole(fn: Any = original, operation: str = operation) -> Any:
            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                token = _OPERATION.set(operation)
                t0 = time.perf_counter()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    clock.add("total", time.perf_counter() - t0)
                    _OPERATION.reset(token)

            return wrapper

        setattr(holds.ReservationService, operation, whole())


def instrumented_sink() -> None:
    """``meterstream sink`` with the parts of every reserve and commit timed (:func:`_instrument`); on
    SIGUSR1 it writes the sums to the file named by $BENCH_RESERVATIONS_CLOCK, on SIGUSR2 it starts them over."""
    import json
    import os
    import signal
    import sys

    clock = _Clock()
    _instrument(clock)
    out = Path(os.environ[CLOCK_ENV])

    def dump(*_: Any) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(clock.dump()))
        tmp.replace(out)

    def reset(*_: Any) -> None:
        clock.seconds.clear()
        clock.calls.clear()

    signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGUSR2, reset)
    from meterstream.cli import main

    sys.exit(main(["sink"]))


async def _sequential(t: Target, n: int, warmup: int, settle: str) -> dict[str, list[float]]:
    (conn,) = await _connect(t, 1)
    times: dict[str, list[float]] = {"reserve": [], settle: []}
    for i in range(n + warmup):
        rid = f"{t.id_prefix}{i}"
        t0 = time.perf_counter()
        status, body = await conn.post(_reserve_path(t.subjects[i % len(t.subjects)]), ESTIMATE | {"id": rid})
        t1 = time.perf_counter()
        if status != 201:
            raise RuntimeError(f"reserve: {status} {body[:300]!r}")
        status, body = await conn.post(f"/api/v1/reservations/{rid}/{settle}", USAGE if settle == "commit" else None)
        t2 = time.perf_counter()
        if status != 200:
            raise RuntimeError(f"{settle}: {status} {body[:300]!r}")
        if i >= warmup:
            times["reserve"].append(t1 - t0)
            times[settle].append(t2 - t1)
    conn.close()
    return times


def sequential(t: Target, n: int, warmup: int, settle: str = "commit") -> dict[str, list[float]]:
    """Reserve then commit (or release), one at a time (nothing queued behind anything): latencies by
    operation."""
    return _run(_sequential, t, n, warmup, settle)


def summarize_clock(dump: dict[str, Any], counted: dict[str, int], http: dict[str, list[float]]) -> dict[str, Any]:
    """Per operation: the HTTP latency the client saw, the time inside the service, and its parts (ms per
    operation, calls per operation, share of the time inside the service). ``counted``: operations timed."""
    from bench.common import percentile

    out: dict[str, Any] = {}
    for operation, n in counted.items():
        seconds, calls = dump["seconds"].get(operation, {}), dump["calls"].get(operation, {})
        total = seconds.get("total", 0.0)
        parts = {
            part: {
                "ms": round(s / n * 1000, 3),
                "calls": round(calls[part] / n, 2),
                "share": round(s / total, 3) if total else None,
            }
            for part, s in sorted(seconds.items(), key=lambda kv: -kv[1])
            if part != "total"
        }
        timed = sum(s for part, s in seconds.items() if part != "total" and "round trips" not in part)
        latencies = http.get(operation, [])
        out[operation] = {
            "count": n,
            "http_p50_ms": round((percentile(latencies, 50) or 0.0) * 1000, 3),
            "http_mean_ms": round(sum(latencies) / len(latencies) * 1000, 3) if latencies else None,
            "in_service_mean_ms": round(total / n * 1000, 3),
            "untimed_in_service_mean_ms": round((total - timed) / n * 1000, 3),
            "parts": parts,
        }
    return out

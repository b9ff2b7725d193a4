"""Entry points: each process wires its parts together here, and nowhere else.

Processes (as in docker-compose.yml): ``ingest`` (HTTP → Kafka), ``processor`` (Faust: events → windows;
run as many as there are partitions), ``sink`` (windows → ClickHouse, and the query API beside it) and
``query`` (the query API alone, over a ClickHouse server). ``up`` runs all of them in one process on the
bundled broker and the embedded engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from prometheus_client import REGISTRY
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from control.access import Authenticator, FailedAuthLimiter, RateLimiter
from control.alerts.delivery import Deliverer
from control.alerts.service import AlertService
from control.holds import ReservationService, UsageClock
from control.keys import KeyService
from control.meters import CACHE_S as METERS_CACHE_S
from control.meters import MeterService, meters_from_file
from control.postgres.store import PostgresStore
from control.routes import access_routes, alert_routes, control_routes, meter_routes, reservation_routes
from control.service import ControlService
from control.webhooks.sender import WebhookSender
from control.webhooks.urls import UrlPolicy
from ingest.parsing import IngestPolicy
from ingest.producer import EventProducer
from ingest.routes import ingest_routes
from ingest.service import IngestService
from meterstream import __version__
from meterstream.broker import reuse_or_start
from meterstream.http import Access, Checks, build_app
from meterstream.logs import configure_logging
from meterstream.pgserver import EmbeddedPostgres
from meterstream.reserving import Alerting, IngestUsageEvents, PricerRates, ReaderClock, SinkClock, alerting, relaying
from meterstream.runtime import background, tune_gc, tune_malloc
from meterstream.topics import ensure_topics, topic_id
from processors.app import Processor
from processors.pricing import Pricer, load_overrides
from query.cache import QueryCache
from query.render import rfc3339
from query.routes import PriceQuoter, query_routes
from schemas.meters import UserMeter, litellm_cost_meter
from schemas.problems import MeterstreamError, Problem
from schemas.settings import (
    AlertSettings,
    AuthSettings,
    ClickHouseSettings,
    IngestSettings,
    KafkaSettings,
    LocalSettings,
    PostgresSettings,
    ProcessorSettings,
    QuerySettings,
    ReservationSettings,
    SinkSettings,
    TopicSettings,
)
from sinks.clickhouse.connection import ClickHouse
from sinks.clickhouse.metrics import EngineMemory, MeterValuesMissing
from sinks.clickhouse.reader import MeterReader
from sinks.clickhouse.schema import migrate
from sinks.clickhouse.store import WindowStore
from sinks.consumer import Sink
from ui.routes import ui_routes

log = logging.getLogger(__name__)

#: How long a clean local shutdown waits for accepted events to reach storage.
DRAIN_TIMEOUT_S = 60.0


def make_pricer(overrides: Path | None) -> Pricer:
    return Pricer(load_overrides(overrides) if overrides else None)


def make_quoter(pricer: Pricer) -> PriceQuoter:
    def quote(provider: str, model: str, at: datetime, context: Mapping[str, str]) -> Mapping[str, Any]:
        q = pricer.quote(provider, model, at, context)
        return {
            "provider": q.provider,
            "model": q.model,
            "matchedModel": q.matched_model,
            "at": rfc3339(q.at),
            "source": q.source,
            "context": dict(q.context),
            "prices": dict(q.prices),
        }

    return quote


def make_meters(meters_file: Path | None, store: PostgresStore | None, litellm_event_type: str) -> MeterService:
    """The user-defined meters: LiteLLM's cost (when its events are read), the meters file's (validated now:
    a bad file stops the start, naming the field) and, with a store, the API's."""
    builtin = [litellm_cost_meter(litellm_event_type)] if litellm_event_type else []
    configured: list[UserMeter] = []
    if meters_file is not None:
        try:
            document = yaml.safe_load(meters_file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise MeterstreamError(f"cannot read the meters file {meters_file}: {exc}") from exc
        try:
            configured = meters_from_file(document, datetime.now(UTC))
        except Problem as problem:
            raise MeterstreamError(f"invalid meters file {meters_file}: {problem.detail}") from None
        log.info("meterstream: %d meters from %s", len(configured), meters_file)
    return MeterService(store, builtin + configured)


def make_store(postgres: PostgresSettings) -> PostgresStore | None:
    if postgres.dsn is None:
        return None
    return PostgresStore(postgres.dsn.get_secret_value(), max_size=postgres.pool_max, timeout_s=postgres.timeout_s)


@dataclass(frozen=True, slots=True)
class Control:
    """The control plane of one process: its routes, the reservations' relay (None: no reservations) and
    the alerts' evaluator and sender (None: no alerts)."""

    routes: list[BaseRoute]
    holds: ReservationService | None = None
    alerts: Alerting | None = None


def make_control(
    store: PostgresStore | None,
    default_plan: str | None,
    reader: MeterReader,
    reserving: tuple[IngestUsageEvents, Pricer, ReservationSettings, str, UsageClock] | None = None,
    alerts: AlertSettings | None = None,
) -> Control:
    """The control plane's routes (limits, keys, portal tokens; reservations when the process can record
    usage: ``reserving`` = how, its pricer, settings and usage event type; notifications and their
    delivery unless ``alerts`` is off) over PostgreSQL and the metered usage; none without a store."""
    if store is None:
        return Control([])
    settings_ = reserving[2] if reserving is not None else ReservationSettings()
    control = ControlService(store, reader, default_plan, settings_.horizon, settings_.event_source)
    routes: list[BaseRoute] = [*control_routes(control), *access_routes(KeyService(store))]
    alerting = make_alerting(control, alerts) if alerts is not None and alerts.enabled else None
    if alerting is not None:
        routes += alert_routes(alerting.service)
    if reserving is None:
        return Control(routes, alerts=alerting)
    events, pricer, settings, event_type, clock = reserving
    holds = ReservationService(
        control=control,
        events=events,
        pricer=PricerRates(pricer),
        clock=clock,
        settings=settings,
        usage_event_type=event_type,
    )
    return Control([*routes, *reservation_routes(holds)], holds, alerting)


def make_alerting(control: ControlService, settings: AlertSettings) -> Alerting:
    """Alerts: evaluated on every change this process sees, delivered as signed webhooks."""
    service = AlertService(control, settings)
    control.on_change = lambda subject: service.kick((subject,))
    sender = WebhookSender(
        UrlPolicy.of(settings.allow_private_urls, settings.allowed_networks),
        connect_timeout_s=settings.connect_timeout_s,
        timeout_s=settings.timeout_s,
        max_response_bytes=settings.max_response_bytes,
        user_agent=f"meterstream/{__version__}",
    )
    return Alerting(service, Deliverer(control, sender, settings, service.written), sender)


def make_usage_events(
    kafka: KafkaSettings, topics: TopicSettings, usage_event_type: str
) -> tuple[IngestUsageEvents, EventProducer]:
    """The ingest path for reservations' commits in a process other than ingest (its own producer)."""
    ensure_topics(kafka, topics)
    # Ingest's own defaults for the producer and the event checks (this process has no ingest settings).
    defaults = IngestSettings.model_construct(usage_event_type=usage_event_type)
    producer = EventProducer(kafka.to_librdkafka(), topics.events, defaults.produce_timeout_ms, defaults.linger_ms)
    return IngestUsageEvents(_policy(defaults), producer, topic_id(kafka, topics.events)), producer


def _policy(settings: IngestSettings) -> IngestPolicy:
    return IngestPolicy(
        usage_event_type=settings.usage_event_type,
        litellm_event_type=settings.litellm_event_type,
        max_batch_events=settings.max_batch_events,
        max_future=timedelta(seconds=settings.max_future_s),
    )


def make_access(auth: AuthSettings, store: PostgresStore | None, service: str) -> Access:
    """How ``service`` checks its callers: keys from the store (and the configured admin key)."""
    if not auth.enabled:
        log.warning("%s: authentication is OFF (AUTH__ENABLED=false): anyone who can reach it may call it", service)
        return Access(authenticator=None, metrics="open", cors_origins=list(auth.cors_origins))
    admin_key = auth.admin_key.get_secret_value() if auth.admin_key else None
    if store is None and admin_key is None:
        raise MeterstreamError(
            f"{service}: authentication needs the keys' PostgreSQL (POSTGRES__DSN) or an admin key (AUTH__ADMIN_KEY); "
            "or turn it off explicitly with AUTH__ENABLED=false"
        )

    async def no_keys(kind: str, public_id: str) -> None:
        return None

    lookup = KeyService(store).lookup if store is not None else no_keys
    return Access(
        authenticator=Authenticator(lookup, bootstrap_admin_key=admin_key, cache_s=auth.cache_s),
        metrics=auth.metrics,
        cors_origins=list(auth.cors_origins),
        rate=RateLimiter(auth.rate_limit_per_s, auth.rate_limit_burst),
        failures=FailedAuthLimiter(auth.failed_auth_per_minute),
    )


@contextlib.asynccontextmanager
async def _opened(store: PostgresStore | None) -> AsyncIterator[None]:
    if store is not None:
        await store.open()
    try:
        yield
    finally:
        if store is not None:
            await store.close()


async def _serve(app: Starlette, host: str, port: int, log_level: str) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), lifespan="on", access_log=False)
    await uvicorn.Server(config).serve()


def _run(app: Starlette, host: str, port: int, log_level: str) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully and exit 0. (uvicorn re-raises the signal
    once its graceful shutdown is done; that must not turn a clean stop into a crash.)"""
    tune_gc()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(app, host, port, log_level))


# -- ingest ---------------------------------------------------------------------------------------------


def ingest_app(settings: IngestSettings) -> Starlette:
    producer = EventProducer(
        settings.kafka.to_librdkafka(),
        settings.topics.events,
        settings.produce_timeout_ms,
        settings.linger_ms,
    )
    service = IngestService(settings, producer)
    store = make_store(settings.postgres) if settings.auth.enabled else None
    access = make_access(settings.auth, store, "ingest")

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with _opened(store):
            yield
        # Requests have drained; what is still queued goes out before the process ends.
        undelivered = await asyncio.to_thread(producer.close)
        if undelivered:
            log.error("ingest: %d records undelivered at shutdown (their requests were answered 503)", undelivered)

    return build_app(ingest_routes(service, settings.max_body_bytes), {"broker": producer.ping}, lifespan, access)


def ingest_app_from_environment() -> Starlette:
    """The ingest app of one worker process (uvicorn imports this when running several workers)."""
    settings = IngestSettings()
    configure_logging(settings.log_level)
    app = ingest_app(settings)
    tune_gc()
    return app


def run_ingest(settings: IngestSettings) -> None:
    if settings.workers == 1:
        _run(ingest_app(settings), settings.host, settings.port, settings.log_level)
        return
    # Several processes on one port; uvicorn's supervisor forwards SIGTERM and each worker drains. Their
    # metrics go to files in a directory of this run (Prometheus's multiprocess mode, set before the
    # workers import the client), and each worker's /metrics sums every worker's.
    metrics_dir = tempfile.mkdtemp(prefix="meterstream-ingest-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _run_workers(settings)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_workers(settings: IngestSettings) -> None:
    uvicorn.run(
        "meterstream.services:ingest_app_from_environment",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level.lower(),
        access_log=False,
    )


# -- processor ------------------------------------------------------------------------------------------


def processor_app(settings: ProcessorSettings) -> Starlette:
    ensure_topics(settings.kafka, settings.topics, allowed_lateness_s=settings.allowed_lateness_s)
    processor = Processor(
        settings, make_pricer(settings.price_overrides), topic_id(settings.kafka, settings.topics.events)
    )
    started = threading.Event()

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await processor.start()
        started.set()
        try:
            yield
        finally:
            await processor.stop()

    return build_app([], {"faust": started.is_set}, lifespan)


def run_processor(settings: ProcessorSettings) -> None:
    tune_malloc()
    _run(processor_app(settings), settings.metrics_host, settings.metrics_port, settings.log_level)


# -- sink (+ query API beside the engine) ---------------------------------------------------------------


def _sink_parts(settings: SinkSettings) -> tuple[ClickHouse, Sink, MeterReader]:
    ch = ClickHouse(settings.clickhouse)
    migrate(ch)
    store = WindowStore(ch)
    return ch, Sink(settings, store, meter_store=store.meters), MeterReader(ch)


async def _feed_meters(sink: Sink, meters: MeterService) -> None:
    """Keep the sink's user meters current: a meter made through the API is aggregated within a second or
    so (events stored before are backfilled; nothing is missed in between)."""
    while True:
        try:
            sink.user_meters = tuple(await meters.user_meters())
        except Exception as exc:  # PostgreSQL away before the first read: the meters as last known
            log.warning("meterstream: cannot read the user meters for the sink (%s)", exc)
        await asyncio.sleep(METERS_CACHE_S)


@asynccontextmanager
async def _feeding(sink: Sink, meters: MeterService) -> AsyncIterator[None]:
    async with background(_feed_meters(sink, meters), "user-meters-feed"):
        yield


@contextlib.contextmanager
def _engine_metrics(ch: ClickHouse, sink: Sink) -> Iterator[None]:
    """The engine's memory accounting and the user meters' missing values on /metrics while the app runs
    (unregistered after: tests build many apps in one process)."""
    collectors = (EngineMemory(ch), MeterValuesMissing(ch, lambda: sink.user_meters))
    for collector in collectors:
        REGISTRY.register(collector)
    try:
        yield
    finally:
        for collector in collectors:
            REGISTRY.unregister(collector)


def sink_app(settings: SinkSettings) -> Starlette:
    ch, sink, reader = _sink_parts(settings)
    thread = threading.Thread(target=sink.run, name="sink", daemon=True)

    store = make_store(settings.postgres)
    producer = None
    reserving = None
    if store is not None:
        events, producer = make_usage_events(settings.kafka, settings.topics, settings.usage_event_type)
        pricer = make_pricer(settings.price_overrides)
        clock = SinkClock(sink, reader)
        reserving = (events, pricer, settings.reservations, settings.usage_event_type, clock)
    control = make_control(store, settings.default_plan, reader, reserving, settings.alerts)
    if control.alerts is not None:
        sink.on_stored = control.alerts.service.kick_threadsafe
    if control.holds is not None:
        sink.on_windows_stored = control.holds.windows_stored
    access = make_access(settings.auth, store, "sink")

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        thread.start()
        try:
            async with _opened(store), relaying(control.holds), alerting(control.alerts), _feeding(sink, meters):
                with _engine_metrics(ch, sink):
                    yield
        finally:
            if producer is not None:
                await asyncio.to_thread(producer.close)
            sink.stop()
            await asyncio.to_thread(thread.join)
            ch.close()

    meters = make_meters(settings.meters_file, store, settings.litellm_event_type)
    routes = [
        *query_routes(
            reader,
            settings.usage_event_type,
            make_quoter(make_pricer(settings.price_overrides)),
            meters,
            QueryCache(sink.usage_version),
        ),
        *meter_routes(meters),
        *control.routes,
        *ui_routes(access.authenticator is not None),
    ]
    return build_app(routes, {"storage": reader.check, "sink": _sink_check(sink, thread)}, lifespan, access)


def run_sink(settings: SinkSettings) -> None:
    tune_malloc()
    _run(sink_app(settings), settings.host, settings.port, settings.log_level)


# -- query ----------------------------------------------------------------------------------------------


def query_app(settings: QuerySettings) -> Starlette:
    ch = ClickHouse(settings.clickhouse)
    migrate(ch)
    reader = MeterReader(ch)
    store = make_store(settings.postgres)
    producer = None
    reserving = None
    if store is not None and settings.kafka is not None:
        events, producer = make_usage_events(settings.kafka, settings.topics, settings.usage_event_type)
        pricer = make_pricer(settings.price_overrides)
        reserving = (events, pricer, settings.reservations, settings.usage_event_type, ReaderClock(reader))
    control = make_control(store, settings.default_plan, reader, reserving, settings.alerts)
    access = make_access(settings.auth, store, "query")
    meters = make_meters(settings.meters_file, store, settings.litellm_event_type)
    routes = [
        *query_routes(reader, settings.usage_event_type, make_quoter(make_pricer(settings.price_overrides)), meters),
        *meter_routes(meters),
        *control.routes,
        *ui_routes(access.authenticator is not None),
    ]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with _opened(store), relaying(control.holds), alerting(control.alerts):
            yield
        if producer is not None:
            await asyncio.to_thread(producer.close)
        ch.close()

    return build_app(routes, {"storage": reader.check}, lifespan, access)


def run_query(settings: QuerySettings) -> None:
    _run(query_app(settings), settings.host, settings.port, settings.log_level)


# -- everything, locally --------------------------------------------------------------------------------


def local_app(local: LocalSettings) -> Starlette:
    """Ingest, processor, sink and query in one process, on the bundled broker and the embedded engine."""
    processor_settings = ProcessorSettings()
    pricer = make_pricer(processor_settings.price_overrides)  # an invalid override file stops us here
    data_dir = local.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    state_file = data_dir / "broker.json"
    postgres = local.postgres
    # The embedded PostgreSQL starts (~1 s, more on a first run) while the broker and the engine do.
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="postgres-start")
    starting_pg = pool.submit(EmbeddedPostgres.start, data_dir / "postgres") if postgres.dsn is None else None
    pool.shutdown(wait=False)  # its thread ends when the start returns
    broker, reused = reuse_or_start(state_file, local.broker_port)
    if reused:
        log.info("meterstream: the broker from the previous run is still up; resuming its unprocessed events")
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
    topics = TopicSettings(partitions=local.partitions)
    ingest_settings = IngestSettings().model_copy(update={"kafka": kafka, "topics": topics})
    processor_settings = processor_settings.model_copy(update={"kafka": kafka, "topics": topics})
    sink_settings = SinkSettings().model_copy(
        update={
            "kafka": kafka,
            "topics": topics,
            "clickhouse": ClickHouseSettings(dsn=f"chdb://{data_dir / 'clickhouse'}", database="meterstream"),
        }
    )
    ensure_topics(kafka, topics, allowed_lateness_s=processor_settings.allowed_lateness_s, single_broker=True)
    events_topic_id = topic_id(kafka, topics.events)
    ch, sink, reader = _sink_parts(sink_settings)
    embedded_pg = starting_pg.result() if starting_pg is not None else None
    if embedded_pg is not None:
        postgres = postgres.model_copy(update={"dsn": SecretStr(embedded_pg.uri)})
    store = make_store(postgres)
    processor = Processor(processor_settings, pricer, events_topic_id)
    producer = EventProducer(
        kafka.to_librdkafka(), topics.events, ingest_settings.produce_timeout_ms, ingest_settings.linger_ms
    )
    service = IngestService(ingest_settings, producer)
    events = IngestUsageEvents(_policy(ingest_settings), producer, events_topic_id)
    reserving = (
        events,
        make_pricer(processor_settings.price_overrides),
        local.reservations,
        ingest_settings.usage_event_type,
        SinkClock(sink, reader),
    )
    control = make_control(store, local.default_plan, reader, reserving, local.alerts)
    if control.alerts is not None:
        sink.on_stored = control.alerts.service.kick_threadsafe
    if control.holds is not None:
        sink.on_windows_stored = control.holds.windows_stored
    access = make_access(local.auth, store, "meterstream")
    meters = make_meters(local.meters_file, store, ingest_settings.litellm_event_type)
    sink_thread = threading.Thread(target=sink.run, name="sink", daemon=True)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        sink_thread.start()
        await processor.start()
        try:
            async with _opened(store), relaying(control.holds), alerting(control.alerts), _feeding(sink, meters):
                if local.auth.enabled and store is not None:
                    await _local_admin_key(KeyService(store), data_dir / "admin.key")
                log.info(
                    "meterstream: ready on http://%s:%d (data in %s); the usage pages: http://%s:%d/ui/",
                    local.host,
                    local.port,
                    data_dir,
                    local.host,
                    local.port,
                )
                with _engine_metrics(ch, sink):
                    yield
        finally:
            await asyncio.to_thread(producer.close)
            drained = await _drain(producer.acknowledged, sink, events_topic_id)
            await processor.stop()
            sink.stop()
            await asyncio.to_thread(sink_thread.join)
            ch.close()
            if embedded_pg is not None:
                # The data directory's server is this command's to stop, also when it was found still
                # running after a crash (its data is on disk; nothing is lost by stopping it).
                embedded_pg.stop()
            if drained:
                broker.stop()
                state_file.unlink(missing_ok=True)
            else:
                log.warning(
                    "meterstream: not every accepted event reached storage within %.0fs; the broker (pid %d) "
                    "is left running so the next `meterstream up` finishes the work",
                    DRAIN_TIMEOUT_S,
                    broker.pid,
                )

    routes: list[BaseRoute] = [
        *ingest_routes(service, ingest_settings.max_body_bytes),
        *query_routes(
            reader,
            ingest_settings.usage_event_type,
            make_quoter(make_pricer(processor_settings.price_overrides)),
            meters,
            QueryCache(sink.usage_version),
        ),
        *meter_routes(meters),
        *control.routes,
        *ui_routes(access.authenticator is not None),
    ]
    readiness: Checks = {"broker": producer.ping, "storage": reader.check, "sink": _sink_check(sink, sink_thread)}
    return build_app(routes, readiness, lifespan, access)


async def _local_admin_key(keys: KeyService, path: Path) -> None:
    """The first start makes an admin key, prints it once and keeps it (mode 0600) where the CLI and the
    README's curls find it; later starts only say where it is."""
    if await asyncio.to_thread(path.exists):
        log.info('meterstream: the admin key is in %s (curl -H "Authorization: Bearer $(cat %s)")', path, path)
        return
    _, token = await keys.create_key("meterstream up (local admin)", ["admin"])
    await asyncio.to_thread(_save_secret, path, token)
    print(f"\nmeterstream: your admin key, saved in {path} (it is not shown again):\n\n    {token}\n", flush=True)


def _save_secret(path: Path, secret: str) -> None:
    path.touch(mode=0o600)
    path.write_text(secret + "\n")


def _sink_check(sink: Sink, thread: threading.Thread) -> Callable[[], bool]:
    """Readiness of the sink: its thread runs and no partition is blocked (held behind a gap for longer
    than gap_wait_s, or behind a record it cannot read); the reasons are in the answer."""

    def check() -> bool:
        if not thread.is_alive():
            return False
        problems = sink.problems()
        if problems:
            raise RuntimeError("; ".join(problems))
        return True

    return check


async def _drain(acknowledged: Mapping[int, int], sink: Sink, events_topic_id: str) -> bool:
    """Wait until the sink applied every events-topic offset the broker acknowledged to ingest."""
    deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
    while asyncio.get_running_loop().time() < deadline:
        if all(sink.applied_offset(events_topic_id, p) >= o for p, o in acknowledged.items()):
            return True
        await asyncio.sleep(0.1)
    return False


def run_local(local: LocalSettings) -> None:
    _run(local_app(local), local.host, local.port, "info")

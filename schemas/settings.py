"""Configuration: one pydantic-settings class per process, read from environment variables.

Every service has its own prefix (``METERSTREAM_INGEST_``, ``METERSTREAM_PROCESSOR_``, ``METERSTREAM_SINK_``,
``METERSTREAM_QUERY_``, ``METERSTREAM_LOCAL_``); nested blocks use ``__``, e.g.
``METERSTREAM_INGEST_KAFKA__BOOTSTRAP_SERVERS=kafka:9092``. Defaults suit a local single-machine run.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.events import DEFAULT_LITELLM_EVENT_TYPE, DEFAULT_USAGE_EVENT_TYPE

#: How long a consumer (processor, sink) lets the broker hold a fetch that has no data yet. Some
#: Kafka-protocol brokers (the bundled one) answer a fetch only when its wait is over, even once data has
#: arrived, so the wait adds to the time from a 204 to a visible result; Apache Kafka answers at once.
CONSUMER_FETCH_MAX_WAIT_MS: Final = 50


class KafkaSettings(BaseModel):
    """How to reach the Kafka-protocol broker; dumps to librdkafka configuration keys."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    #: Further librdkafka settings, passed through verbatim (``{"socket.keepalive.enable": "true"}``).
    extra: dict[str, str] = Field(default_factory=dict)

    def to_librdkafka(self) -> dict[str, str | int | float | bool]:
        conf: dict[str, str | int | float | bool] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        return conf | self.extra


class TopicSettings(BaseModel):
    events: str = "meterstream.events"
    windows: str = "meterstream.windows"
    dead_letter: str = "meterstream.dead-letter"
    #: Partitions of the events and windows topics (the unit of processor parallelism).
    partitions: int = Field(default=4, ge=1, le=1024)
    #: Copies of every record. 1 keeps a record on one broker only (a lost disk loses acknowledged events:
    #: a warning at every start says so); production runs 3 brokers and 3 (deploy/SCALING.md).
    replication_factor: int = Field(default=1, ge=1)
    #: Copies that must have a record before ingest is answered (``acks=all``); default: all but one copy.
    min_insync_replicas: int | None = Field(default=None, ge=1)
    #: How long the broker keeps records (events and windows topics): the longest outage of the processors or
    #: the sink survived without loss. Above the processor's allowed lateness plus a margin (checked at start).
    retention_s: int = Field(default=14 * 24 * 3600, ge=3600)
    #: The dead-letter topic keeps its records longer: they are there to be looked at.
    dead_letter_retention_s: int = Field(default=30 * 24 * 3600, ge=3600)

    @property
    def min_insync(self) -> int:
        return self.min_insync_replicas or max(1, self.replication_factor - 1)

    @model_validator(mode="after")
    def _replicas(self) -> TopicSettings:
        if self.min_insync > self.replication_factor:
            raise ValueError(
                f"min_insync_replicas ({self.min_insync}) is above replication_factor ({self.replication_factor}):"
                " no write could ever be acknowledged"
            )
        return self


class ClickHouseSettings(BaseModel):
    #: ``http(s)://host:8123`` for a ClickHouse server, ``chdb:///absolute/path`` for the embedded engine.
    dsn: str = "chdb:///var/lib/meterstream/clickhouse"
    database: str = Field(default="meterstream", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    username: str | None = None
    password: SecretStr | None = None
    #: Create tables as Replicated*MergeTree on this cluster (see deploy/SCALING.md); empty for one node.
    cluster: str = ""
    #: Limits on every read of the query API (the engine stops a query past them, answered as an error):
    #: seconds, bytes of memory, rows in the result.
    read_max_execution_s: int = Field(default=30, ge=1)
    read_max_memory_bytes: int = Field(default=4 * 1024**3, ge=1024**2)
    read_max_result_rows: int = Field(default=1_000_000, ge=1)


class PostgresSettings(BaseModel):
    """The control plane's store (limits, grants, plans). No DSN: the control-plane API is off."""

    #: ``postgresql://user:password@host:5432/meterstream`` (libpq URI or key=value string).
    dsn: SecretStr | None = None
    pool_max: int = Field(default=8, ge=1, le=200)
    #: How long a request waits for a connection before answering 503 (PostgreSQL unreachable).
    timeout_s: float = Field(default=2.0, gt=0, le=60)


class ReservationSettings(BaseModel):
    """Holds before a call (README "Reservations")."""

    #: How long a hold lasts when the reserve names no TTL, and the longest one may ask for.
    default_ttl_s: int = Field(default=60, ge=1)
    max_ttl_s: int = Field(default=3600, ge=1)
    #: A dollar limit on a model without a known price: deny the call (fail closed) or let it through.
    unpriced: Literal["deny", "allow"] = "deny"
    #: Output tokens assumed for a request that sets no output limit (None: such a request cannot be
    #: bounded and is refused with a 400 naming max_tokens). Only a true maximum keeps the bound exact.
    default_max_output_tokens: int | None = Field(default=None, ge=1)
    #: How long after a commit its usage may still be missing from a process's windows (the lag of the sink
    #: that process reads, at most): older commits are taken to be in the windows.
    visibility_horizon_s: int = Field(default=3600, ge=60)
    #: CloudEvents ``source`` of the usage events commits record (their ``id`` is the reservation's).
    event_source: str = Field(default="meterstream/reservations", min_length=1, max_length=256)

    @property
    def horizon(self) -> timedelta:
        return timedelta(seconds=self.visibility_horizon_s)

    @model_validator(mode="after")
    def _ttls(self) -> ReservationSettings:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError(f"default_ttl_s ({self.default_ttl_s}) is above max_ttl_s ({self.max_ttl_s})")
        return self


class AlertSettings(BaseModel):
    """Budget alerts: notification rules evaluated as usage is stored, delivered as signed webhooks
    (README "Alerts")."""

    #: Evaluate rules and deliver webhooks in this process (every API process with a PostgreSQL does).
    enabled: bool = True
    #: Webhook URLs may target loopback, link-local and private addresses (tests, internal receivers).
    allow_private_urls: bool = False
    #: Private networks allowed even when ``allow_private_urls`` is off (``["10.1.0.0/16"]``).
    allowed_networks: list[str] = Field(default_factory=list)
    #: A notification is retried this long after it was created (or resent) before it is given up.
    retry_horizon_s: int = Field(default=24 * 3600, ge=1)
    #: Backoff between attempts: doubles from ``retry_initial_s`` up to ``retry_max_s``, with jitter.
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=1800.0, gt=0)
    #: Seconds to connect, and for the whole request; at most this many bytes of a response are read.
    connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    max_response_bytes: int = Field(default=1024, ge=0, le=65536)
    #: Deliveries in flight per process, and per channel (so one slow receiver cannot take every slot).
    max_concurrent: int = Field(default=16, ge=1, le=1000)
    per_channel: int = Field(default=4, ge=1, le=1000)
    #: Every this many seconds one process re-evaluates every subject with a rule (what time alone
    #: changes: a grant expiring; and what a crash interrupted).
    sweep_interval_s: float = Field(default=300.0, gt=0)


class AuthSettings(BaseModel):
    """Who may call: API keys (kept in the control plane's PostgreSQL) on every endpoint but /healthz and
    /readyz. Turning it off is explicit, and logged at every start."""

    enabled: bool = True
    #: A key with the admin scope given as a secret (e.g. from the deployment's secret store), accepted
    #: besides the stored keys: how a new deployment makes its first keys. At least 32 characters.
    admin_key: SecretStr | None = None
    #: A positive key check is reused this long at most, so a revoked key stops working within it.
    cache_s: float = Field(default=1.0, gt=0, le=1.0)
    #: ``/metrics``: ``loopback`` (open to requests from this machine, a read key otherwise), ``key``, ``open``.
    metrics: Literal["loopback", "key", "open"] = "loopback"
    #: Browser origins allowed to call the API (CORS), e.g. ``["https://app.example.com"]``, for portal tokens.
    cors_origins: list[str] = Field(default_factory=list)
    #: Requests per second per key, sustained (0: no limit), and the burst allowed above it.
    rate_limit_per_s: float = Field(default=0.0, ge=0)
    rate_limit_burst: float = Field(default=100.0, ge=1)
    #: Failed authentications per client address and minute before the address is refused for the rest of
    #: that minute (0: never).
    failed_auth_per_minute: int = Field(default=30, ge=0)

    @field_validator("admin_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("an admin key is at least 32 characters (e.g. `openssl rand -hex 32`)")
        return value


class _Service(BaseSettings):
    usage_event_type: str = DEFAULT_USAGE_EVENT_TYPE
    #: Events of LiteLLM's `openmeter` callback (this type; "" turns it off) count in the LLM meters too,
    #: and their `cost` in the `litellm_cost_usd` meter. Give every process the same value.
    litellm_event_type: str = DEFAULT_LITELLM_EVENT_TYPE
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class IngestSettings(_Service):
    """The HTTP write path: CloudEvents in, Kafka out."""

    model_config = SettingsConfigDict(env_prefix="METERSTREAM_INGEST_", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = Field(default=8888, ge=0, le=65535)
    #: Worker processes sharing the port (parsing and validation are CPU-bound; one per core).
    workers: int = Field(default=1, ge=1, le=64)
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_batch_events: int = Field(default=1000, ge=1)
    #: Event times further ahead of the server clock than this are rejected.
    max_future_s: int = Field(default=3600, ge=0)
    #: How long a request waits for the broker's acknowledgement before answering 503.
    produce_timeout_ms: int = Field(default=5000, ge=100)
    #: Recently acknowledged (source, id) keys remembered to drop retries before they reach Kafka (at most
    #: this many, and always the latest half of them).
    recent_keys: int = Field(default=200_000, ge=0)
    linger_ms: int = Field(default=1, ge=0)
    auth: AuthSettings = AuthSettings()
    #: Where the API keys are (the control plane's PostgreSQL).
    postgres: PostgresSettings = PostgresSettings()


class ProcessorSettings(_Service):
    """The Faust worker: prices events and aggregates them into 1-minute windows."""

    model_config = SettingsConfigDict(env_prefix="METERSTREAM_PROCESSOR_", env_nested_delimiter="__")

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    group_id: str = "meterstream-processor"
    #: Events later than this (receive time minus event time) are dead-lettered, not counted.
    allowed_lateness_s: int = Field(default=7 * 24 * 3600, ge=0)
    #: YAML file of negotiated / custom prices, taking precedence over genai-prices.
    price_overrides: Path | None = None
    #: Records taken per batch from the events topic.
    batch_records: int = Field(default=500, ge=1)
    batch_within_ms: int = Field(default=20, ge=1)
    #: Recently counted (source, id) keys remembered per worker to drop duplicates early (at most this many,
    #: and always the latest half of them).
    recent_keys: int = Field(default=200_000, ge=0)
    #: Consumer-group session timeout. Short, because the local broker (Tansu) makes a join wait half of it.
    session_timeout_s: float = Field(default=6.0, gt=0)
    #: Port of the metrics / health HTTP endpoint (0: none).
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    #: Address it listens on: this machine only unless configured (``0.0.0.0`` for a scraper on the network;
    #: the endpoint has no authentication).
    metrics_host: str = "127.0.0.1"


class SinkSettings(_Service):
    """The ClickHouse writer (and, next to an embedded engine, the query API)."""

    model_config = SettingsConfigDict(env_prefix="METERSTREAM_SINK_", env_nested_delimiter="__")

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    group_id: str = "meterstream-sink"
    #: A batch is written when it holds this many events, or when the oldest record waited max_wait_ms.
    batch_events: int = Field(default=50_000, ge=1)
    max_wait_ms: int = Field(default=500, ge=1)
    retry_initial_ms: int = Field(default=200, ge=1)
    retry_max_ms: int = Field(default=10_000, ge=1)
    #: Recently stored (source, id) keys kept in memory in front of the audit-log lookup (at most this many,
    #: and always the latest half of them).
    recent_keys: int = Field(default=100_000, ge=0)
    #: A resent event is recognised if it was first stored less than this long ago (a Bloom filter of
    #: these keys decides which events need the exact audit-log lookup).
    dedupe_horizon_days: int = Field(default=32, ge=1)
    #: Keys the Bloom filter is sized for (about 1.2 bytes each); beyond it more lookups, never errors.
    dedupe_capacity: int = Field(default=20_000_000, ge=1000)
    session_timeout_s: float = Field(default=6.0, gt=0)
    #: A gap in a partition's offset chain (a record missing before the next one) is waited for this long
    #: (the processor's retries and redeliveries fill a transient one); longer, and the partition is
    #: reported blocked (readiness, metric, error log), still held, until the record comes or an operator
    #: runs ``meterstream accept-gap``.
    gap_wait_s: float = Field(default=120.0, gt=0)
    #: A user meter's history (events stored before it was made) is aggregated this many audit rows at a
    #: time, one chunk between two batches, so the stream is never held up for long.
    backfill_chunk_rows: int = Field(default=200_000, ge=1)
    host: str = "127.0.0.1"
    #: HTTP port for health, metrics and the query API (0: none).
    port: int = Field(default=8889, ge=0, le=65535)
    price_overrides: Path | None = None
    #: User-defined meters in OpenMeter's format (a YAML file with ``meters:``); README "Meters".
    meters_file: Path | None = None
    postgres: PostgresSettings = PostgresSettings()
    #: Plan applied to subjects that have none (its key; see README "Limits").
    default_plan: str | None = None
    reservations: ReservationSettings = ReservationSettings()
    alerts: AlertSettings = AlertSettings()
    auth: AuthSettings = AuthSettings()


class QuerySettings(_Service):
    """A stand-alone query API over a ClickHouse server."""

    model_config = SettingsConfigDict(env_prefix="METERSTREAM_QUERY_", env_nested_delimiter="__")

    #: The broker reservations' commits record usage through (None: this process serves no reservations).
    kafka: KafkaSettings | None = None
    topics: TopicSettings = TopicSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    host: str = "127.0.0.1"
    port: int = Field(default=8890, ge=0, le=65535)
    price_overrides: Path | None = None
    #: User-defined meters in OpenMeter's format (a YAML file with ``meters:``); README "Meters".
    meters_file: Path | None = None
    postgres: PostgresSettings = PostgresSettings()
    #: Plan applied to subjects that have none (its key; see README "Limits").
    default_plan: str | None = None
    reservations: ReservationSettings = ReservationSettings()
    alerts: AlertSettings = AlertSettings()
    auth: AuthSettings = AuthSettings()


class LocalSettings(BaseSettings):
    """``meterstream up``: everything in one process on an embedded broker and engine."""

    model_config = SettingsConfigDict(env_prefix="METERSTREAM_LOCAL_", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = Field(default=8888, ge=0, le=65535)
    data_dir: Path = Path(".meterstream")
    #: Port of the bundled broker (0: pick a free one).
    broker_port: int = Field(default=0, ge=0, le=65535)
    partitions: int = Field(default=4, ge=1, le=64)
    #: User-defined meters in OpenMeter's format (a YAML file with ``meters:``); README "Meters".
    meters_file: Path | None = None
    #: An external PostgreSQL for the control plane; by default an embedded one runs in the data directory.
    postgres: PostgresSettings = PostgresSettings()
    #: Plan applied to subjects that have none (its key; see README "Limits").
    default_plan: str | None = None
    reservations: ReservationSettings = ReservationSettings()
    alerts: AlertSettings = AlertSettings()
    #: On by default here too: the first start makes an admin key and keeps it in ``<data dir>/admin.key``.
    auth: AuthSettings = AuthSettings()

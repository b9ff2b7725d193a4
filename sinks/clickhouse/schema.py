"""The ClickHouse schema, as versioned migrations applied idempotently at start.

``usage_windows`` holds 1-minute window totals per subject × provider × model, as summable deltas
(AggregatingMergeTree with ``SimpleAggregateFunction(sum)``: a query sums rows, merges only make that
cheaper, FINAL is never needed). Beside them, in the same table, it holds one *offset marker* per source
partition: a row with an empty subject whose ``applied_offset`` is the last events-topic offset whose
deltas are in the table. Deltas and markers of a sink batch go in one INSERT, which ClickHouse writes as
one part (unpartitioned table, well under a million rows), so they become visible together or not at all:
that is what makes every source offset count exactly once.

``usage_events`` is the raw audit log: every accepted event once, with its price (integer atto-dollars,
read as decimal USD through ALIAS columns) and where it came from.
ReplacingMergeTree on (source, id) collapses the identical rows a replay writes again.

``meter_windows`` holds the user meters' 1-minute states (``sinks.clickhouse.meter_states``), with offset
markers of their own per meter, written with the states in one INSERT as above.

``accepted_gaps`` holds the ranges of source offsets an operator accepted as lost (``meterstream
accept-gap``): the sink takes them as applied, ``reconcile`` lists them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from schemas.problems import MeterstreamError
from sinks.clickhouse.connection import ClickHouse

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        "window totals and the raw audit log",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.usage_windows {on_cluster} (
                subject String,
                window_start DateTime('UTC'),
                provider LowCardinality(String),
                model LowCardinality(String),
                -- Set on offset markers only (subject = ''): the events topic and partition they track.
                src_topic LowCardinality(String),
                src_partition Int32,
                requests SimpleAggregateFunction(sum, UInt64),
                input_tokens SimpleAggregateFunction(sum, UInt64),
                output_tokens SimpleAggregateFunction(sum, UInt64),
                cache_read_tokens SimpleAggregateFunction(sum, UInt64),
                cache_write_tokens SimpleAggregateFunction(sum, UInt64),
                reasoning_tokens SimpleAggregateFunction(sum, UInt64),
                total_tokens SimpleAggregateFunction(sum, UInt64),
                cost_usd SimpleAggregateFunction(sum, Decimal(38, 18)),
                unpriced_requests SimpleAggregateFunction(sum, UInt64),
                applied_offset SimpleAggregateFunction(max, Int64)
            )
            ENGINE = {engine}AggregatingMergeTree
            ORDER BY (subject, window_start, provider, model, src_topic, src_partition)
            -- A retried INSERT carrying the same deduplication token is dropped.
            SETTINGS non_replicated_deduplication_window = 10000
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.usage_events {on_cluster} (
                source String,
                id String,
                subject String,
                type LowCardinality(String),
                time DateTime64(6, 'UTC'),
                received_at DateTime64(6, 'UTC'),
                stored_at DateTime64(6, 'UTC'),
                data String,
                provider LowCardinality(String),
                model LowCardinality(String),
                input_tokens UInt64,
                output_tokens UInt64,
                cache_read_tokens UInt64,
                cache_write_tokens UInt64,
                reasoning_tokens UInt64,
                usage String,
                -- Money as integer atto-dollars (1e-18 USD): exact, and cheap to write; read as USD below.
                cost_atto Nullable(Int128),
                cost_input_atto Nullable(Int128),
                cost_output_atto Nullable(Int128),
                cost_usd Nullable(Decimal(38, 18)) ALIAS toDecimal128(cost_atto, 0) * {atto},
                cost_input_usd Nullable(Decimal(38, 18)) ALIAS toDecimal128(cost_input_atto, 0) * {atto},
                cost_output_usd Nullable(Decimal(38, 18)) ALIAS toDecimal128(cost_output_atto, 0) * {atto},
                price_source LowCardinality(String),
                status LowCardinality(String),
                src_topic LowCardinality(String),
                src_partition Int32,
                src_offset Int64,
                src_index Int32,
                INDEX time_minmax time TYPE minmax GRANULARITY 1
            )
            ENGINE = {engine}ReplacingMergeTree
            ORDER BY (source, id)
            """,
        ),
    ),
    Migration(
        2,
        "holes in the offset chain an operator accepted (meterstream accept-gap)",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.accepted_gaps {on_cluster} (
                src_topic String,
                src_partition Int32,
                first_offset Int64,
                last_offset Int64,
                reason String,
                accepted_at DateTime64(3, 'UTC') DEFAULT now64(3)
            )
            ENGINE = {engine}MergeTree
            ORDER BY (src_topic, src_partition, first_offset)
            """,
        ),
    ),
    Migration(
        3,
        "user meters' 1-minute states, and the audit log's offsets indexed",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.meter_windows {on_cluster} (
                -- A user meter's UserMeter.state_id.
                meter_id String,
                subject String,
                window_start DateTime('UTC'),
                -- The values of the meter's groupBy keys, in its order.
                groups Array(String),
                -- Set on offset markers only (subject = ''): the events topic and partition they track.
                src_topic LowCardinality(String),
                src_partition Int32,
                events SimpleAggregateFunction(sum, UInt64),
                -- Events with the value the meter needs: a number (any text for UNIQUE_COUNT).
                n_values SimpleAggregateFunction(sum, UInt64),
                value_sum SimpleAggregateFunction(sum, Decimal(76, 18)),
                value_min SimpleAggregateFunction(min, Nullable(Decimal(76, 18))),
                value_max SimpleAggregateFunction(max, Nullable(Decimal(76, 18))),
                uniques SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
                -- (time, id, value) of the latest event with a value; ties in time broken by the id.
                latest SimpleAggregateFunction(max, Tuple(DateTime64(6, 'UTC'), String, Decimal(76, 18))),
                applied_offset SimpleAggregateFunction(max, Int64),
                -- 1 once the states were caught up with the partition's applied offset (its backfill done).
                caught_up SimpleAggregateFunction(max, UInt8)
            )
            ENGINE = {engine}AggregatingMergeTree
            ORDER BY (meter_id, subject, window_start, groups, src_topic, src_partition)
            SETTINGS non_replicated_deduplication_window = 10000
            """,
            # The sink reads the audit log by source offsets (the rows of the batch it just wrote): recent
            # parts hold them, and the index lets the read skip the rest.
            """
            ALTER TABLE {db}.usage_events {on_cluster}
            ADD INDEX IF NOT EXISTS src_offset_minmax src_offset TYPE minmax GRANULARITY 1
            """,
        ),
    ),
)

_MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS {db}.meterstream_migrations {on_cluster} (
    version UInt32,
    description String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = {engine}MergeTree ORDER BY version
"""


def _render(statement: str, ch: ClickHouse) -> str:
    cluster = ch.settings.cluster
    return statement.format(
        db=f"`{ch.database}`",
        on_cluster=f"ON CLUSTER `{cluster}`" if cluster else "",
        engine="Replicated" if cluster else "",
        atto="toDecimal128('0.000000000000000001', 18)",
    )


def migrate(ch: ClickHouse) -> list[int]:
    """Apply the migrations not applied yet, in order; returns the versions applied now. Safe to run
    from several processes at once: every statement is idempotent. A read-only user (the query service's in
    docker-compose.yml) applies none: it checks that every one is applied, SchemaNotApplied if not."""
    client = ch.client()
    if ch.read_only:
        missing = [m.version for m in MIGRATIONS if m.version not in _applied(ch)]
        if missing:
            raise SchemaNotApplied(
                f"ClickHouse database {ch.database} lacks migrations {missing}, and user "
                f"{ch.settings.username or 'default'} may only read: apply them with `meterstream migrate` "
                "as a user that may write (docker-compose.yml: the init-schema service)"
            )
        return []
    client.command(_render(_MIGRATIONS_TABLE, ch))
    done = {row[0] for row in client.query(f"SELECT version FROM `{ch.database}`.meterstream_migrations").result_rows}
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for statement in migration.statements:
            client.command(_render(statement, ch))
        client.insert(
            "meterstream_migrations",
            [[migration.version, migration.description]],
            column_names=["version", "description"],
        )
        log.info("clickhouse: applied migration %d (%s)", migration.version, migration.description)
        applied.append(migration.version)
    return applied


class SchemaNotApplied(MeterstreamError):
    """The ClickHouse schema lacks migrations, and this user may not apply them."""


def _applied(ch: ClickHouse) -> set[int]:
    """The versions applied, without writing anything (none without the migrations table)."""
    client = ch.client()
    tables = client.query(
        "SELECT count() FROM system.tables WHERE database = {db:String} AND name = 'meterstream_migrations'",
        parameters={"db": ch.database},
    )
    if not tables.result_rows[0][0]:
        return set()
    rows = client.query(f"SELECT version FROM `{ch.database}`.meterstream_migrations").result_rows
    return {int(row[0]) for row in rows}

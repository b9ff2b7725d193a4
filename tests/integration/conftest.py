"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from schemas.settings import ClickHouseSettings
from sinks.clickhouse.connection import ClickHouse
from sinks.clickhouse.schema import migrate


@pytest.fixture
def ch(clickhouse_settings: ClickHouseSettings) -> Iterator[ClickHouse]:
    """The embedded engine with the schema applied, in a database of this test's own (dropped after)."""
    ch = ClickHouse(clickhouse_settings)
    migrate(ch)
    yield ch
    ch.client().command(f"DROP DATABASE IF EXISTS `{ch.database}`")

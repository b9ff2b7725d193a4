"""The command line, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sinks.clickhouse.schema import MIGRATIONS

pytestmark = pytest.mark.integration

MS = str(Path(sys.executable).parent / "meterstream")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MS, *args], check=False, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def test_migrate_then_reconcile_an_empty_store(tmp_path: Path) -> None:
    env = {"METERSTREAM_SINK_CLICKHOUSE__DSN": f"chdb://{tmp_path / 'ch'}"}
    first = run("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert f"applied migrations: {[m.version for m in MIGRATIONS]}" in first.stdout
    again = run("migrate", env=env)
    assert "none (up to date)" in again.stdout
    report = run("reconcile", "--from", "2025-01-01T00:00:00Z", "--to", "2025-02-01T00:00:00Z", env=env)
    assert report.returncode == 0, report.stderr
    assert "0 window(s) differ" in report.stdout


def test_configuration_errors_are_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "prices.yaml"
    bad.write_text("prices: [{provider: a}]")
    result = run("up", "--data-dir", str(tmp_path / "data"), env={"METERSTREAM_PROCESSOR_PRICE_OVERRIDES": str(bad)})
    assert result.returncode == 2
    assert result.stderr.startswith("meterstream: error: invalid price overrides")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "broker.json").exists(), "no broker may be left behind"


def test_help_and_version() -> None:
    assert run("--version").stdout.startswith("meterstream ")
    commands = run("--help").stdout
    for command in ("up", "ingest", "processor", "sink", "query", "migrate", "topics", "reconcile"):
        assert command in commands

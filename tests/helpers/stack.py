"""Real processes for integration and end-to-end tests: the service started the way a user starts it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from meterstream.broker import free_port

BIN = Path(sys.executable).parent
#: The sink's and processors' consumer session in the tests' stacks (6 s by default): a group join waits
#: half the session on the bundled broker, and a restart after a kill waits for the dead member's to end.
SESSION_TIMEOUT_S = "2"


def wait_ready(url: str, timeout_s: float = 60.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} was ready")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s}s: {last}")


@dataclass
class Service:
    """One ``meterstream <command>`` process."""

    command: list[str]
    env: Mapping[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.process = subprocess.Popen(
            [str(BIN / "meterstream"), *self.command],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def stop(self, timeout_s: float = 90.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """kill -9."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class LocalStack:
    """``meterstream up`` in a subprocess, on a free port and its own data directory."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    service: Service | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> LocalStack:
        self.port = self.port or free_port()
        self.service = Service(
            ["up", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            # Authentication is tested on its own (tests/e2e/test_access.py); elsewhere it is off unless a test
            # turns it on.
            {
                "METERSTREAM_LOCAL_AUTH__ENABLED": "false",
                "METERSTREAM_SINK_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S,
                "METERSTREAM_PROCESSOR_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S,
                **self.env,
            },
            self.data_dir.parent / f"{self.data_dir.name}.log",
        )
        self.service.start()
        assert self.service.process is not None
        try:
            wait_ready(f"{self.url}/readyz", timeout_s, self.service.process)
        except Exception:
            print(self.service.log()[-5000:])
            raise
        return self

    def stop(self) -> int | None:
        return self.service.stop() if self.service else None

    def kill(self) -> None:
        if self.service:
            self.service.kill()

    def broker_pid(self) -> int | None:
        state = self.data_dir / "broker.json"
        if not state.exists():
            return None
        import json

        return int(json.loads(state.read_text())["pid"])

    def postgres_pid(self) -> int | None:
        pid_file = self.data_dir / "postgres" / "postmaster.pid"
        if not pid_file.exists():
            return None
        return int(pid_file.read_text().split()[0])

    def kill_postgres(self) -> None:
        """kill -9 of the embedded PostgreSQL's postmaster (its backends exit when they see it gone)."""
        pid = self.postgres_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def start_postgres(self) -> None:
        """Start the data directory's PostgreSQL again (as an operator would after an outage)."""
        from meterstream.pgserver import EmbeddedPostgres

        EmbeddedPostgres.start(self.data_dir / "postgres")

    def kill_broker(self) -> None:
        pid = self.broker_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class MultiProcessStack:
    """The production topology on one machine: the bundled broker, and ``meterstream ingest``,
    ``processor`` (one or more), ``sink`` (with the query API, over the embedded engine) as separate
    processes, configured through their environment exactly as in docker-compose.yml."""

    base: Path
    partitions: int = 4
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Also run the control plane: an embedded PostgreSQL, its DSN given to the sink (which serves the API).
    control: bool = False
    #: More sink processes, each with the query and control API over its own copy of the windows (its own
    #: consumer group and embedded engine): API processes sharing one PostgreSQL.
    replicas: int = 0
    replica_services: list[Service] = field(default_factory=list)
    replica_ports: list[int] = field(default_factory=list)
    broker: Any = None
    postgres: Any = None
    ingest: Service | None = None
    sink: Service | None = None
    processors: list[Service] = field(default_factory=list)
    ingest_port: int = 0
    sink_port: int = 0

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    @property
    def query_url(self) -> str:
        return f"http://127.0.0.1:{self.sink_port}"

    @property
    def api_urls(self) -> list[str]:
        """Every process serving the query and control API: the sink, then its replicas."""
        return [self.query_url, *(f"http://127.0.0.1:{p}" for p in self.replica_ports)]

    def replica_env(self, i: int) -> dict[str, str]:
        return self.env("sink") | {
            "METERSTREAM_SINK_GROUP_ID": f"meterstream-sink-replica-{i}",
            "METERSTREAM_SINK_CLICKHOUSE__DSN": f"chdb://{self.base / f'clickhouse-replica-{i}'}",
            "METERSTREAM_SINK_PORT": str(self.replica_ports[i]),
        }

    def env(self, service: str) -> dict[str, str]:
        prefix = f"METERSTREAM_{service.upper()}_"
        env = {
            f"{prefix}KAFKA__BOOTSTRAP_SERVERS": self.broker.bootstrap,
            f"{prefix}TOPICS__PARTITIONS": str(self.partitions),
            f"{prefix}LOG_LEVEL": "INFO",
        }
        if service in ("ingest", "sink"):
            env[f"{prefix}AUTH__ENABLED"] = "false"  # off unless a test turns it on (it has tests of its own)
        if service == "processor":
            env[f"{prefix}SESSION_TIMEOUT_S"] = SESSION_TIMEOUT_S
            env[f"{prefix}METRICS_PORT"] = str(free_port())
        if service == "sink":
            env[f"{prefix}CLICKHOUSE__DSN"] = f"chdb://{self.base / 'clickhouse'}"
            if self.postgres is not None:
                env[f"{prefix}POSTGRES__DSN"] = self.postgres.uri
            env[f"{prefix}PORT"] = str(self.sink_port)
            env[f"{prefix}SESSION_TIMEOUT_S"] = SESSION_TIMEOUT_S
        if service == "ingest":
            env[f"{prefix}PORT"] = str(self.ingest_port)
            if self.postgres is not None:
                env[f"{prefix}POSTGRES__DSN"] = self.postgres.uri  # the API keys
            env[f"{prefix}PRODUCE_TIMEOUT_MS"] = "3000"
        return env | {k: v for k, v in self.extra_env.items() if k.startswith(prefix)}

    def start(self, processors: int = 1) -> MultiProcessStack:
        from meterstream.broker import LocalBroker

        self.base.mkdir(parents=True, exist_ok=True)
        self.broker = LocalBroker.start(log_path=self.base / "tansu.log")
        if self.control:
            from meterstream.pgserver import EmbeddedPostgres

            self.postgres = EmbeddedPostgres.start(self.base / "postgres")
        self.ingest_port, self.sink_port = free_port(), free_port()
        for _ in range(processors):
            self.add_processor()
        self.sink = Service(["sink"], self.env("sink"), self.base / "sink.log")
        self.sink.start()
        self.replica_ports = [free_port() for _ in range(self.replicas)]
        for i in range(self.replicas):
            replica = Service(["sink"], self.replica_env(i), self.base / f"sink-replica-{i}.log")
            replica.start()
            self.replica_services.append(replica)
        self.ingest = Service(["ingest"], self.env("ingest"), self.base / "ingest.log")
        self.ingest.start()
        self.wait_ready()
        return self

    def add_processor(self) -> Service:
        service = Service(["processor"], self.env("processor"), self.base / f"processor-{len(self.processors)}.log")
        service.start()
        self.processors.append(service)
        return service

    def processor_ready_url(self, service: Service) -> str:
        return f"http://127.0.0.1:{service.env['METERSTREAM_PROCESSOR_METRICS_PORT']}/readyz"

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        assert self.ingest and self.sink
        for service in self.processors:
            wait_ready(self.processor_ready_url(service), timeout_s, service.process)
        wait_ready(f"{self.query_url}/readyz", timeout_s, self.sink.process)
        for url, replica in zip(self.api_urls[1:], self.replica_services, strict=True):
            wait_ready(f"{url}/readyz", timeout_s, replica.process)
        wait_ready(f"{self.ingest_url}/readyz", timeout_s, self.ingest.process)

    def restart(self, service: Service, timeout_s: float = 90.0) -> None:
        service.start()
        if service is self.ingest:
            wait_ready(f"{self.ingest_url}/readyz", timeout_s, service.process)
        elif service is self.sink:
            wait_ready(f"{self.query_url}/readyz", timeout_s, service.process)
        elif service in self.replica_services:
            url = self.api_urls[1 + self.replica_services.index(service)]
            wait_ready(f"{url}/readyz", timeout_s, service.process)
        else:
            wait_ready(self.processor_ready_url(service), timeout_s, service.process)

    def logs(self) -> str:
        services = [self.ingest, self.sink, *self.replica_services, *self.processors]
        parts = [s.log()[-3000:] for s in services if s is not None]
        return "\n-----\n".join(parts)

    def running(self, processors: int = 1) -> Iterator[MultiProcessStack]:
        """Start, hand the stack out, stop: a fixture's body (the logs are printed when it fails to start)."""
        try:
            self.start(processors=processors)
        except Exception:
            print(self.logs())
            self.stop()
            raise
        yield self
        self.stop()

    def stop(self) -> None:
        for service in [self.ingest, *self.processors, self.sink, *self.replica_services]:
            if service is not None:
                service.stop(30)
        if self.broker is not None:
            self.broker.stop()
        if self.postgres is not None:
            self.postgres.stop()

"""Real processes for integration and end-to-end tests: the service started the way a user starts it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from meterstream.broker import free_port

BIN = Path(sys.executable).parent


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
            self.env,
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

    def kill_broker(self) -> None:
        pid = self.broker_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

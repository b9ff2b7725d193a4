"""A real webhook receiver for tests: an HTTP server on 127.0.0.1 in a thread that records every request
and verifies its Standard Webhooks signature with the ``standardwebhooks`` library (as any receiver would).

Modes: ``ok`` (204), ``fail`` (500), ``hang`` (answers nothing for ``hang_s``, past the sender's timeout).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    webhook_id: str
    headers: dict[str, str]
    body: bytes
    at: float
    verified: bool
    answered: int | None
    path: str

    @property
    def payload(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    secret: str | None = None
    mode: str = "ok"
    hang_s: float = 5.0
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified = False
                if receiver.secret is not None:
                    try:
                        Webhook(receiver.secret).verify(body, headers)
                        verified = True
                    except WebhookVerificationError:
                        verified = False
                mode = receiver.mode
                status = {"ok": 204, "fail": 500}.get(mode)
                record = Received(
                    headers.get("webhook-id", ""), headers, body, time.time(), verified, status, self.path
                )
                with receiver.lock:
                    receiver.received.append(record)
                if mode == "hang":
                    time.sleep(receiver.hang_s)
                    record.answered = None
                    return
                assert status is not None
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        return Handler

    def start(self) -> Receiver:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def delivered(self) -> list[Received]:
        """What was answered 2xx, first arrival of each webhook-id only."""
        seen: set[str] = set()
        out = []
        with self.lock:
            for r in self.received:
                if r.answered == 204 and r.webhook_id not in seen:
                    seen.add(r.webhook_id)
                    out.append(r)
        return out

    def wait_for(self, check: Callable[[list[Received]], bool], timeout_s: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.delivered()
            if check(got):
                return got
            time.sleep(0.05)
        seen = [
            (r.payload["type"], r.payload["data"].get("subject", {}).get("key"), r.payload["data"].get("threshold"))
            for r in self.delivered()
        ]
        raise AssertionError(f"not received in {timeout_s}s; got {seen[-20:]}")


@contextmanager
def receiving(secret: str | None = None) -> Iterator[Receiver]:
    r = Receiver(secret).start()
    try:
        yield r
    finally:
        r.stop()

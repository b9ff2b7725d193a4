"""An HTTP proxy in front of Meterstream that loses answers: for testing that a client's retries neither
lose nor double-count events.

``lose_acks`` ingest requests are forwarded and stored upstream, but the client gets a 503 instead of the
204 (an acknowledgement lost on the way back: the client must resend, and Meterstream must count once);
then ``refuse`` requests are answered 503 without being forwarded. Everything else passes through.
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import orjson

from tests.helpers.stub_providers import QuietServer


class FlakyProxy:
    def __init__(self, upstream: str, *, lose_acks: int = 0, refuse: int = 0) -> None:
        self.upstream = upstream
        self.lose_acks = lose_acks
        self.refuse = refuse
        #: How many times each event id was posted through the proxy.
        self.posted: Counter[str] = Counter()
        self.ingest_requests = 0
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=upstream, timeout=30)
        self._server: QuietServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FlakyProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="flaky-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._http.close()

    def _decide(self, body: bytes) -> str:
        """``lose`` (forward, answer 503), ``refuse`` (answer 503) or ``pass``."""
        with self._lock:
            self.ingest_requests += 1
            try:
                events = orjson.loads(body)
                self.posted.update(e["id"] for e in (events if isinstance(events, list) else [events]))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                pass
            if self.lose_acks > 0:
                self.lose_acks -= 1
                return "lose"
            if self.refuse > 0:
                self.refuse -= 1
                return "refuse"
            return "pass"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FlakyProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._forward(b"")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/api/v1/events"):
            action = self.owner._decide(body)
            if action == "refuse":
                self._answer(503, b'{"status":503,"detail":"flaky proxy: refused"}', {"Retry-After": "0"})
                return
            if action == "lose":
                upstream = self._send_upstream(body)
                assert upstream.status_code == 204, upstream.text
                self._answer(503, b'{"status":503,"detail":"flaky proxy: acknowledgement lost"}', {})
                return
        self._forward(body)

    def _send_upstream(self, body: bytes) -> httpx.Response:
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
        return self.owner._http.request(self.command, self.path, content=body or None, headers=headers)

    def _forward(self, body: bytes) -> None:
        try:
            upstream = self._send_upstream(body)
        except httpx.HTTPError as exc:
            self._answer(502, str(exc).encode(), {})
            return
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
        self._answer(upstream.status_code, upstream.content, headers)

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

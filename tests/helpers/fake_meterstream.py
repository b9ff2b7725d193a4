"""An in-process stand-in for Meterstream's ingest endpoint, as an httpx transport, for client unit tests.

It behaves as the server does where the client's correctness depends on it: a request is accepted or
rejected whole; a 400 names each invalid event's index (here: events whose subject is ``invalid``);
events are deduplicated by ``(source, id)``. Scripted answers (statuses, exceptions, lost
acknowledgements) come first, in order.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

#: A scripted answer: an HTTP status, an exception to raise, or "lost" (store, then answer 503).
Step = int | Exception | str


@dataclass
class FakeMeterstream:
    script: list[Step] = field(default_factory=list)
    #: Every ingest request's events, in order (resends included).
    requests: list[list[dict[str, Any]]] = field(default_factory=list)
    #: Raw bodies, to check that a retry resends the same bytes.
    bodies: list[bytes] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    #: Stored events by (source, id): what Meterstream would count.
    stored: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: Called (in the sender's thread) before answering; e.g. to block it.
    before: Callable[[], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.before is not None:
            self.before()
        body = request.content
        events = json.loads(body)
        with self.lock:
            self.requests.append(events)
            self.bodies.append(body)
            self.content_types.append(request.headers.get("content-type", ""))
            step = self.script.pop(0) if self.script else 204
        if isinstance(step, Exception):
            raise step
        if step == "lost":
            self._store(events)
            return httpx.Response(503, json={"status": 503, "detail": "ack lost"})
        if step != 204:
            return httpx.Response(
                step, json={"status": step, "detail": f"scripted {step}"}, headers={"Retry-After": "0"}
            )
        invalid = [i for i, e in enumerate(events) if e.get("subject") == "invalid"]
        if invalid:
            errors = [{"index": i, "field": "subject", "message": "invalid subject"} for i in invalid]
            return httpx.Response(400, json={"status": 400, "detail": "invalid request", "errors": errors})
        self._store(events)
        return httpx.Response(204)

    def _store(self, events: list[dict[str, Any]]) -> None:
        with self.lock:
            for event in events:
                self.stored.setdefault((event["source"], event["id"]), event)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def sent_ids(self) -> Counter[str]:
        return Counter(e["id"] for request in self.requests for e in request)

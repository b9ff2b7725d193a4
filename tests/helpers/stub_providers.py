"""A local stand-in for the OpenAI and Anthropic APIs, for driving the real SDK clients in tests.

Serves ``POST /v1/chat/completions``, ``POST /v1/responses`` and ``POST /v1/messages``, as JSON or as
server-sent events (chunked, one event per chunk), in the shapes the real APIs return, with realistic
usage: OpenAI cached prompt tokens and reasoning tokens, Anthropic cache reads and 5-minute / 1-hour
cache writes. Each response is derived from a hash of the request (ignoring ``stream`` and
``stream_options``), so the same request gives the same text and usage streamed or not, wrapped or not.

Every successful response is recorded in ``served`` with the usage a non-streaming response carries:
the ground truth a test compares Meterstream with. Models starting with ``error`` fail: ``error-400`` with
an HTTP 400, ``error-midstream`` with an error event in the middle of a stream.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Request model -> the model a response names (OpenAI answers with the dated snapshot).
OPENAI_SNAPSHOTS = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "o3-mini": "o3-mini-2025-01-31",
    "gpt-5": "gpt-5-2025-08-07",
}
REASONING_MODELS = ("o3-mini", "gpt-5")

_WORDS = [
    "the",
    "meter",
    "counts",
    "every",
    "token",
    "once",
    "and",
    "the",
    "ledger",
    "agrees",
    "with",
    "the",
    "invoice",
    "to",
    "the",
    "last",
    "digit",
]


@dataclass(frozen=True)
class Served:
    """One successful response: which API, the model it named, and its usage (the complete usage object,
    as a non-streaming response carries it)."""

    api: str  # "chat", "responses" or "messages"
    model: str
    stream: bool
    usage: dict[str, Any]
    #: Chat streams only: whether the request asked for the usage chunk.
    include_usage: bool = False


@dataclass
class _Reply:
    model: str
    text: str
    pieces: list[str]
    usage: dict[str, Any]
    ident: str
    created: int
    rng: random.Random


def _seed(body: dict[str, Any]) -> random.Random:
    key = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _text(rng: random.Random) -> tuple[str, list[str]]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return "".join(pieces), pieces


def _openai_counts(rng: random.Random, model: str) -> tuple[int, int, int, int]:
    prompt = rng.randint(1100, 9000)
    # OpenAI caches prompt prefixes of 1024 tokens and more, in steps of 128.
    cached = 0 if rng.random() < 0.3 else 1024 + 128 * rng.randint(0, (prompt - 1024) // 128)
    completion = rng.randint(40, 1500)
    reasoning = 64 * rng.randint(1, max(1, (completion - 20) // 64)) if model in REASONING_MODELS else 0
    return prompt, cached, completion, min(reasoning, completion - 1)


class StubProviders:
    """The stub server, in a thread, on a free port."""

    def __init__(self) -> None:
        self.served: list[Served] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> StubProviders:
        stub = self

        class Handler(_Handler):
            provider = stub

        self._server = QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="stub-providers", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def served_since(self, mark: int) -> list[Served]:
        with self._lock:
            return list(self.served[mark:])

    def _record(self, served: Served) -> None:
        with self._lock:
            self.served.append(served)

    # -- responses -------------------------------------------------------------------------------------

    def _reply(self, body: dict[str, Any], model: str, usage: dict[str, Any]) -> _Reply:
        rng = _seed(body)
        text, pieces = _text(rng)
        return _Reply(
            model, text, pieces, usage, f"{rng.getrandbits(96):024x}", 1_760_000_000 + rng.randint(0, 10**6), rng
        )

    def chat(self, body: dict[str, Any]) -> tuple[dict[str, Any] | None, Iterator[bytes] | None]:
        rng = _seed(body)
        requested = body["model"]
        prompt, cached, completion, reasoning = _openai_counts(rng, requested)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        reply = self._reply(body, OPENAI_SNAPSHOTS.get(requested, requested), usage)
        common = {
            "id": f"chatcmpl-{reply.ident}",
            "created": reply.created,
            "model": reply.model,
            "service_tier": "default",
            "system_fingerprint": f"fp_{reply.ident[:10]}",
        }
        stream = bool(body.get("stream"))
        include_usage = bool(stream and (body.get("stream_options") or {}).get("include_usage"))
        self._record(Served("chat", reply.model, stream, usage, include_usage))
        if not stream:
            message = {"role": "assistant", "content": reply.text, "refusal": None, "annotations": []}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            return {**common, "object": "chat.completion", "choices": [choice], "usage": usage}, None

        def chunks() -> Iterator[bytes]:
            deltas: list[tuple[dict[str, Any], str | None]] = [
                ({"role": "assistant", "content": "", "refusal": None}, None)
            ]
            deltas += [({"content": piece}, None) for piece in reply.pieces]
            deltas.append(({}, "stop"))
            for delta, finish in deltas:
                chunk: dict[str, Any] = {
                    **common,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                }
                if include_usage:
                    chunk["usage"] = None  # as the API does: null on every chunk but the last
                yield _sse(None, chunk)
            if include_usage:
                yield _sse(None, {**common, "object": "chat.completion.chunk", "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        return None, chunks()

    def responses(self, body: dict[str, Any]) -> tuple[dict[str, Any] | None, Iterator[bytes] | None]:
        rng = _seed(body)
        requested = body["model"]
        prompt, cached, completion, reasoning = _openai_counts(rng, requested)
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion,
        }
        reply = self._reply(body, OPENAI_SNAPSHOTS.get(requested, requested), usage)
        stream = bool(body.get("stream"))
        self._record(Served("responses", reply.model, stream, usage))
        message_id = f"msg_{reply.ident}"
        part = {"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}
        item = {
            "type": "message",
            "id": message_id,
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }

        def response(status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
            return {
                "id": f"resp_{reply.ident}",
                "object": "response",
                "created_at": reply.created,
                "status": status,
                "model": reply.model,
                "output": output,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "temperature": 1.0,
                "top_p": 1.0,
                "service_tier": "default",
                "store": True,
                "truncation": "disabled",
                "error": None,
                "incomplete_details": None,
                "instructions": None,
                "metadata": {},
                "reasoning": {"effort": "medium", "summary": None} if requested in REASONING_MODELS else None,
                "usage": usage if with_usage else None,
            }

        if not stream:
            return response("completed", [item], True), None

        def events() -> Iterator[bytes]:
            seq = iter(range(1_000_000))
            yield _sse(
                "response.created",
                {
                    "type": "response.created",
                    "sequence_number": next(seq),
                    "response": response("in_progress", [], False),
                },
            )
            yield _sse(
                "response.in_progress",
                {
                    "type": "response.in_progress",
                    "sequence_number": next(seq),
                    "response": response("in_progress", [], False),
                },
            )
            started = {**item, "status": "in_progress", "content": []}
            yield _sse(
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "sequence_number": next(seq),
                    "output_index": 0,
                    "item": started,
                },
            )
            where = {"item_id": message_id, "output_index": 0, "content_index": 0}
            empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            yield _sse(
                "response.content_part.added",
                {"type": "response.content_part.added", "sequence_number": next(seq), **where, "part": empty},
            )
            for piece in reply.pieces:
                yield _sse(
                    "response.output_text.delta",
                    {
                        "type": "response.output_text.delta",
                        "sequence_number": next(seq),
                        **where,
                        "delta": piece,
                        "logprobs": [],
                    },
                )
            yield _sse(
                "response.output_text.done",
                {
                    "type": "response.output_text.done",
                    "sequence_number": next(seq),
                    **where,
                    "text": reply.text,
                    "logprobs": [],
                },
            )
            yield _sse(
                "response.content_part.done",
                {"type": "response.content_part.done", "sequence_number": next(seq), **where, "part": part},
            )
            yield _sse(
                "response.output_item.done",
                {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0, "item": item},
            )
            yield _sse(
                "response.completed",
                {
                    "type": "response.completed",
                    "sequence_number": next(seq),
                    "response": response("completed", [item], True),
                },
            )

        return None, events()

    def messages(self, body: dict[str, Any]) -> tuple[dict[str, Any] | None, Iterator[bytes] | None]:
        rng = _seed(body)
        model = body["model"]
        fresh = rng.randint(3, 2500)
        write_5m = 0 if rng.random() < 0.4 else rng.randint(1024, 6000)
        write_1h = 0 if rng.random() < 0.6 else rng.randint(1024, 4000)
        read = 0 if rng.random() < 0.3 else rng.randint(1024, 40_000)
        output = rng.randint(20, 1800)
        usage = {
            "input_tokens": fresh,
            "cache_creation_input_tokens": write_5m + write_1h,
            "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h},
            "output_tokens": output,
            "service_tier": "standard",
        }
        reply = self._reply(body, model, usage)
        stream = bool(body.get("stream"))
        failing = model == "error-midstream"
        if not failing:
            self._record(Served("messages", model, stream, usage))
        message = {
            "id": f"msg_{reply.ident}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": reply.text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not stream:
            return message, None
        # Newer API versions repeat the (cumulative) input-side counts in message_delta; older send output only.
        cumulative = reply.rng.random() < 0.5

        def events() -> Iterator[bytes]:
            start_usage = {**usage, "output_tokens": 1}
            yield _sse(
                "message_start",
                {
                    "type": "message_start",
                    "message": {**message, "content": [], "stop_reason": None, "usage": start_usage},
                },
            )
            yield _sse(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            yield _sse("ping", {"type": "ping"})
            for i, piece in enumerate(reply.pieces):
                if failing and i == 2:
                    yield _sse(
                        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
                    )
                    return
                yield _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
                )
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            delta_usage: dict[str, Any] = {"output_tokens": output}
            if cumulative:
                delta_usage.update(
                    input_tokens=fresh, cache_creation_input_tokens=write_5m + write_1h, cache_read_input_tokens=read
                )
            yield _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": delta_usage,
                },
            )
            yield _sse("message_stop", {"type": "message_stop"})

        return None, events()


class QuietServer(ThreadingHTTPServer):
    """A client closing a kept-alive connection is normal: no traceback on stderr for it."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _sse(event: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    provider: StubProviders

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        with self.provider._lock:
            self.provider.requests += 1
        routes = {
            "/v1/chat/completions": self.provider.chat,
            "/v1/responses": self.provider.responses,
            "/v1/messages": self.provider.messages,
        }
        route = routes.get(self.path.split("?")[0])
        if route is None:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        if str(body.get("model", "")) == "error-400":
            if self.path.startswith("/v1/messages"):
                error = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad model"}}
            else:
                error = {
                    "error": {"message": "bad model", "type": "invalid_request_error", "param": "model", "code": None}
                }
            self._json(400, error)
            return
        document, stream = route(body)
        if stream is None:
            assert document is not None
            self._json(200, document)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in stream:
            self.wfile.write(f"{len(event):X}\r\n".encode() + event + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _json(self, status: int, document: dict[str, Any]) -> None:
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

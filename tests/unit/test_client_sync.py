"""MeterstreamClient against an in-process fake of Meterstream: batching, retries, the buffer policy,
flush, close and the exit hook."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import meterstream_client as mc
import pytest
from meterstream_client._query import METERS

from tests.helpers.fake_meterstream import FakeMeterstream

FAST = mc.RetryPolicy(initial_delay=0.01, max_delay=0.05)
USAGE = {"prompt_tokens": 10, "completion_tokens": 2}


def client(fake: FakeMeterstream, **options: object) -> mc.MeterstreamClient:
    settings: dict[str, object] = {"flush_interval": 5.0, "retry": FAST, "source": "unit"}
    settings.update(options)
    return mc.MeterstreamClient("http://meterstream.test", transport=fake.transport, **settings)  # type: ignore[arg-type]


def emit(meter: mc.MeterstreamClient | mc.AsyncMeterstreamClient, n: int, subject: str = "alice") -> list[str | None]:
    return [meter.emit(subject, "openai", "gpt-4o-mini", USAGE) for _ in range(n)]


def test_batches_up_to_the_limit_and_flush_sends_at_once() -> None:
    fake = FakeMeterstream()
    with client(fake, max_batch_events=10) as meter:
        ids = emit(meter, 25)
        started = time.monotonic()
        assert meter.flush(timeout=5)
        assert time.monotonic() - started < 2, "flush does not wait for flush_interval"
    assert [len(r) for r in fake.requests] == [10, 10, 5]
    assert set(fake.content_types) == {"application/cloudevents-batch+json"}
    assert sorted(fake.sent_ids()) == sorted(i for i in ids if i)
    assert meter.stats == mc.DeliveryStats(25, 25, 0, 0, 0, 0)


def test_batches_are_sent_after_flush_interval_without_flush() -> None:
    fake = FakeMeterstream()
    with client(fake, flush_interval=0.05) as meter:
        emit(meter, 3)
        deadline = time.monotonic() + 5
        while meter.stats.delivered < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert meter.stats.delivered == 3
        assert len(fake.requests) == 1


def test_batches_respect_the_byte_limit() -> None:
    fake = FakeMeterstream()
    with client(fake, max_batch_bytes=2048) as meter:
        emit(meter, 20)
        assert meter.flush(timeout=5)
    assert len(fake.requests) > 1
    assert all(len(body) <= 2048 for body in fake.bodies)


def test_retries_resend_the_same_bytes_until_acknowledged() -> None:
    fake = FakeMeterstream(script=[503, httpx.ConnectError("refused"), 500, 429, httpx.ReadTimeout("slow")])
    with client(fake) as meter:
        emit(meter, 4)
        assert meter.flush(timeout=5)
        stats = meter.stats
    assert len(fake.bodies) == 6 and len(set(fake.bodies)) == 1
    assert (stats.delivered, stats.retries, stats.dropped) == (4, 5, 0)
    assert len(fake.stored) == 4


def test_a_lost_acknowledgement_is_resent_and_counted_once() -> None:
    fake = FakeMeterstream(script=["lost", "lost"])
    with client(fake) as meter:
        emit(meter, 3)
        assert meter.flush(timeout=5)
    assert set(fake.sent_ids().values()) == {3}
    assert len(fake.stored) == 3


def test_invalid_events_are_rejected_and_the_rest_delivered(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeMeterstream()
    dropped: list[mc.DroppedEvent] = []
    with client(fake, on_drop=dropped.append) as meter:
        good = emit(meter, 2)
        bad = meter.emit("invalid", "openai", "gpt-4o", USAGE)
        good += emit(meter, 2)
        assert meter.flush(timeout=5)
        stats = meter.stats
    assert (stats.delivered, stats.rejected, stats.pending) == (4, 1, 0)
    assert {e["id"] for e in fake.stored.values()} == set(good)
    assert [(d.event["id"], d.reason, d.detail) for d in dropped] == [(bad, "rejected", "subject: invalid subject")]
    assert "rejected by the server" in caplog.text


def test_full_buffer_drops_the_new_event_after_waiting(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    fake = FakeMeterstream(before=lambda: release.wait(10))
    dropped: list[mc.DroppedEvent] = []
    with client(fake, max_buffer=3, full_timeout=0.1, on_drop=dropped.append) as meter:
        kept = emit(meter, 3)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, "meterstream_client"):
            assert meter.emit("alice", "openai", "gpt-4o", USAGE) is None
            assert meter.emit("alice", "openai", "gpt-4o", USAGE) is None
        assert 0.2 <= time.monotonic() - started < 2
        assert meter.stats.dropped == 2 and [d.reason for d in dropped] == ["buffer_full"] * 2
        assert caplog.text.count("buffer full") == 1, "one warning per burst, not one per event"
        release.set()
        assert meter.flush(timeout=5)
    assert {e["id"] for e in fake.stored.values()} == set(kept)


def test_full_buffer_raises_with_on_full_raise() -> None:
    release = threading.Event()
    fake = FakeMeterstream(before=lambda: release.wait(10))
    with client(fake, max_buffer=1, full_timeout=0, on_full="raise") as meter:
        emit(meter, 1)
        with pytest.raises(mc.BufferFullError):
            emit(meter, 1)
        assert meter.stats.dropped == 0
        release.set()


def test_flush_times_out_while_meterstream_is_down() -> None:
    fake = FakeMeterstream(script=[503] * 1000)
    meter = client(fake)
    emit(meter, 2)
    assert not meter.flush(timeout=0.3)
    assert meter.stats.pending == 2 and meter.stats.retries > 0
    fake.script.clear()
    assert meter.flush(timeout=5)
    meter.close()


def test_close_gives_up_at_its_deadline_and_reports_what_is_lost() -> None:
    fake = FakeMeterstream(script=[503] * 10_000)
    dropped: list[mc.DroppedEvent] = []
    meter = client(fake, on_drop=dropped.append, retry=mc.RetryPolicy(initial_delay=5, max_delay=5))
    ids = emit(meter, 3)
    started = time.monotonic()
    meter.close(timeout=0.5)
    assert time.monotonic() - started < 3
    assert meter.stats.dropped == 3 and meter.stats.pending == 0
    assert sorted(d.event["id"] for d in dropped) == sorted(ids) and {d.reason for d in dropped} == {"shutdown"}
    with pytest.raises(RuntimeError, match="closed"):
        emit(meter, 1)
    assert len(fake.requests) >= 2, "kept trying until the deadline"


def test_no_thread_before_the_first_event() -> None:
    fake = FakeMeterstream()
    before = {t.name for t in threading.enumerate()}
    meter = client(fake)
    assert "meterstream-sender" not in {t.name for t in threading.enumerate()} - before
    emit(meter, 1)
    assert any(t.name == "meterstream-sender" and t.daemon for t in threading.enumerate())
    meter.close()


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_events"):
        mc.MeterstreamClient(max_batch_events=1001)
    with pytest.raises(ValueError, match="max_batch_bytes"):
        mc.MeterstreamClient(max_batch_bytes=2 * 1024 * 1024)
    with pytest.raises(ValueError, match="on_full"):
        mc.MeterstreamClient(on_full="block")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_buffer"):
        mc.MeterstreamClient(max_buffer=0)


def test_events_larger_than_a_batch_are_refused_at_emit() -> None:
    meter = client(FakeMeterstream(), max_batch_bytes=1024)
    with pytest.raises(ValueError, match="bytes"):
        meter.emit("alice", "openai", "gpt-4o", {"prompt_tokens": 1, "padding": "x" * 2000})
    meter.close()


EXIT_SCRIPT = """
import json, sys, httpx, meterstream_client as mc
out = open(sys.argv[1], "w")
def handle(request):
    out.write(request.content.decode() + "\\n"); out.flush()
    return httpx.Response(204)
meter = mc.{cls}("http://meterstream.test", transport=httpx.MockTransport(handle), flush_interval=60)
{emit}
# no flush, no close: the exit hook must deliver
"""


@pytest.mark.parametrize(
    ("cls", "emit_code"),
    [
        ("MeterstreamClient", "for i in range(5): meter.emit('alice', 'openai', 'gpt-4o', {'prompt_tokens': i})"),
        (
            "AsyncMeterstreamClient",
            "import asyncio\n"
            "async def main():\n"
            "    for i in range(5): meter.emit('alice', 'openai', 'gpt-4o', {'prompt_tokens': i})\n"
            "asyncio.run(main())",
        ),
    ],
)
def test_the_exit_hook_delivers_what_was_never_flushed(tmp_path: Path, cls: str, emit_code: str) -> None:
    out = tmp_path / "delivered.jsonl"
    script = EXIT_SCRIPT.format(cls=cls, emit=emit_code)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(out)], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    events = [e for line in out.read_text().splitlines() for e in json.loads(line)]
    assert sorted(e["data"]["usage"]["prompt_tokens"] for e in events) == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_with_an_empty_buffer() -> None:
    release = threading.Event()
    fake = FakeMeterstream(before=lambda: release.wait(10))
    meter = client(fake)
    emit(meter, 2)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's pending events are the parent's to deliver
        ok = meter.stats.pending == 0 and meter.emit("child", "openai", "gpt-4o", USAGE) is not None
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    release.set()
    assert meter.flush(timeout=5)
    meter.close()


def test_the_package_depends_on_httpx_only_and_not_on_the_server() -> None:
    requires = importlib.metadata.requires("meterstream-client") or []
    assert [r for r in requires if "extra ==" not in r] == ["httpx<1,>=0.27"]
    code = (
        "import sys, meterstream_client\n"
        "bad = {m.split('.')[0] for m in sys.modules} & {'schemas', 'ingest', 'processors', 'sinks', 'query',"
        " 'meterstream', 'openai', 'anthropic', 'pydantic'}\n"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()


# -- the API key -------------------------------------------------------------------------------------------

KEY = "ms_ingest_01JDQ4S6ZB1X3M5E8QW2N7R9TK_4m3Q0mJx1S9Zb2pY7vRkqL8wT5nC6hD0eF3gH4iJ5kL"


class Recorder:
    """An httpx transport answering ingest (204) and meter queries (no rows), keeping each request's
    ``Authorization`` header (None without one)."""

    def __init__(self) -> None:
        self.authorization: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.authorization.append((request.url.path, request.headers.get("authorization")))
        if request.url.path == "/api/v1/events":
            return httpx.Response(204)
        return httpx.Response(200, json={"windowSize": "DAY", "data": []})

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def paths(self) -> set[str]:
        return {path for path, _ in self.authorization}

    def headers(self) -> set[str | None]:
        return {value for _, value in self.authorization}


def events_and_query(recorder: Recorder, **options: object) -> None:
    settings: dict[str, object] = {"flush_interval": 5.0, "retry": FAST, "source": "unit"}
    settings.update(options)
    with mc.MeterstreamClient("http://meterstream.test", transport=recorder.transport, **settings) as meter:  # type: ignore[arg-type]
        emit(meter, 3)
        assert meter.flush(timeout=5)
        meter.query_usage("alice")


def test_the_api_key_is_sent_on_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERSTREAM_API_KEY", raising=False)
    recorder = Recorder()
    events_and_query(recorder, api_key=KEY)
    assert recorder.paths() == {"/api/v1/events", *(f"/api/v1/meters/{m}/query" for m in METERS)}
    assert recorder.headers() == {f"Bearer {KEY}"}


def test_the_api_key_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERSTREAM_API_KEY", KEY)
    recorder = Recorder()
    events_and_query(recorder)
    assert recorder.headers() == {f"Bearer {KEY}"}
    # An explicit key wins over the environment; an empty one sends none.
    recorder = Recorder()
    events_and_query(recorder, api_key="ms_read_other")
    assert recorder.headers() == {"Bearer ms_read_other"}
    recorder = Recorder()
    events_and_query(recorder, api_key="")
    assert recorder.headers() == {None}


def test_without_a_key_no_authorization_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERSTREAM_API_KEY", raising=False)
    recorder = Recorder()
    events_and_query(recorder)
    assert recorder.headers() == {None}


@pytest.mark.parametrize("name", ["Authorization", "authorization"])
def test_an_explicit_authorization_header_wins_over_the_key(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("METERSTREAM_API_KEY", KEY)
    recorder = Recorder()
    events_and_query(recorder, api_key="ms_read_ignored", headers={name: "Basic Z2F0ZXdheTpzZWNyZXQ="})
    assert recorder.headers() == {"Basic Z2F0ZXdheTpzZWNyZXQ="}

"""Logs: JSON lines when not on a terminal, text on one; Faust's service state lines are not logged."""

from __future__ import annotations

import io
import logging
import sys

import orjson
import pytest

from meterstream.logs import configure_logging


def _capture(monkeypatch: pytest.MonkeyPatch, tty: bool) -> io.StringIO:
    stream = io.StringIO()
    stream.isatty = lambda: tty  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO")
    return stream


def test_json_lines_off_a_terminal_without_faust_state_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        stream = _capture(monkeypatch, tty=False)
        logging.getLogger("processors.app").info("[^-_Consumer]: Starting...")
        logging.getLogger("sinks.consumer").info("sink: %d stored", 3)
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1
        assert orjson.loads(lines[0])["message"] == "sink: 3 stored"
        stream = _capture(monkeypatch, tty=True)
        logging.getLogger("sinks.consumer").warning("plain")
        assert stream.getvalue().rstrip().endswith("WARNING sinks.consumer: plain")
    finally:
        root.handlers[:], root.level = handlers, level

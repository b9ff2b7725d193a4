"""Logging: one JSON object per line for services (machine-readable), plain text on a terminal."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(body).decode()


class QuietServiceStates(logging.Filter):
    """Drops Faust's (mode's) service state lines below WARNING (``[^-_Consumer]: Starting...``): they name
    internal services starting and stopping, and come under our processor's logger because its consumer
    thread subclasses theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not str(record.msg).startswith("[^")


def configure_logging(level: str = "INFO") -> None:
    """Human-readable lines on a terminal, one JSON object per line otherwise (to a collector)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(QuietServiceStates())
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Faust and aiokafka are chatty at INFO.
    for noisy in ("faust", "mode", "aiokafka", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))

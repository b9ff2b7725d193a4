"""Meterstream: metering of LLM token usage and cost per end user."""

__version__ = "0.1.0"

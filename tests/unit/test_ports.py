"""Ports for servers that start a moment later: outside the kernel's ephemeral range, never one twice."""

from __future__ import annotations

import multiprocessing
import socket
from pathlib import Path

import pytest

from meterstream.broker import free_port

RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def test_free_ports_are_bindable_below_the_ephemeral_range_and_distinct() -> None:
    if not RANGE.exists():
        pytest.skip("no ephemeral range to stay out of on this system")
    low = int(RANGE.read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    if low - 16_000 >= 1024:
        # An outgoing connection takes its local port from the ephemeral range: a listener's port from there
        # could be taken between the pick and the bind ("address already in use", seen in CI).
        assert all(low - 16_000 <= p < low for p in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def _pick(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


def test_processes_picking_ports_at_once_never_pick_the_same() -> None:
    # The tests' workers and the `meterstream up` each starts pick ports independently; two once picked the
    # same port, and the server that bound it second failed ("address already in use", seen in CI).
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        picks = pool.map(_pick, [200, 200, 200])
    ports = [p for pick in picks for p in pick]
    assert len(set(ports)) == len(ports)

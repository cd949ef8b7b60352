"""Shared pytest set-up: keep torch to one thread so tests share the 2 cores fairly, and own
the real-process swarms so their children are reaped even when a test fails."""

import signal

try:
    import torch
except ImportError:  # the transport tests do not need torch
    torch = None

if torch is not None:
    torch.set_num_threads(1)

import pytest

from scenarios.swarm import Swarm


@pytest.fixture
def swarm(tmp_path):
    """A bootstrap and `atlas-node join` processes for one test (scenarios/swarm.py), heartbeat 0.5 s,
    120 s for a process to bind or join (a loaded machine starts torch slowly).

    Whatever still runs at the end is SIGKILLed and reaped, pass or fail."""
    launched = Swarm(tmp_path / "swarm", heartbeat_s=0.5, start_timeout=120.0)
    yield launched
    launched.close(signal.SIGKILL)

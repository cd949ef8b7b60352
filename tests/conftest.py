"""Shared pytest set-up: keep torch to one thread so tests share the 2 cores fairly."""
try:
    import torch
except ImportError:  # the transport tests do not need torch
    torch = None

if torch is not None:
    torch.set_num_threads(1)

import pytest


@pytest.fixture
def procs(tmp_path):
    """Real node/bootstrap processes for one test, always reaped (tests/runtime_launch.py)."""
    from tests.runtime_launch import Procs

    launched = Procs(tmp_path)
    yield launched
    launched.close()

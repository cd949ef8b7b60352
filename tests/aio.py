"""Small asyncio helper shared by the socket tests: one async test body with an overall deadline.

Polling waits are `scenarios.waiting.wait_until_async`."""

from __future__ import annotations

import asyncio


def run(coro, timeout: float = 30.0):
    """Run one async test body in a fresh event loop, with an overall deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))

"""Small asyncio helpers shared by the socket tests: an overall deadline and a polling wait."""

from __future__ import annotations

import asyncio
import time


def run(coro, timeout: float = 30.0):
    """Run one async test body in a fresh event loop, with an overall deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Poll `predicate()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)

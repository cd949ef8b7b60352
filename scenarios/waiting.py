"""Wait on a condition by polling it, with a deadline and a message naming what was awaited.

The one polling rule of the tests, scenarios and benchmarks: call `predicate()` every
`interval` seconds until it returns something truthy and return that value; an exception
from the predicate counts as "not yet" (a bootstrap that is restarting, a file half
written) and the last one is quoted on timeout. `wait_until` blocks the thread;
`wait_until_async` sleeps on the event loop, for conditions that coroutines of the same
loop make true (the in-process swarm, the socket tests).

    wait_until(lambda: path.exists(), 60, what="the first checkpoint")
    await wait_until_async(lambda: node.server is not None, 30, what="the node to serve")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(RuntimeError):
    """A condition did not hold before its deadline."""


class _Poll:
    """One wait: the deadline, and the last error the predicate raised."""

    def __init__(self, predicate: Callable[[], T], timeout: float, what: str) -> None:
        self.predicate = predicate
        self.timeout = timeout
        self.what = what
        self.deadline = time.monotonic() + timeout
        self.last_error: Exception | None = None

    def attempt(self) -> T | None:
        """The predicate's value when truthy, else None; WaitTimeout once past the deadline."""
        try:
            value = self.predicate()
            if value:
                return value
        except Exception as exc:  # "not yet": quoted if the wait times out
            self.last_error = exc
        if time.monotonic() >= self.deadline:
            detail = f" (last error: {self.last_error!r})" if self.last_error else ""
            raise WaitTimeout(f"timed out after {self.timeout:g} s waiting for {self.what}{detail}")
        return None


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "condition") -> T:
    """Poll `predicate()` every `interval` s until truthy and return its value (WaitTimeout after `timeout` s)."""
    poll = _Poll(predicate, timeout, what)
    while (value := poll.attempt()) is None:
        time.sleep(interval)
    return value


async def wait_until_async(
    predicate: Callable[[], T], timeout: float, interval: float = 0.02, what: str = "condition"
) -> T:
    """`wait_until` that sleeps on the running event loop between polls."""
    poll = _Poll(predicate, timeout, what)
    while (value := poll.attempt()) is None:
        await asyncio.sleep(interval)
    return value

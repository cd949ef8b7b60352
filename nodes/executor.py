"""The one thread a node runs torch in (STYLE 10): heartbeats and RPC keep flowing meanwhile.

Every torch call of a node (training steps, helper steps, folds, fingerprint, eval,
export) goes through `TorchExecutor.run`, so they never overlap and the event loop never
blocks on them. The thread sets `torch.set_num_threads(threads)` before its first job.

Jobs of all executors in one process also take turns (`TORCH_LOCK`): torch's global RNG
is shared by threads, and model builds, peft initialisation and the seeded steps all
fork and seed it, so two nodes sharing a process (the in-process swarm) would otherwise
draw each other's numbers. With one node per process the lock is never contended.

With hundreds of nodes in a process it is (a 1,000-node run kept about 240 jobs waiting
per process), so it is a `TorchGate`: waiters are served in arrival order, and `urgent`
ones (a helper's work for an owner, which waits on it with a deadline) before the rest
(a node's own steps, builds, folds, evaluation). A plain lock wakes an arbitrary waiter,
and helper steps starved past the owners' step timeout while the swarm began its first
round.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class TorchGate:
    """A reentrant lock that hands itself over in order: urgent waiters first, then the
    others, each in arrival order. `with gate:` waits as a normal job."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._waiting: tuple[collections.deque, collections.deque] = (collections.deque(), collections.deque())

    def acquire(self, urgent: bool = False) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None and not any(self._waiting):
                self._owner, self._depth = me, 1
                return
            turn = threading.Lock()
            turn.acquire()
            self._waiting[0 if urgent else 1].append((turn, me))
        turn.acquire()  # released by the release that hands the gate to this thread

    def release(self) -> None:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("TorchGate released by a thread that does not hold it")
            self._depth -= 1
            if self._depth:
                return
            for queue in self._waiting:
                if queue:
                    turn, self._owner = queue.popleft()
                    self._depth = 1
                    turn.release()
                    return
            self._owner = None

    def waiting(self) -> int:
        """Threads waiting for the gate now."""
        with self._mutex:
            return sum(len(q) for q in self._waiting)

    def __enter__(self) -> TorchGate:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


TORCH_LOCK = TorchGate()


@contextlib.contextmanager
def torch_lock_released() -> Iterator[None]:
    """Inside a job: let other nodes' torch jobs run while this one waits on the network
    (a fingerprint computed across a cut waits for its helper, which may share the process);
    it then takes the gate back ahead of the jobs that have not started."""
    TORCH_LOCK.release()
    try:
        yield
    finally:
        TORCH_LOCK.acquire(urgent=True)


def _locked(fn: Callable[..., Any], urgent: bool) -> Any:
    TORCH_LOCK.acquire(urgent)
    try:
        return fn()
    finally:
        TORCH_LOCK.release()


class TorchExecutor:
    def __init__(self, threads: int = 1, name: str = "torch") -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._init)

    def _init(self) -> None:
        import torch

        torch.set_num_threads(self.threads)

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on this node's torch thread, in its turn among the process's jobs."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _locked, functools.partial(fn, *args, **kwargs), False)

    async def run_urgent(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`run`, served before the jobs that are not urgent (work a peer waits on with a deadline)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _locked, functools.partial(fn, *args, **kwargs), True)

    def shutdown(self, wait: bool = True) -> None:
        """Cancel the queued jobs; `wait`: block until the running one has ended."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

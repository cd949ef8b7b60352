"""The one thread a node runs torch in (STYLE 10): heartbeats and RPC keep flowing meanwhile.

Every torch call of a node (training steps, helper steps, folds, fingerprint, eval,
export) goes through `TorchExecutor.run`, so they never overlap and the event loop never
blocks on them. The thread sets `torch.set_num_threads(threads)` before its first job.

Jobs of all executors in one process also take turns (`TORCH_LOCK`): torch's global RNG
is shared by threads, and model builds, peft initialisation and the seeded steps all
fork and seed it, so two nodes sharing a process (the in-process swarm) would otherwise
draw each other's numbers. With one node per process the lock is never contended.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

TORCH_LOCK = threading.RLock()


@contextlib.contextmanager
def torch_lock_released() -> Iterator[None]:
    """Inside a job: let other nodes' torch jobs run while this one waits on the network
    (a fingerprint computed across a cut waits for its helper, which may share the process)."""
    TORCH_LOCK.release()
    try:
        yield
    finally:
        TORCH_LOCK.acquire()


def _locked(fn: Callable[..., Any]) -> Any:
    with TORCH_LOCK:
        return fn()


class TorchExecutor:
    def __init__(self, threads: int = 1, name: str = "torch") -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._init)

    def _init(self) -> None:
        import torch

        torch.set_num_threads(self.threads)

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _locked, functools.partial(fn, *args, **kwargs))

    def shutdown(self, wait: bool = True) -> None:
        """Cancel the queued jobs; `wait`: block until the running one has ended."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

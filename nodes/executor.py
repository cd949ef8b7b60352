"""The one thread a node runs torch in (STYLE 10): heartbeats and RPC keep flowing meanwhile.

Every torch call of a node (training steps, helper steps, folds, fingerprint, eval,
export) goes through `TorchExecutor.run`, so they never overlap and the event loop never
blocks on them. The thread sets `torch.set_num_threads(threads)` before its first job.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class TorchExecutor:
    def __init__(self, threads: int = 1, name: str = "torch") -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._init)

    def _init(self) -> None:
        import torch

        torch.set_num_threads(self.threads)

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

"""nodes.executor: the process-wide TorchGate hands itself over in order, urgent jobs first."""

from __future__ import annotations

import threading
import time

import pytest

from nodes.executor import TorchExecutor, TorchGate
from tests.aio import run

pytestmark = pytest.mark.serial  # deadlines under load: run alone (Makefile), not beside other tests


def _queue_behind(gate: TorchGate, jobs: list[tuple[str, bool]]) -> list[str]:
    """Hold `gate`, line up `jobs` (name, urgent) one by one, release; the order they ran in."""
    order: list[str] = []
    gate.acquire()
    threads = []
    for name, urgent in jobs:

        def job(name: str = name, urgent: bool = urgent) -> None:
            gate.acquire(urgent)
            order.append(name)
            gate.release()

        t = threading.Thread(target=job)
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5.0
        while gate.waiting() < len(threads) and time.monotonic() < deadline:
            time.sleep(0.001)  # the next one queues only after this one is in line
    gate.release()
    for t in threads:
        t.join(5.0)
    return order


def test_waiters_run_in_arrival_order_with_urgent_ones_first():
    jobs = [("a", False), ("b", False), ("u1", True), ("c", False), ("u2", True)]

    assert _queue_behind(TorchGate(), jobs) == ["u1", "u2", "a", "b", "c"]


def test_the_gate_is_reentrant_and_only_its_holder_may_release_it():
    gate = TorchGate()
    with gate:
        with gate:
            assert gate.waiting() == 0
        refused = []

        def release_elsewhere() -> None:
            try:
                gate.release()
            except RuntimeError as exc:
                refused.append(str(exc))

        t = threading.Thread(target=release_elsewhere)
        t.start()
        t.join(5.0)
        assert refused and "does not hold it" in refused[0]
    gate.acquire()  # free again: taken at once
    gate.release()


def test_an_urgent_job_overtakes_the_queued_jobs_of_other_executors():
    gate_holder = threading.Event()
    release = threading.Event()
    order: list[str] = []

    async def main() -> None:
        import asyncio

        blocker, normal, helper = TorchExecutor(name="t0"), TorchExecutor(name="t1"), TorchExecutor(name="t2")

        def hold() -> None:
            gate_holder.set()
            release.wait(5.0)

        first = asyncio.ensure_future(blocker.run(hold))
        await asyncio.get_running_loop().run_in_executor(None, gate_holder.wait, 5.0)
        late = asyncio.ensure_future(normal.run(order.append, "own step"))
        await asyncio.sleep(0.05)
        urgent = asyncio.ensure_future(helper.run_urgent(order.append, "helper step"))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(first, late, urgent)
        for e in (blocker, normal, helper):
            e.shutdown()

    run(main())

    assert order == ["helper step", "own step"]

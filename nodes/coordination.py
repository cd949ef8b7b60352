"""The coordinator behind a queue, in a process of its own: membership events are batched,
heartbeats never wait, and planning never holds the event loop's interpreter.

The bootstrap used to run each coordinator event on its worker thread while holding a
lock that every heartbeat also took. A burst of deaths then meant one full re-plan per
death, one after another, with every heartbeat waiting behind them. Batching fixed the
lock; a thread still shared the interpreter lock with the event loop, and during a flood
of joins the planning thread (pure Python, busy for seconds at a time) cut the loop's
throughput so far that honest heartbeats queued past their deadline. So:

- The coordinator lives in a worker process (one `ProcessPoolExecutor` worker, forked from
  a forkserver that preloaded this module, niced so that on a busy host the loop's
  answers come before planning). Everything it computes reaches the loop as plain data.
- `submit(event)` only appends to a queue and returns; one worker task sends everything
  queued to the process as one `Coordinator.apply` batch (at most one planning pass), and
  whatever arrives meanwhile forms the next batch.
- `states` is the loop-side copy of `Coordinator.summary()` taken after every batch and
  advanced by `expected_state` over the events still queued, and `assignments` holds the
  assignment of every member whose version moved (and of every never-planned member), taken
  after every batch. A heartbeat, a fingerprint's membership check or a `get_assignment`
  reads them without waiting.
- `call(fn, ...)` runs `fn(coordinator, ...)` in the process between batches, for the rare
  answer the copies do not hold.
- If the process dies, the next batch starts a new one from the last state `kept()` gives
  and applies its events there.

The owner gives two hooks: `prepare(coordinator, applied)` runs in the process right after
a batch (e.g. the peer-table columns and the state to persist, computed off the loop; it
must pickle) and `commit(prepared)` runs on the event loop after it (the SQLite writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from nodes.coordinator import Applied, Coordinator, CoordinatorConfig, Event, MemberState, expected_state

log = logging.getLogger("atlas.coordination")

P = TypeVar("P")  # what `prepare` hands to `commit`
NICENESS = 5  # the coordinator process yields the CPU to the event loop's process this much
OWNER_CHECK_S = 0.5  # how often the coordinator process checks that its bootstrap still runs


@dataclass(frozen=True)
class _Outcome(Generic[P]):
    """What one batch left for the loop (computed in the coordinator process)."""

    applied: Applied
    summary: dict[int, MemberState]
    assignments: dict[int, dict[str, Any]]  # members whose version moved, and never-planned ones
    assigned: bool
    prepared: P


@dataclass(frozen=True)
class Started:
    """How the coordinator process began: from the kept state, or empty because it could not
    restore that (`error`); its assignment version, clusters (None: not clustered yet) and
    planned nodes then."""

    restored: bool
    error: str | None
    version: int
    clusters: int | None
    nodes: int


class _Worker(Generic[P]):
    """The coordinator process's side: the coordinator and the versions already handed out."""

    def __init__(self, coordinator: Coordinator, prepare: Callable[[Coordinator, Applied], P]) -> None:
        self.coordinator = coordinator
        self.prepare = prepare
        self.versions: dict[int, int] = {}  # versions `assignments` already holds, per member

    def apply(self, events: list[Event], now: float) -> _Outcome[P]:
        coordinator = self.coordinator
        applied = coordinator.apply(events, now=now)
        summary = coordinator.summary()
        stale = [n for n, s in summary.items() if s.version == 0 or self.versions.get(n) != s.version]
        assignments = coordinator.assignments(stale)
        self.versions.update((n, summary[n].version) for n in stale)
        return _Outcome(applied, summary, assignments, coordinator.assigned, self.prepare(coordinator, applied))


_worker: _Worker[Any] | None = None  # in the coordinator process only


def _born(owner: int) -> None:
    """First thing in the new process (before any task): it ends by itself once the bootstrap
    process `owner` is gone, and Ctrl-C is left to the bootstrap, which stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_without, args=(owner,), name="owner-watch", daemon=True).start()


def _begin(
    config: CoordinatorConfig, kept: Mapping[str, Any] | None, prepare: Callable[[Coordinator, Applied], Any]
) -> Started:
    """In the new process: the coordinator from `kept` (a `snapshot()`), else an empty one."""
    global _worker
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    error = None
    coordinator = Coordinator(config)
    if kept is not None:
        try:
            coordinator = Coordinator.restore(config, kept)
        except ValueError as exc:
            error = str(exc)
    _worker = _Worker(coordinator, prepare)
    clustering = coordinator.clustering
    return Started(
        kept is not None and error is None,
        error,
        coordinator.version,
        None if clustering is None else clustering.k,
        len(coordinator.peer_columns()),
    )


def _exit_without(owner: int) -> None:
    """End this process once `owner` is gone (e.g. SIGKILLed). Nothing else would: the worker
    holds both ends of its task queue, and its forkserver waits for it to exit."""
    while True:
        time.sleep(OWNER_CHECK_S)
        try:
            os.kill(owner, 0)
        except (ProcessLookupError, PermissionError):  # gone (its pid, if taken, is another user's)
            os._exit(0)


def _apply(events: list[Event], now: float) -> _Outcome[Any]:
    assert _worker is not None, "the coordinator process was not started"
    return _worker.apply(events, now)


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    assert _worker is not None, "the coordinator process was not started"
    return fn(_worker.coordinator, *args)


def _context() -> multiprocessing.context.BaseContext:
    """Forkserver: each coordinator process is a fork of a server that already imported this
    module (fast, and free of the parent's threads and sockets)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class CoordinatorQueue(Generic[P]):
    """Feeds the coordinator process in batches; see the module doc. Build with `start`."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        clock: Callable[[], float],
        prepare: Callable[[Coordinator, Applied], P],
        commit: Callable[[P], None],
        kept: Callable[[], Mapping[str, Any] | None],
    ) -> None:
        self.config = config
        self._clock = clock
        self._prepare = prepare
        self._commit = commit
        self._kept = kept
        self._pool: ProcessPoolExecutor | None = None
        self._queue: list[Event] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()  # held while a batch runs in the process (see `call`)
        self._worker: asyncio.Task[None] | None = None
        self.states: dict[int, MemberState] = {}
        self.assignments: dict[int, dict[str, Any]] = {}
        self.assigned = False
        self.counts: Counter[str] = Counter()  # events, batches, plans, refused, restarts

    @classmethod
    def start(
        cls,
        config: CoordinatorConfig,
        *,
        clock: Callable[[], float],
        prepare: Callable[[Coordinator, Applied], P],
        commit: Callable[[P], None],
        kept: Callable[[], Mapping[str, Any] | None],
    ) -> tuple[CoordinatorQueue[P], Started]:
        """Start the process on the state `kept()` gives and apply a first (empty) batch, so
        `states` and `assignments` hold every member before anything is asked. Blocks until
        then (a fork and a parse of the kept state, no planning)."""
        queue = cls(config, clock=clock, prepare=prepare, commit=commit, kept=kept)
        started = queue._spawn()
        queue._take(queue._pool.submit(_apply, [Event.tick()], clock()).result(), [Event.tick()])
        return queue, started

    # --- loop side ---------------------------------------------------------------------------

    def submit(self, event: Event) -> None:
        """Queue `event`; `states` shows its expected effect at once. Never waits."""
        self._queue.append(event)
        state = expected_state(self.states.get(event.node_id), event)
        if state is not None:
            self.states[event.node_id] = state
        self._idle.clear()
        self._wake.set()
        if self._worker is None:
            self._worker = asyncio.create_task(self._work_forever(), name="coordinator-batches")

    def version_for(self, node_id: int) -> int:
        """The node's assignment version after the last batch (0: never planned or unknown)."""
        state = self.states.get(node_id)
        return 0 if state is None else state.version

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(coordinator, *args)` in the coordinator process, between batches (`fn` and its
        arguments and result must pickle)."""
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(self._pool, _call, fn, args)

    async def settled(self) -> None:
        """Wait until every queued event is applied and committed."""
        await self._idle.wait()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Let the queued events settle for up to `timeout_s`, then stop the worker task and
        the process."""
        if self._worker is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def pid(self) -> int | None:
        """The coordinator process's id (None: not running)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return next(iter(processes), None)

    async def _work_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                events, self._queue = self._queue, []
                try:
                    await self._run(events)
                except Exception:  # a bug in one batch must not end coordination for good
                    log.exception("a batch of %d coordinator events failed", len(events))
            self._idle.set()

    async def _run(self, events: list[Event]) -> None:
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                outcome = await loop.run_in_executor(self._pool, _apply, events, self._clock())
            except BrokenProcessPool:
                log.error("the coordinator process died: starting another from the last kept state")
                self.counts.update(restarts=1)
                await loop.run_in_executor(None, self._respawn)
                outcome = await loop.run_in_executor(self._pool, _apply, events, self._clock())
        self._take(outcome, events)

    def _take(self, outcome: _Outcome[P], events: list[Event]) -> None:
        """On the loop after a batch: commit, and the copies a heartbeat reads."""
        self._commit(outcome.prepared)
        self.states = outcome.summary
        for event in self._queue:  # queued while the batch ran: their expected effect again
            state = expected_state(self.states.get(event.node_id), event)
            if state is not None:
                self.states[event.node_id] = state
        self.assignments.update(outcome.assignments)
        self.assigned = outcome.assigned
        applied = outcome.applied
        refused = [(e, err) for e, err in zip(events, applied.errors) if err is not None]
        self.counts.update(events=len(events), batches=1, plans=applied.plans, refused=len(refused))
        if refused:
            event, err = refused[0]
            log.warning(
                "coordinator refused %d of %d events (first: %s of node %d: %s)",
                len(refused),
                len(events),
                event.kind,
                event.node_id,
                err,
            )

    def _spawn(self) -> Started:
        self._pool = ProcessPoolExecutor(1, mp_context=_context(), initializer=_born, initargs=(os.getpid(),))
        try:
            return self._pool.submit(_begin, self.config, self._kept(), self._prepare).result()
        except BrokenProcessPool as exc:  # e.g. it ran the parent's script again and that failed
            raise RuntimeError(
                "the coordinator process could not start; a script that starts a bootstrap must keep "
                'its top-level code under `if __name__ == "__main__":` (the process imports the script, '
                "as multiprocessing does)"
            ) from exc

    def _respawn(self) -> None:
        """A new process on the last kept state, after the previous one died (blocking)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        started = self._spawn()
        if started.error is not None:
            log.error("the new coordinator process cannot restore the kept state (%s): it starts empty", started.error)


__all__ = ["CoordinatorQueue", "Started"]

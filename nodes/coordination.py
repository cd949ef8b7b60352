"""The coordinator behind a queue: membership events are batched, heartbeats never wait.

The bootstrap used to run each coordinator event on its worker thread while holding a
lock that every heartbeat also took (to read the node's assignment version). A burst of
deaths then meant one full re-plan per death, one after another, with every heartbeat
waiting behind them. Here:

- `submit(event)` only appends to a queue and returns; one worker task takes everything
  queued, applies it on the coordinator thread as one `Coordinator.apply` batch (at most
  one planning pass), and whatever arrives meanwhile forms the next batch.
- `states` is the loop-side copy of `Coordinator.summary()` taken after every batch and
  advanced by `expected_state` over the events still queued, and `assignments` holds the
  assignment of every member whose version moved (and of every never-planned member), taken
  after every batch. A heartbeat, a fingerprint's membership check or a `get_assignment`
  reads them without a lock.
- `read(fn)` still gives a consistent read of the coordinator itself (it waits for the
  batch being applied) for the rare answer the copies do not hold.

The owner gives two hooks: `prepare(applied)` runs on the coordinator thread right after a
batch (e.g. the peer-table columns and the state to persist, computed off the loop) and
`commit(prepared)` runs on the event loop after it (the SQLite writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from nodes.coordinator import Applied, Coordinator, Event, MemberState, expected_state

log = logging.getLogger("atlas.coordination")

P = TypeVar("P")  # what `prepare` hands to `commit`
SWITCH_S = 0.0005  # GIL switch interval while a batch runs (see `_quick_switches`)
_switching: list[float] = []  # the interval before the first batch running now, then one entry per batch


@dataclass(frozen=True)
class _Outcome(Generic[P]):
    """What one batch left for the loop (computed on the coordinator thread)."""

    applied: Applied
    summary: dict[int, MemberState]
    assignments: dict[int, dict[str, Any]]  # members whose version moved, and never-planned ones
    assigned: bool
    prepared: P


class CoordinatorQueue(Generic[P]):
    """Feeds `coordinator` in batches on `thread`; see the module doc."""

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        thread: Executor,
        clock: Callable[[], float],
        prepare: Callable[[Applied], P],
        commit: Callable[[P], None],
    ) -> None:
        self.coordinator = coordinator
        self._thread = thread
        self._clock = clock
        self._prepare = prepare
        self._commit = commit
        self._queue: list[Event] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()  # held while a batch runs on the thread (see `read`)
        self._worker: asyncio.Task[None] | None = None
        self._versions: dict[int, int] = {}  # versions `assignments` holds (thread side)
        self.states: dict[int, MemberState] = coordinator.summary()
        self.assignments: dict[int, dict[str, Any]] = {}
        self.assigned = coordinator.assigned
        self.counts: Counter[str] = Counter()  # events, batches, plans, refused
        self.submit(Event.tick())  # the first batch fills `assignments`

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

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a cheap coordinator (or coordinator-reading) function between batches."""
        async with self._lock:
            return fn(*args)

    async def settled(self) -> None:
        """Wait until every queued event is applied and committed."""
        await self._idle.wait()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Let the queued events settle for up to `timeout_s`, then stop the worker."""
        if self._worker is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None

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
        async with self._lock:
            with _quick_switches():
                now = self._clock()
                outcome = await asyncio.get_running_loop().run_in_executor(self._thread, self._apply, events, now)
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

    # --- thread side -------------------------------------------------------------------------

    def _apply(self, events: list[Event], now: float) -> _Outcome[P]:
        coordinator = self.coordinator
        applied = coordinator.apply(events, now=now)
        summary = coordinator.summary()
        stale = [n for n, s in summary.items() if s.version == 0 or self._versions.get(n) != s.version]
        assignments = coordinator.assignments(stale)
        self._versions.update((n, summary[n].version) for n in stale)
        return _Outcome(applied, summary, assignments, coordinator.assigned, self._prepare(applied))


@contextlib.contextmanager
def _quick_switches() -> Iterator[None]:
    """While a batch plans on the coordinator thread (pure Python, holding the GIL), let the
    interpreter hand the GIL over every SWITCH_S instead of every 5 ms: the event loop
    takes it back after each socket or SQLite call, and each wait would otherwise cost
    up to 5 ms of a heartbeat's answer. Nested uses (two bootstraps in one process) restore
    the interval when the last one ends."""
    if not _switching:
        _switching.append(sys.getswitchinterval())
        sys.setswitchinterval(min(_switching[0], SWITCH_S))
    _switching.append(SWITCH_S)
    try:
        yield
    finally:
        _switching.pop()
        if len(_switching) == 1:
            sys.setswitchinterval(_switching.pop())


__all__ = ["CoordinatorQueue"]

"""Liveness of peers as a pure state machine: alive -> suspect -> dead, and left.

The bootstrap only knows when it last heard a heartbeat. Silence s (seconds) maps to a
status with two thresholds T_suspect < T_dead:

    s <  T_suspect          -> alive
    T_suspect <= s < T_dead -> suspect
    s >= T_dead             -> dead

`dead` and `left` are sticky under silence: only a heartbeat (for dead) or a fresh join
(for left) brings a node back. Silence is counted from the later of the last heartbeat
and "bootstrap start + grace", so that after a bootstrap restart the nodes that kept
running (and were backing off while it was away) get time to reach it again before
anyone is declared suspect or dead. Everything here is synchronous and clock-free: the
caller passes `now`.
"""

from __future__ import annotations

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
LEFT = "left"
STATUSES = (ALIVE, SUSPECT, DEAD, LEFT)


def silence(now: float, last_seen: float, started_at: float, grace_s: float) -> float:
    """Seconds of silence that count.

    A node heard since this bootstrap started: now - last_seen. A node last heard by an
    earlier run (before a restart): now - max(last_seen, started_at + grace_s).
    """
    if last_seen >= started_at:
        return now - last_seen
    return now - max(last_seen, started_at + grace_s)


def status_after_silence(status: str, silent_s: float, suspect_after_s: float, dead_after_s: float) -> str:
    """Status of a node that has been silent for `silent_s` seconds (see module doc)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if status in (DEAD, LEFT):
        return status
    if silent_s >= dead_after_s:
        return DEAD
    if silent_s >= suspect_after_s or status == SUSPECT:
        return SUSPECT  # silence never revives: only a heartbeat does (a restart's grace
        # shortens the silence that counts, it must not turn a suspect node alive)
    return ALIVE


def status_after_heartbeat(status: str) -> str | None:
    """Status once a heartbeat arrives; None means the node must join again.

    A heartbeat revives a suspect or dead node (it was only slow, or the bootstrap was
    away); a node that said `leave` has to join again to come back.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if status == LEFT:
        return None
    return ALIVE


class Probation:
    """When a helper an owner reported failed, but that keeps heartbeating, is planned back in.

    A report means the helper missed one deadline for one owner; on a loaded machine a
    live helper does that now and then, and dropping it for good would lose its capacity
    for the rest of the swarm's life. Its k-th failure (k = 1, 2, ...) keeps it out for
    `base_s * 2**(k - 1)` seconds, counted from the first heartbeat that found it failed,
    so a helper that keeps failing is tried ever more rarely. Synchronous: the caller passes `now`.
    """

    def __init__(self, base_s: float) -> None:
        if base_s <= 0:
            raise ValueError(f"probation base_s must be > 0, got {base_s!r}")
        self.base_s = float(base_s)
        self.failures: dict[int, int] = {}  # node -> failures seen so far
        self._since: dict[int, float] = {}  # node -> when its current probation began

    def over(self, node_id: int, failed: bool, now: float) -> bool:
        """A heartbeat from `node_id`, `failed` or not: True once its probation has passed."""
        if not failed:
            self._since.pop(node_id, None)
            return False
        if node_id not in self._since:
            self._since[node_id] = now
            self.failures[node_id] = self.failures.get(node_id, 0) + 1
        wait = self.base_s * 2 ** (self.failures[node_id] - 1)
        if now - self._since[node_id] < wait:
            return False
        del self._since[node_id]
        return True

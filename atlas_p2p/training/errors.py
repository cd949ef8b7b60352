"""Typed errors of split training, so the node runtime can map each to its wire answer.

- :class:`ReplayNeeded` and its subclasses: the helper cannot continue this owner's round
  (it does not know the owner, is on another round, or misses earlier steps). The runtime
  answers ``error(replay)``; the owner rolls back and replays the round from step 0.
- :class:`VersionMismatchError`: owner and helper run different base versions; the runtime
  answers ``error(version)`` and the side that is behind catches up.
- :class:`SessionStateError`: a call out of protocol order on this node (a bug in the caller,
  never caused by what a peer sent).

Malformed tensors from a peer are plain ``ValueError``s raised before any state changes.
"""

from __future__ import annotations

__all__ = [
    "ReplayNeeded",
    "RoundMismatchError",
    "SessionStateError",
    "StepOrderError",
    "UnknownOwnerError",
    "VersionMismatchError",
]


class ReplayNeeded(RuntimeError):
    """The helper cannot continue the owner's round: replay it from step 0."""


class UnknownOwnerError(ReplayNeeded):
    """No server-side adapter for this owner (never begun, dropped, or a new helper)."""


class RoundMismatchError(ReplayNeeded):
    """The request names a round other than the one the helper holds for this owner."""


class StepOrderError(ReplayNeeded):
    """A step that does not follow the last one the helper ran (a gap or a stale repeat)."""


class VersionMismatchError(RuntimeError):
    """Owner and helper are on different base versions."""

    def __init__(self, mine: int, theirs: int) -> None:
        super().__init__(f"base version mismatch: this node is at {mine}, the request at {theirs}")
        self.mine, self.theirs = mine, theirs


class SessionStateError(RuntimeError):
    """A session method called out of protocol order on this node."""

"""Per-client request budgets and rate-limited log lines, for a server under load.

Both are pure bookkeeping: they take the time as an argument (or from a clock given to
them), so tests drive them without sleeping.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable


class RequestBudget:
    """A token bucket per client: `admit(key, now)` is True while that client keeps within
    `rate` requests per second on average, with bursts of up to `burst` requests.

    A client's bucket holds at most `burst` tokens and refills at `rate` per second; each
    admitted request takes one token:

        tokens(now) = min(burst, tokens(last) + rate * (now - last)), admitted iff >= 1.

    A client never seen starts with a full bucket. A bucket that has refilled to `burst`
    says nothing a missing one would not, so buckets are kept in least-recently-used order
    and forgotten once full; at most `max_keys` are kept (beyond, the least recently used
    is forgotten early: that client starts again with a full bucket).
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 1 << 16):
        if not rate > 0:
            raise ValueError(f"RequestBudget rate must be > 0, got {rate!r}")
        if burst < 1 or max_keys < 1:
            raise ValueError(f"RequestBudget burst and max_keys must be >= 1, got {burst!r}, {max_keys!r}")
        self.rate, self.burst, self.max_keys = float(rate), float(burst), max_keys
        self._buckets: collections.OrderedDict[Hashable, tuple[float, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, key: Hashable, now: float) -> bool:
        """Take one token from `key`'s bucket if it holds one; False means over the limit."""
        buckets = self._buckets
        entry = buckets.get(key)
        if entry is None:
            tokens = self.burst
            if buckets:
                self._forget_full(now)  # a new key: make room (once per new key: O(1) amortized)
        else:
            tokens, last = entry
            if now > last:
                tokens = min(self.burst, tokens + self.rate * (now - last))
            buckets.move_to_end(key)
        admitted = tokens >= 1.0
        buckets[key] = (tokens - 1.0 if admitted else tokens, now)
        return admitted

    def _refilled(self, entry: tuple[float, float], now: float) -> float:
        tokens, last = entry
        return min(self.burst, tokens + self.rate * max(0.0, now - last))

    def _forget_full(self, now: float) -> None:
        """Drop the least recently used buckets while they are full by now, or one more key than max_keys is kept."""
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if len(self._buckets) < self.max_keys and self._refilled(oldest, now) < self.burst:
                return
            self._buckets.popitem(last=False)


class LogThrottle:
    """At most `lines` log lines per key in each window of `interval_s` seconds; the rest are counted.

    A key's window opens with its first line. `allow(key)` says whether to log this line;
    `suppressed()` hands back (and forgets) the count of lines held back in every window
    that has ended, so the caller can log one "N more" line per key.
    """

    def __init__(self, lines: int = 5, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if lines < 1 or not interval_s > 0:
            raise ValueError(f"LogThrottle needs lines >= 1 and interval_s > 0, got {lines!r}, {interval_s!r}")
        self.lines, self.interval_s, self.clock = lines, float(interval_s), clock
        self._windows: dict[str, list] = {}  # key -> [start, lines logged, lines held back]
        self._ended: collections.Counter[str] = collections.Counter()  # held back in ended windows

    def allow(self, key: str) -> bool:
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval_s:
            if window is not None and window[2]:
                self._ended[key] += window[2]
            self._windows[key] = [now, 1, 0]
            return True
        if window[1] < self.lines:
            window[1] += 1
            return True
        window[2] += 1
        return False

    def holding(self) -> bool:
        """Whether any line is held back and not yet handed out by `suppressed()`."""
        return bool(self._ended) or any(window[2] for window in self._windows.values())

    def suppressed(self, everything: bool = False) -> dict[str, int]:
        """Key -> lines held back in its windows that have ended (each count is handed out once);
        `everything` also closes the windows still open (e.g. when the caller stops)."""
        now = self.clock()
        for key, window in list(self._windows.items()):
            if everything or now - window[0] >= self.interval_s:
                if window[2]:
                    self._ended[key] += window[2]
                del self._windows[key]
        out, self._ended = dict(self._ended), collections.Counter()
        return out

"""Per-user rate limits and the one-vote-per-user-per-response ledger of SubmitFeedback."""

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """Per-key token buckets: `rate` tokens a second, at most `burst` saved up. Idle keys are forgotten."""

    def __init__(
        self, rate: float, burst: int, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.max_keys, self._clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, updated_at)
        self._lock = threading.Lock()

    def try_take(self, key: str) -> float:
        """Takes one token; returns 0.0 on success, else the seconds until one is available."""
        with self._lock:
            now = self._clock()
            tokens, updated = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - updated) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait


class VoteLedger:
    """Remembers which (response, user) pairs have voted, so a second vote is refused.

    A vote is first reserved, then committed once the broker acknowledged it, or released if publishing
    failed (so the user can retry). Bounded: the oldest entries are forgotten first; the deterministic
    event id still lets the reward service drop a late duplicate.
    """

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self._entries: OrderedDict[tuple[str, str], bool] = OrderedDict()  # -> committed
        self._max_entries = max_entries
        self._lock = threading.Lock()

    def reserve(self, response_id: str, user_id: str) -> bool:
        """False if this user already voted (or is voting right now) on this response."""
        key = (response_id, user_id)
        with self._lock:
            if key in self._entries:
                return False
            self._entries[key] = False
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
            return True

    def commit(self, response_id: str, user_id: str) -> None:
        with self._lock:
            self._entries[(response_id, user_id)] = True

    def release(self, response_id: str, user_id: str) -> None:
        with self._lock:
            self._entries.pop((response_id, user_id), None)

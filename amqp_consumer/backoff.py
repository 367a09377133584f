"""Retry delays: exponential between amqp.reconnect_min_delay and reconnect_max_delay, with jitter.

The count of attempts restarts only when the caller says the thing being
retried has fully worked (for the daemon: consuming has started), not at the
first step that succeeds: a connection whose handshake works but whose
topology the broker refuses must not be retried at the minimum delay forever.
"""

from __future__ import annotations

import random
from typing import Callable


class Backoff:
    def __init__(self, min_delay: float, max_delay: float, jitter: Callable[[], float] = random.random) -> None:
        self.min_delay = min_delay
        self.max_delay = max_delay
        self._jitter = jitter
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt, 0.8 to 1.2 times min_delay * 2**attempts (capped)."""
        delay = min(self.max_delay, self.min_delay * (2.0 ** min(self.attempts, 20)))
        self.attempts += 1
        return delay * (0.8 + 0.4 * self._jitter())

    def reset(self) -> None:
        self.attempts = 0

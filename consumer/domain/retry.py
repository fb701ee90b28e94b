"""The one retry policy: capped exponential backoff, used at every retry site.

Reconnecting a Kafka client or the store, pausing a partition whose records failed, restarting
a background task, waiting for a topic's metadata: each asks ``RetryPolicy.delay(failures)``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """``delay(n)`` before retry number ``n`` (1-based): ``base_s`` doubled per earlier failure, at most ``cap_s``.

    A cap below the base never shortens the first pause.
    """

    base_s: float
    cap_s: float

    def delay(self, failures: int) -> float:
        return min(self.base_s * 2.0 ** max(failures - 1, 0), max(self.cap_s, self.base_s))

    @property
    def longest_s(self) -> float:
        return max(self.cap_s, self.base_s)

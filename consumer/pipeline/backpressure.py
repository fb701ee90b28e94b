"""Memory-aware backpressure: pause fetching above a soft limit, resume below a low-water mark."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from consumer.ops.memory import rss_bytes


class MemoryGuard:
    """Hysteresis on resident memory.

    ``update()`` returns ``"pause"`` when RSS first exceeds ``limit_bytes``, ``"resume"`` when a
    paused guard sees RSS at or below ``low_water`` x limit, else None. No limit: never pauses.
    """

    def __init__(
        self,
        limit_bytes: int | None,
        low_water: float = 0.85,
        read_rss: Callable[[], int | None] = rss_bytes,
    ) -> None:
        self.limit_bytes = limit_bytes
        self.low_water = low_water
        self.read_rss = read_rss
        self.paused = False

    def update(self) -> Literal["pause", "resume"] | None:
        if not self.limit_bytes:
            return None
        rss = self.read_rss()
        if rss is None:
            return None
        if not self.paused and rss > self.limit_bytes:
            self.paused = True
            return "pause"
        if self.paused and rss <= self.low_water * self.limit_bytes:
            self.paused = False
            return "resume"
        return None

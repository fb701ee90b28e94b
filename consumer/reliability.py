"""Policies that keep a replica honest under bad input and retries.

``DeadLetterPolicy`` stops a replica whose recent input is mostly dead-lettered
(a bad deploy upstream or here should page someone, not silently divert
everything). ``ReplyCache`` answers a redelivered request_id with the bytes it
was first answered with, so a duplicate is never recomputed or answered with
different content while it is in the window.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Callable, Generic, TypeVar

V = TypeVar("V")


class DeadLetterRateExceeded(RuntimeError):
    """Raised by the service loop when ``DeadLetterPolicy`` trips."""


class DeadLetterPolicy:
    """Trips when more than ``max_ratio`` of the last ``window`` messages were dead-lettered.

    Not before ``window`` messages have been seen; ``max_ratio >= 1`` never trips.
    """

    def __init__(self, max_ratio: float, window: int) -> None:
        self.max_ratio = max_ratio
        self.window = window
        self._outcomes: deque[bool] = deque(maxlen=window)
        self._dead = 0

    def record(self, dead: bool) -> None:
        if len(self._outcomes) == self.window and self._outcomes[0]:
            self._dead -= 1
        self._outcomes.append(dead)
        self._dead += dead

    @property
    def ratio(self) -> float:
        return self._dead / len(self._outcomes) if self._outcomes else 0.0

    def tripped(self) -> bool:
        return self.max_ratio < 1.0 and len(self._outcomes) >= self.window and self.ratio > self.max_ratio


class ReplyCache(Generic[V]):
    """Bounded, time-limited map of request_id -> first reply (LRU beyond ``max_entries``)."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < self.clock():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        if self.max_entries <= 0:
            return
        self._items[key] = (self.clock() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

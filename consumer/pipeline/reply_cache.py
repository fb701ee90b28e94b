"""Policies that keep a replica honest under retries.

``ReplyCache`` answers a redelivered request_id with the bytes it
was first answered with, so a duplicate is never recomputed or answered with
different content while it is in the window.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


def _no_size(_: object) -> int:
    return 0


class ReplyCache(Generic[V]):
    """Time-limited map of request_id -> first reply, bounded by entries and by bytes.

    An entry is kept for ``ttl_s`` unless more than ``max_entries`` entries, or more than
    ``max_bytes`` bytes as counted by ``size``, would be held: then the least recently used
    entries go first. A value larger than ``max_bytes`` on its own is not kept.
    ``max_entries <= 0`` or ``max_bytes <= 0`` keeps nothing; ``max_bytes=None`` bounds entries only.
    """

    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        max_bytes: int | None = None,
        size: Callable[[V], int] = _no_size,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.size = size
        self.clock = clock
        self._items: OrderedDict[str, tuple[float, int, V]] = OrderedDict()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held, as counted by ``size``."""
        return self._bytes

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, _, value = item
        if expires < self.clock():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        if self.max_entries <= 0 or (self.max_bytes is not None and self.max_bytes <= 0):
            return
        nbytes = self.size(value)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            self._drop(key)
            return
        now = self.clock()
        self._drop(key)
        self._items[key] = (now + self.ttl_s, nbytes, value)
        self._bytes += nbytes
        items = self._items
        while len(items) > self.max_entries or (self.max_bytes is not None and self._bytes > self.max_bytes):
            self._bytes -= items.popitem(last=False)[1][1]
        while items:
            oldest = next(iter(items))
            if items[oldest][0] >= now:
                break
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[1]

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

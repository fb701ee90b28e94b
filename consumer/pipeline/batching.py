"""Size- and time-bounded micro-batching over a pull-style fetch function, with a wait that adapts to load."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

__all__ = ["collect_batch"]

T = TypeVar("T")


async def collect_batch(
    fetch: Callable[[float, int], Awaitable[list[T]]],
    max_size: int,
    max_wait_s: float,
    idle_timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
    stop: Callable[[], bool] = lambda: False,
    busy_threshold: int = 1,
) -> list[T]:
    """Collect one batch of at most max_size items.

    fetch(timeout_s, max_items) must return at most max_items items, waiting up to
    timeout_s for them (it may return early, possibly with none); returning more
    than max_items raises ValueError rather than dropping items.

    Waits up to idle_timeout_s for a first item (at least one fetch is made, with
    timeout 0 when idle_timeout_s <= 0) and returns [] if none arrived, so the
    caller can do housekeeping. Once the first fetch that yields items returns,
    keeps fetching with the remaining time until max_size items are collected or
    max_wait_s has elapsed since then. With max_wait_s <= 0 the result is exactly
    what that first non-empty fetch returned. Items keep their fetch order.

    The wait adapts to load: when that first non-empty fetch yields fewer than
    busy_threshold items (light load), the batch takes only what is available at
    once (fetches with timeout 0 until one yields nothing or max_size is reached)
    and closes without waiting. busy_threshold <= 1 always waits as above.

    stop() is checked after every fetch: once true, what was collected so far is
    returned at once (possibly []), without waiting out the remaining time.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    idle_deadline = clock() + max(idle_timeout_s, 0.0)
    while True:
        batch = list(await fetch(max(idle_deadline - clock(), 0.0), max_size))
        _check_size(batch, max_size)
        if batch:
            break
        if clock() >= idle_deadline or stop():
            return []
    if len(batch) < busy_threshold:
        while len(batch) < max_size and not stop():
            wanted = max_size - len(batch)
            items = await fetch(0.0, wanted)
            _check_size(items, wanted)
            if not items:
                break
            batch.extend(items)
        return batch
    deadline = clock() + max_wait_s
    while len(batch) < max_size and not stop():
        remaining = deadline - clock()
        if remaining <= 0:
            break
        wanted = max_size - len(batch)
        items = await fetch(remaining, wanted)
        _check_size(items, wanted)
        batch.extend(items)
    return batch


def _check_size(items: Sequence[object], limit: int) -> None:
    if len(items) > limit:
        raise ValueError(f"fetch returned {len(items)} items, asked for at most {limit}")

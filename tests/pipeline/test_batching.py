from __future__ import annotations

import pytest

from consumer.pipeline.batching import collect_batch

pytestmark = pytest.mark.asyncio


class FakeBroker:
    """Items become available at scripted fake times; fetch advances the fake clock."""

    def __init__(self, arrivals: list[tuple[float, int]]) -> None:
        self.now = 0.0
        self.pending = sorted(arrivals)
        self.calls: list[tuple[float, int]] = []

    def clock(self) -> float:
        return self.now

    async def fetch(self, timeout_s: float, max_items: int) -> list[int]:
        self.calls.append((timeout_s, max_items))
        ready = [item for t, item in self.pending if t <= self.now]
        if not ready and self.pending and self.pending[0][0] <= self.now + timeout_s:
            self.now = self.pending[0][0]
            ready = [item for t, item in self.pending if t <= self.now]
        if not ready:
            self.now += timeout_s
            return []
        taken = ready[:max_items]
        self.pending = self.pending[len(taken) :]
        return taken


async def test_idle_timeout_returns_empty() -> None:
    broker = FakeBroker([(5.0, 1)])
    assert await collect_batch(broker.fetch, 10, 0.1, 2.0, clock=broker.clock) == []
    assert broker.now == pytest.approx(2.0)
    assert broker.calls == [(2.0, 10)]


async def test_first_item_after_wait_then_time_limit() -> None:
    broker = FakeBroker([(1.0, 1), (1.05, 2), (1.09, 3), (1.2, 4)])
    batch = await collect_batch(broker.fetch, 10, 0.1, 2.0, clock=broker.clock)
    assert batch == [1, 2, 3]
    assert broker.now == pytest.approx(1.1)
    assert broker.pending == [(1.2, 4)]


async def test_size_limit_never_exceeded() -> None:
    broker = FakeBroker([(0.0, i) for i in range(7)] + [(0.01, i) for i in range(7, 20)])
    batch = await collect_batch(broker.fetch, 10, 1.0, 1.0, clock=broker.clock)
    assert batch == list(range(10))
    assert [m for _, m in broker.calls] == [10, 3]
    assert broker.now == pytest.approx(0.01)


async def test_size_limit_reached_by_first_fetch_stops_immediately() -> None:
    broker = FakeBroker([(0.0, i) for i in range(20)])
    assert await collect_batch(broker.fetch, 5, 1.0, 1.0, clock=broker.clock) == [0, 1, 2, 3, 4]
    assert len(broker.calls) == 1


async def test_max_wait_zero_returns_first_fetch() -> None:
    broker = FakeBroker([(0.5, 1), (0.5, 2), (0.6, 3)])
    assert await collect_batch(broker.fetch, 10, 0.0, 1.0, clock=broker.clock) == [1, 2]
    assert len(broker.calls) == 1


async def test_remaining_time_is_passed_to_fetch() -> None:
    broker = FakeBroker([(0.0, 1), (0.3, 2)])
    assert await collect_batch(broker.fetch, 10, 0.25, 1.0, clock=broker.clock) == [1]
    assert broker.calls == [(1.0, 10), (pytest.approx(0.25), 9)]
    assert broker.now == pytest.approx(0.25)


async def test_early_empty_returns_retry_until_idle_deadline() -> None:
    now = [0.0]
    responses: list[list[int]] = [[], [], [7]]

    async def fetch(timeout_s: float, max_items: int) -> list[int]:
        now[0] += 0.1
        return responses.pop(0)

    assert await collect_batch(fetch, 1, 0.0, 1.0, clock=lambda: now[0]) == [7]


async def test_zero_idle_timeout_polls_once() -> None:
    broker = FakeBroker([(0.5, 1)])
    assert await collect_batch(broker.fetch, 3, 1.0, 0.0, clock=broker.clock) == []
    assert broker.calls == [(0.0, 3)]


async def test_fetch_returning_too_many_raises() -> None:
    async def fetch(timeout_s: float, max_items: int) -> list[int]:
        return list(range(max_items + 1))

    with pytest.raises(ValueError):
        await collect_batch(fetch, 3, 1.0, 1.0, clock=lambda: 0.0)


async def test_invalid_max_size() -> None:
    broker = FakeBroker([])
    with pytest.raises(ValueError):
        await collect_batch(broker.fetch, 0, 1.0, 1.0, clock=broker.clock)


async def test_stop_returns_the_batch_in_hand_without_waiting():
    broker = FakeBroker([(0.0, 1), (0.1, 2), (5.0, 3)])
    batch = await collect_batch(broker.fetch, 10, max_wait_s=10.0, idle_timeout_s=1.0, clock=broker.clock, stop=lambda: broker.now >= 0.1)
    assert batch == [1, 2] and broker.now < 1.0, "kept collecting after stop()"
    calls = len(broker.calls)
    assert await collect_batch(broker.fetch, 10, max_wait_s=10.0, idle_timeout_s=3.0, clock=broker.clock, stop=lambda: True) == []
    assert len(broker.calls) == calls + 1, "the idle wait went on after stop()"


async def test_light_load_closes_the_batch_without_waiting() -> None:
    broker = FakeBroker([(1.0, 1), (1.05, 2)])
    batch = await collect_batch(broker.fetch, 10, 0.1, 2.0, clock=broker.clock, busy_threshold=2)
    assert batch == [1]
    assert broker.now == pytest.approx(1.0), "waited for more items at light load"
    assert broker.calls == [(2.0, 10), (0.0, 9)]
    assert broker.pending == [(1.05, 2)]


async def test_light_load_still_takes_what_is_available_at_once() -> None:
    responses: list[list[int]] = [[1], [2, 3], [4], [], [9]]
    calls: list[tuple[float, int]] = []

    async def fetch(timeout_s: float, max_items: int) -> list[int]:
        calls.append((timeout_s, max_items))
        return responses.pop(0)

    assert await collect_batch(fetch, 10, 5.0, 1.0, clock=lambda: 0.0, busy_threshold=2) == [1, 2, 3, 4]
    assert calls == [(1.0, 10), (0.0, 9), (0.0, 7), (0.0, 6)]


async def test_light_load_drain_respects_max_size_and_stop() -> None:
    broker = FakeBroker([(0.0, i) for i in range(1, 4)])
    taken: list[list[int]] = []

    async def one_at_a_time(timeout_s: float, max_items: int) -> list[int]:
        taken.append(await broker.fetch(timeout_s, min(max_items, 1)))
        return taken[-1]

    assert await collect_batch(one_at_a_time, 2, 5.0, 1.0, clock=broker.clock, busy_threshold=2) == [1, 2]
    assert await collect_batch(one_at_a_time, 5, 5.0, 1.0, clock=broker.clock, busy_threshold=2, stop=lambda: True) == [3]


async def test_busy_load_waits_up_to_max_wait() -> None:
    broker = FakeBroker([(1.0, 1), (1.0, 2), (1.05, 3), (1.2, 4)])
    batch = await collect_batch(broker.fetch, 10, 0.1, 2.0, clock=broker.clock, busy_threshold=2)
    assert batch == [1, 2, 3]
    assert broker.now == pytest.approx(1.1)

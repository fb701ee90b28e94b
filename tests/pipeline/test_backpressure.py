from consumer.pipeline.backpressure import MemoryGuard


def test_guard_pauses_above_limit_and_resumes_below_low_water():
    readings = iter([100, 1200, 1100, 900, 840, 1001])
    guard = MemoryGuard(limit_bytes=1000, low_water=0.85, read_rss=lambda: next(readings))
    assert guard.update() is None
    assert guard.update() == "pause" and guard.paused
    assert guard.update() is None, "still above the limit: stay paused, no second pause"
    assert guard.update() is None, "below the limit but above low water: stay paused"
    assert guard.update() == "resume" and not guard.paused
    assert guard.update() == "pause" and guard.paused


def test_guard_without_limit_never_pauses():
    guard = MemoryGuard(limit_bytes=None, read_rss=lambda: 10**12)
    assert guard.update() is None and not guard.paused

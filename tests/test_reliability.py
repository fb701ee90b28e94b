from consumer.reliability import DeadLetterPolicy, ReplyCache


def test_dead_letter_policy_trips_only_on_a_full_window_above_ratio():
    policy = DeadLetterPolicy(max_ratio=0.5, window=10)
    for _ in range(9):
        policy.record(True)
    assert not policy.tripped(), "must not trip before the window is full"
    policy.record(True)
    assert policy.tripped()
    for _ in range(5):
        policy.record(False)
    assert policy.ratio == 0.5 and not policy.tripped()
    policy.record(False)
    assert policy.ratio == 0.4


def test_dead_letter_policy_disabled_at_ratio_one():
    policy = DeadLetterPolicy(max_ratio=1.0, window=3)
    for _ in range(10):
        policy.record(True)
    assert not policy.tripped()


def test_reply_cache_is_bounded_and_expires():
    now = [0.0]
    cache = ReplyCache(max_entries=2, ttl_s=10, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and len(cache) == 2
    now[0] = 11
    assert cache.get("a") is None and cache.get("c") is None


def test_retry_delay_doubles_per_consecutive_failure_up_to_the_cap():
    from consumer.service import retry_delay

    assert [retry_delay(n, 2.0, 10.0) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert retry_delay(1, 5.0, 1.0) == 5.0, "a cap below the base never shortens the first pause"

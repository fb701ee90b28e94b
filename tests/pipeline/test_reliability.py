from consumer.pipeline.reply_cache import ReplyCache


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
    from consumer.domain.retry import RetryPolicy

    assert [RetryPolicy(2.0, 10.0).delay(n) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert RetryPolicy(5.0, 1.0).delay(1) == 5.0, "a cap below the base never shortens the first pause"

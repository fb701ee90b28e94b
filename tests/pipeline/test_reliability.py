import asyncio

from aiokafka.structs import ConsumerRecord

from consumer.config.settings import Settings
from consumer.pipeline.outcomes import Outcome
from consumer.pipeline.processor import BatchProcessor
from consumer.pipeline.reply_cache import ReplyCache
from consumer.pipeline.search import PendingSearch
from schemas import SearchResult
from schemas.events import Timings


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


def test_reply_cache_is_bounded_by_bytes_least_recently_used_first():
    cache: ReplyCache[str] = ReplyCache(max_entries=100, ttl_s=10, max_bytes=10, size=len)
    cache.put("a", "xxxx")
    cache.put("b", "yyyy")
    assert cache.get("a") == "xxxx" and cache.nbytes == 8
    cache.put("c", "zzzz")
    assert cache.get("b") is None, "the least recently used entry was not evicted"
    assert cache.get("a") == "xxxx" and cache.get("c") == "zzzz" and cache.nbytes == 8
    cache.put("a", "xx")
    assert cache.nbytes == 6, "a replaced value is still counted"
    cache.put("big", "x" * 11)
    assert cache.get("big") is None and cache.get("a") == "xx", "an oversized value displaced others or was kept"
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_reply_cache_drops_expired_entries_and_their_bytes():
    now = [0.0]
    cache: ReplyCache[str] = ReplyCache(max_entries=100, ttl_s=10, max_bytes=1000, size=len, clock=lambda: now[0])
    cache.put("a", "xxxx")
    now[0] = 11
    cache.put("b", "yy")
    assert len(cache) == 1 and cache.nbytes == 2, "an expired entry still holds memory after a put"
    now[0] = 22
    assert cache.get("b") is None and cache.nbytes == 0


def test_a_zero_byte_budget_keeps_nothing():
    cache: ReplyCache[str] = ReplyCache(max_entries=100, ttl_s=10, max_bytes=0, size=len)
    cache.put("a", "")
    assert cache.get("a") is None and len(cache) == 0


class _Answers:
    """A search handler answering every request with an empty result."""

    async def handle(self, batch: list[PendingSearch]) -> list[SearchResult]:
        timings = Timings(queue_ms=0.0, encode_ms=0.0, rank_ms=0.0, total_ms=0.0)
        return [
            SearchResult(request_id=p.request.request_id, items=[], model_id="m", batch_size=len(batch), timings=timings) for p in batch
        ]


def _request(offset: int, request_id: str) -> ConsumerRecord:
    value = f'{{"request_id": "{request_id}", "query_text": "shoes"}}'.encode()
    return ConsumerRecord("search-requests", 0, offset, 1, 0, request_id.encode(), value, None, 0, len(value), ())


def test_a_duplicate_is_answered_with_the_first_reply_as_its_own_record():
    settings = Settings(search_requests_topic="search-requests")
    processor = BatchProcessor(settings, _Answers(), None)  # type: ignore[arg-type]
    first, again = _request(0, "r-1"), _request(7, "r-1")
    _, out1 = asyncio.run(processor.process([first]))
    report2, out2 = asyncio.run(processor.process([again]))
    assert [o.outcome for o in report2.outcomes] == [Outcome.DUPLICATE]
    assert [m.value for m in out2] == [m.value for m in out1]
    assert out1[0].source is first and out2[0].source is again, "a duplicate's reply names another record"
    cached = processor.reply_cache.get("r-1")
    assert cached is not None and cached.message.source is None, "the cache keeps the request record alive"
    assert 0 < processor.reply_cache.nbytes <= settings.reply_cache_max_bytes


def test_retry_delay_doubles_per_consecutive_failure_up_to_the_cap():
    from consumer.domain.retry import RetryPolicy

    assert [RetryPolicy(2.0, 10.0).delay(n) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert RetryPolicy(5.0, 1.0).delay(1) == 5.0, "a cap below the base never shortens the first pause"

"""clip_search_stage_seconds: where a search batch's time went, from the service's timestamps and the report."""

from __future__ import annotations

import pytest

from consumer.ops.metrics import STAGES, ServiceMetrics
from consumer.pipeline.outcomes import BatchReport, Outcome, RecordOutcome
from schemas import Timings

SEARCH = "search-requests"


def stage(m: ServiceMetrics, name: str, suffix: str) -> float:
    value = m.registry.get_sample_value(f"clip_search_stage_seconds_{suffix}", {"stage": name})
    assert value is not None
    return value


def observe(m: ServiceMetrics, report: BatchReport) -> None:
    m.observe_stages(report, fetched_at=100.0, closed_at=100.004, processed_at=100.020, acknowledged_at=100.025, committed_at=100.028)


def test_every_stage_is_exported_before_any_search() -> None:
    m = ServiceMetrics(search_topic=SEARCH)
    assert [stage(m, s, "count") for s in STAGES] == [0.0] * len(STAGES)


def test_a_search_batch_is_split_into_its_stages() -> None:
    m = ServiceMetrics(search_topic=SEARCH)
    report = BatchReport(
        messages=3,
        outcomes=[
            RecordOutcome(SEARCH, 0, 1, 99_990, Outcome.RESULT),
            RecordOutcome(SEARCH, 1, 7, 99_998, Outcome.ERROR_REPLY, "schema_violation"),
            RecordOutcome("product-updated", 0, 3, 99_000, Outcome.APPLIED),
        ],
        search_timings=Timings(queue_ms=5.0, encode_ms=6.0, rank_ms=9.0, total_ms=30.0),
    )
    observe(m, report)
    assert stage(m, "queue", "count") == 2, "queue is per search request, product updates excluded"
    assert stage(m, "queue", "sum") == pytest.approx(0.010 + 0.002)
    expected = {"batch_wait": 0.004, "encode": 0.006, "rank": 0.009, "publish": 0.005, "commit": 0.003}
    for name, seconds in expected.items():
        assert stage(m, name, "count") == 1
        assert stage(m, name, "sum") == pytest.approx(seconds)


def test_a_batch_without_searches_observes_nothing() -> None:
    m = ServiceMetrics(search_topic=SEARCH)
    observe(m, BatchReport(messages=1, outcomes=[RecordOutcome("product-updated", 0, 3, 99_000, Outcome.APPLIED)]))
    assert [stage(m, s, "count") for s in STAGES] == [0.0] * len(STAGES)


def test_a_request_timestamp_ahead_of_the_clock_counts_as_no_queueing() -> None:
    m = ServiceMetrics(search_topic=SEARCH)
    observe(m, BatchReport(messages=1, outcomes=[RecordOutcome(SEARCH, 0, 1, 100_500, Outcome.RESULT)]))
    assert stage(m, "queue", "count") == 1 and stage(m, "queue", "sum") == 0.0
    assert stage(m, "encode", "count") == 0, "no search timings: encode and rank are not observed"

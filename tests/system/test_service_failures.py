"""The service's own failures on one record: retried with backoff while ``/readyz`` says why, then isolated.

In-process replica on the real broker; the failure is injected into the encoder for one query text.
"""

from __future__ import annotations

import json

import pytest

from consumer.app import build_encoder, build_service, readiness
from tests.conftest import running, wait_for
from tests.kafka_tools import Tap, as_json, read_topics, send_raw, wait_committed

pytestmark = pytest.mark.integration  # an in-process replica on the real broker

POISON = "poison pill"


async def test_failing_record_is_retried_while_not_ready_then_dead_lettered(settings_for, topics, broker):
    settings = settings_for(poison_max_attempts=3, retry_backoff_s=0.3, retry_backoff_max_s=0.6, max_batch_size=8, max_batch_wait_ms=200)
    encoder = build_encoder(settings)
    encode_text = encoder.encode_text

    def failing_encode_text(texts: list[str]):
        if POISON in texts:
            raise RuntimeError(f"injected: cannot encode {POISON!r}")
        return encode_text(texts)

    encoder.encode_text = failing_encode_text
    service = build_service(settings, encoder)
    req, replies = topics["search_requests_topic"], topics["reply_topic"]
    ids = ["before", "poison", "after-1", "after-2"]
    texts = {"before": "red shoes", "poison": POISON, "after-1": "blue mug", "after-2": "green lamp"}
    messages = [(req, as_json({"request_id": rid, "query_text": texts[rid]}), b"same-partition") for rid in ids]
    reasons: list[str] = []

    async def note_reason() -> None:
        if (reason := await readiness(service)) is not None and "retrying" in reason:
            reasons.append(reason)

    async with running(service), Tap(broker.bootstrap, replies, topics["dead_letter_topic"]) as tap:
        acks = await send_raw(broker.bootstrap, messages)
        await wait_for(lambda: service.retry_reason() is not None, what="the failing batch to be retried")
        await note_reason()
        assert service.metrics.registry.get_sample_value("clip_search_partitions_retrying") == 1
        await wait_for(lambda: set(ids) <= tap.reply_ids(replies), what="every request answered")
        await wait_committed(broker.bootstrap, topics["consumer_group_id"], acks)
        assert await readiness(service) is None, "still not ready after the record was given up on"
        assert service.metrics.registry.get_sample_value("clip_search_partitions_retrying") == 0

    assert reasons and f"search failed: RuntimeError: injected: cannot encode {POISON!r}" in reasons[0], reasons
    got = await read_topics(broker.bootstrap, [replies, topics["dead_letter_topic"]])
    by_id = {json.loads(r.value)["request_id"]: json.loads(r.value) for r in got[replies]}
    assert len(got[replies]) == len(ids), "a request was answered twice"
    assert by_id["poison"]["error"]["code"] == "internal_error"
    assert all(by_id[rid]["status"] == "ok" for rid in ids if rid != "poison")
    [dead] = got[topics["dead_letter_topic"]]
    headers = dict(dead.headers)
    assert headers["error.code"] == b"internal_error" and headers["error.owner"] == b"service"
    assert json.loads(dead.value)["request_id"] == "poison"
    registry = service.metrics.registry
    assert registry.get_sample_value("clip_search_errors_total", {"code": "internal_error", "owner": "service"}) == 1

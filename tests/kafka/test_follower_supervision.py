"""The features-topic follower of a search replica, over the real broker (Tansu) and store.

A failure of the follower is logged, counted and reported by readiness; the follower is
restarted from its last applied offsets and the replica recovers. The follower's consumer
starts through ``start_kafka_client`` like every other client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request

import pytest

from consumer.app import build_service, health_server, readiness
from consumer.config.settings import Role
from consumer.domain.errors import StartupError
from consumer.index.feature_index import FeatureIndex
from consumer.kafka import feature_follower
from consumer.kafka.feature_follower import FeatureFollower
from devservices import free_port
from producer_examples.client import SearchClient, product_text, publish
from tests.conftest import feature_records, running, wait_for
from tests.system.test_end_to_end import TEXT_PRODUCTS
from tests.tls_services import sasl_settings


def get_readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:  # nosec B310  # loopback test server
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def fail_feature_apply_once(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Make the follower's next apply of feature records raise RuntimeError("boom") once; the event is set then."""
    failed = asyncio.Event()
    apply = feature_follower.apply_feature_events

    def fails_once(index, events, model_id):
        if not failed.is_set():
            failed.set()
            raise RuntimeError("boom")
        return apply(index, events, model_id)

    monkeypatch.setattr(feature_follower, "apply_feature_events", fails_once)
    return failed


async def test_a_failed_follower_is_reported_restarted_from_its_offsets_and_recovers(
    settings_for, store_settings, broker, topics, monkeypatch, caplog
):
    first, second = TEXT_PRODUCTS[0], TEXT_PRODUCTS[1]
    ingest = build_service(settings_for(**store_settings, role=Role.INGEST))
    search = build_service(
        settings_for(role=Role.SEARCH, retry_backoff_s=0.5, retry_backoff_max_s=1.0, metrics_host="127.0.0.1", metrics_port=free_port())
    )
    async with running(ingest), running(search), health_server(search.settings, search) as health:
        assert await asyncio.to_thread(get_readyz, health.port) == (200, {"ready": True})
        assert search.metrics.registry.get_sample_value("clip_search_ready") == 1
        failed = fail_feature_apply_once(monkeypatch)
        await publish(broker.bootstrap, topics["product_updates_topic"], [first], key_field="product_id")
        await asyncio.wait_for(failed.wait(), 30)
        reason = "background task feature-follower failed: RuntimeError('boom'); restarting in 0.5 s"
        async with search.index_lock:
            assert await readiness(search) == reason, "no poll can succeed while the test holds the index lock"
            assert await asyncio.to_thread(get_readyz, health.port) == (503, {"ready": False, "reason": reason})
            assert search.metrics.registry.get_sample_value("clip_search_ready") == 0
        assert search.metrics.registry.get_sample_value("clip_search_background_task_failures_total", {"task": "feature-follower"}) == 1
        errors = [r for r in caplog.records if r.name == "consumer.ops.supervisor" and r.levelno == logging.ERROR]
        assert [(r.getMessage(), r.exc_info[0]) for r in errors] == [(reason, RuntimeError)]

        await wait_for(lambda: search.supervisor.reason is None, what="the follower to recover")
        assert await readiness(search) is None
        assert await asyncio.to_thread(get_readyz, health.port) == (200, {"ready": True})
        assert first["product_id"] in search.index, "the record of the failed poll was not read again after the restart"
        await publish(broker.bootstrap, topics["product_updates_topic"], [second], key_field="product_id")
        await wait_for(lambda: second["product_id"] in search.index, what="a product published after the recovery")
        async with SearchClient(broker.bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
            reply = await client.search({"query_text": product_text(second), "top_k": 1})
        assert reply["status"] == "ok" and reply["items"][0]["product_id"] == second["product_id"]
        assert feature_records(search) == 2


async def test_the_follower_consumer_starts_through_start_kafka_client(sasl_broker, tiny_model):
    """A refused SASL login is one StartupError naming the settings, as for the service's other clients."""
    settings = sasl_settings(sasl_broker, "SCRAM-SHA-256", "not-the-password", clip_model=tiny_model)
    follower = FeatureFollower(settings, FeatureIndex(dim=8), "model", asyncio.Lock())
    try:
        with pytest.raises(StartupError) as err:
            await asyncio.wait_for(follower.start(), 30)
    finally:
        await follower.stop()
    assert "KAFKA_SASL_USERNAME" in str(err.value) and "not-the-password" not in str(err.value)


async def test_a_missing_features_topic_is_one_startup_error_naming_the_setting(settings_for):
    settings = settings_for(features_topic="no-such-features-topic")
    follower = FeatureFollower(settings, FeatureIndex(dim=8), "model", asyncio.Lock())
    try:
        with pytest.raises(StartupError, match=r"'no-such-features-topic' \(FEATURES_TOPIC\) has no partitions after 1 s"):
            await asyncio.wait_for(follower.start(partitions_timeout_s=1.0), 30)
    finally:
        await follower.stop()

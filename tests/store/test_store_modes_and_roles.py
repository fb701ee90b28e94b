"""Store-backed behaviour over the real broker and the real wire-protocol database:
restart without recompute, on-demand == cached, stale events, and split roles."""

from __future__ import annotations

import asyncio
import json
import random
from contextlib import AsyncExitStack

from consumer.app import build_encoder, build_service
from consumer.config.settings import Role
from producer_examples.client import SearchClient, load_catalog, product_text, publish
from tests.conftest import products_encoded, replies_sent, running, wait_for
from tests.kafka_tools import read_topic_records
from tests.system.test_end_to_end import TEXT_PRODUCTS

QUERIES = [
    {"query_text": product_text(TEXT_PRODUCTS[0]), "top_k": 5},
    {"query_text": "Steel kettle. 1.7 litre electric kettle", "top_k": 3, "filters": {"category": "kitchen"}},
    {"query_text": "something cheap", "top_k": 10, "filters": {"max_price": 30}, "similarity_threshold": -1},
    {"query_text": "ankle boots", "top_k": 20, "filters": {"min_price": 10, "max_price": 100}, "similarity_threshold": 0.1},
]


async def ask_all(bootstrap, topics, queries):
    async with SearchClient(bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
        return [await client.search(dict(q)) for q in queries]


def ranked(reply):
    return [(i["product_id"], i["score"]) for i in reply["items"]]


async def test_restart_reuses_stored_features_and_on_demand_equals_cached(settings_for, store_settings, broker, topics):
    # fp32 ONNX: int8 dynamic quantization scales activations per batch, so a query's embedding
    # moves by ~1e-3 with its batch mates; this test compares ranking modes, not encoders.
    store_settings = store_settings | {"onnx_quantize": "none"}
    catalog = TEXT_PRODUCTS + load_catalog()
    first = build_service(settings_for(**store_settings))
    async with running(first):
        await publish(broker.bootstrap, topics["product_updates_topic"], catalog, key_field="product_id")
        await wait_for(lambda: len(first.index) == len(catalog), what="catalog indexed")
        before = await ask_all(broker.bootstrap, topics, QUERIES)
    assert products_encoded(first) == len(catalog)

    # A new consumer group re-reads every product update from the start of the topic.
    settings = settings_for(**store_settings, consumer_group_id=topics["consumer_group_id"] + "-again")
    encoder = build_encoder(settings)
    restarted = build_service(settings, encoder)
    async with running(restarted):
        assert len(restarted.index) == len(catalog), "the cache was not filled from the store"
        await wait_for(lambda: restarted.batches > 0, what="replayed updates processed")
        after = await ask_all(broker.bootstrap, topics, QUERIES)
    assert products_encoded(restarted) == 0, "products were re-encoded after a restart"
    assert encoder.load_counts["vision"] == 0
    for b, a in zip(before, after, strict=True):
        assert [p for p, _ in ranked(a)] == [p for p, _ in ranked(b)]

    on_demand = build_service(settings_for(**store_settings, cache_products=False, consumer_group_id=topics["consumer_group_id"] + "-od"))
    assert on_demand.index is None
    async with running(on_demand):
        streamed = await ask_all(broker.bootstrap, topics, QUERIES)
    for cached, od in zip(after, streamed, strict=True):
        assert od["status"] == "ok" and cached["status"] == "ok"
        assert [p for p, _ in ranked(od)] == [p for p, _ in ranked(cached)]
        for (_, s1), (_, s2) in zip(ranked(od), ranked(cached), strict=True):
            assert abs(s1 - s2) <= 1e-3, (od, cached)
    assert any(len(r["items"]) > 1 for r in streamed)


async def test_stale_and_duplicate_events_leave_the_newest_version(settings_for, store_settings, broker, topics):
    service = build_service(settings_for(**store_settings))
    ids = [f"s-{n}" for n in range(6)]
    events = [
        {"product_id": pid, "version": v, "name": f"{pid} version {v}", "category": "stale-test", "price": float(v)}
        for pid in ids
        for v in range(1, 6)
    ]
    random.Random(7).shuffle(events)
    events += [dict(e) for e in events[:10]]
    half = len(events) // 2
    async with running(service):
        await asyncio.gather(
            publish(broker.bootstrap, topics["product_updates_topic"], events[:half], key_field="product_id"),
            publish(broker.bootstrap, topics["product_updates_topic"], events[half:], key_field="product_id"),
        )
        await wait_for(lambda: all(service.index.version_of(p) == 5 for p in ids), what="newest versions indexed")
        await publish(
            broker.bootstrap, topics["product_updates_topic"], [{"product_id": "s-0", "version": 3, "name": "late"}], "product_id"
        )
        marker = {"product_id": "marker", "version": 1, "name": "marker"}
        await publish(broker.bootstrap, topics["product_updates_topic"], [marker], "product_id")
        await wait_for(lambda: "marker" in service.index, what="marker indexed")
        stored = await service.store.get_versions(ids)
    assert {pid: stored[pid][0] for pid in ids} == dict.fromkeys(ids, 5)
    assert service.index.get("s-0").name == "s-0 version 5"
    assert service.index.get("s-3").price == 5.0


async def test_two_search_replicas_and_one_ingest_share_the_load(settings_for, store_settings, broker, topics):
    ingest = build_service(settings_for(**store_settings, role=Role.INGEST))
    replicas = [build_service(settings_for(**store_settings, role=Role.SEARCH, max_batch_wait_ms=5)) for _ in range(2)]
    async with running(ingest):
        await publish(broker.bootstrap, topics["product_updates_topic"], TEXT_PRODUCTS, key_field="product_id")
        await wait_for(lambda: ingest.batches > 0, what="ingest batch")
        async with running(replicas[0]), AsyncExitStack() as second:
            await second.enter_async_context(running(replicas[1]))
            await wait_for(lambda: all(r.assignment for r in replicas), what="both replicas assigned")
            await wait_for(lambda: all(len(r.index) == len(TEXT_PRODUCTS) for r in replicas), what="replicas caught up")
            late = {"product_id": "late-1", "version": 1, "name": "Glass teapot with infuser", "category": "kitchen"}
            await publish(broker.bootstrap, topics["product_updates_topic"], [late], key_field="product_id")
            await wait_for(lambda: all("late-1" in r.index for r in replicas), what="late product on both replicas")
            async with SearchClient(broker.bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
                waiters = [
                    await client.send({"request_id": f"split-{n}", "query_text": "Glass teapot with infuser", "top_k": 1})
                    for n in range(60)
                ]
                replies = await asyncio.wait_for(asyncio.gather(*waiters), 60)
                assert all(r["items"][0]["product_id"] == "late-1" for r in replies)
                assert all(replies_sent(r) > 0 for r in replicas), "one replica answered everything"

                await second.aclose()
                await wait_for(lambda: len(replicas[0].assignment) == 3, timeout=60, what="partitions moved to the survivor")
                more = [
                    await client.send({"request_id": f"after-{n}", "query_text": product_text(TEXT_PRODUCTS[n % 8]), "top_k": 1})
                    for n in range(30)
                ]
                after = await asyncio.wait_for(asyncio.gather(*more), 60)
                assert all(r["status"] == "ok" for r in after)
    records = await read_topic_records(broker.bootstrap, topics["reply_topic"])
    ids = [json.loads(r.value)["request_id"] for r in records]
    assert sorted(ids) == sorted([f"split-{n}" for n in range(60)] + [f"after-{n}" for n in range(30)])


async def test_products_stored_by_another_model_are_reencoded_not_mixed_in(settings_for, store_settings, broker, topics):
    import base64

    import numpy as np

    from consumer.index.feature_index import ProductMeta

    settings = settings_for(**store_settings)
    service = build_service(settings)
    image_event = load_catalog()[0]
    image_bytes = base64.b64decode(image_event["image_b64"])
    rng = np.random.default_rng(0)
    await service.store.ensure_indexes()
    await service.store.upsert(ProductMeta("old-text", 3, "Old text product", "", "misc", 1.0), rng.normal(size=77), "another-model")
    await service.store.upsert(
        ProductMeta("old-image", 4, "Old image product", "", "misc", 2.0), rng.normal(size=77), "another-model", image_bytes
    )
    async with running(service):
        assert products_encoded(service) == 2
        assert {pid: service.index.version_of(pid) for pid in ("old-text", "old-image")} == {"old-text": 3, "old-image": 4}
        stored = await service.store.get_versions(["old-text", "old-image"])
        assert {v[1] for v in stored.values()} == {service.encoder.model_id}
        reply = await ask_all(broker.bootstrap, topics, [{"query_text": "Old text product", "top_k": 1}])
    assert reply[0]["items"][0]["product_id"] == "old-text" and reply[0]["items"][0]["score"] > 0.999

"""The whole path through a real Kafka-protocol broker: products in, searches in, ranked replies out."""

from __future__ import annotations

import asyncio
import json

import pytest

from consumer.app import build_encoder
from producer_examples.client import SearchClient, load_catalog, product_text, publish
from tests.conftest import running, wait_for
from tests.kafka_tools import read_topic_records

pytestmark = pytest.mark.integration  # the whole path through the real broker

TEXT_PRODUCTS = [
    {"product_id": f"t-{i:02d}", "version": 1, "name": name, "description": desc, "category": cat, "price": price}
    for i, (name, desc, cat, price) in enumerate(
        [
            ("Red cotton t-shirt", "Soft crew-neck tee", "apparel", 15.0),
            ("Blue denim jeans", "Straight-leg jeans", "apparel", 49.0),
            ("Black leather boots", "Ankle boots", "footwear", 89.0),
            ("Green ceramic mug", "350 ml mug", "kitchen", 9.5),
            ("Steel kettle", "1.7 litre electric kettle", "kitchen", 34.0),
            ("Oak desk lamp", "Adjustable lamp", "home", 27.0),
            ("Purple yoga mat", "Non-slip mat", "sports", 24.0),
            ("Silver watch", "Analogue watch", "accessories", 120.0),
        ]
    )
]


async def test_catalog_searches_get_exactly_one_ranked_reply_each(service_factory, topics, broker):
    service = service_factory(max_batch_size=16)
    bootstrap = broker.bootstrap
    catalog = TEXT_PRODUCTS + load_catalog()
    async with running(service):
        await publish(bootstrap, topics["product_updates_topic"], catalog, key_field="product_id")
        await wait_for(lambda: len(service.index) == len(catalog), what="catalog indexed")
        async with SearchClient(bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
            for product in TEXT_PRODUCTS:
                reply = await client.search({"query_text": product_text(product), "top_k": 3})
                assert reply["status"] == "ok", reply
                assert [i["rank"] for i in reply["items"]] == [1, 2, 3]
                assert reply["items"][0]["product_id"] == product["product_id"]
                assert reply["items"][0]["score"] > 0.999
                assert reply["random_weights"] is True
                assert reply["_headers"]["correlation_id"] == reply["request_id"]

            kitchen = await client.search(
                {"query_text": "Red cotton t-shirt. Soft crew-neck tee", "top_k": 20, "filters": {"category": "kitchen"}}
            )
            assert kitchen["items"] and {i["category"] for i in kitchen["items"]} == {"kitchen"}
            cheap = await client.search({"query_text": "anything", "top_k": 50, "filters": {"max_price": 20}, "similarity_threshold": -1})
            assert cheap["items"] and all(i["price"] <= 20 for i in cheap["items"])
            assert len(cheap["items"]) == sum(1 for p in catalog if p["price"] <= 20)

            waiters = [
                await client.send({"request_id": f"burst-{n}", "query_text": TEXT_PRODUCTS[n % 8]["name"], "top_k": 2}) for n in range(50)
            ]
            replies = await asyncio.wait_for(asyncio.gather(*waiters), 60)
            assert sorted(r["request_id"] for r in replies) == sorted(f"burst-{n}" for n in range(50))
            assert all(r["status"] == "ok" and len(r["items"]) == 2 for r in replies)
            assert max(r["batch_size"] for r in replies) > 1, "requests were not micro-batched"
            registry = service.metrics.registry
            assert registry.get_sample_value("clip_search_reply_cache_entries") >= 50
            assert 50 * 100 < registry.get_sample_value("clip_search_reply_cache_bytes") <= service.settings.reply_cache_max_bytes

        records = await read_topic_records(bootstrap, topics["reply_topic"])
        ids = [json.loads(r.value)["request_id"] for r in records]
        assert len(ids) == len(set(ids)), "a request was answered twice"


async def test_versions_and_deletes_change_results(service_factory, topics, broker):
    service = service_factory()
    bootstrap, updates = broker.bootstrap, topics["product_updates_topic"]
    async with running(service):
        await publish(bootstrap, updates, TEXT_PRODUCTS, key_field="product_id")
        await wait_for(lambda: len(service.index) == len(TEXT_PRODUCTS), what="catalog indexed")
        async with SearchClient(bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
            query = {"query_text": "Cast iron frying pan", "top_k": 1}
            before = await client.search(query)
            assert before["items"][0]["product_id"] != "t-04"

            await publish(
                bootstrap,
                updates,
                [{"product_id": "t-04", "version": 2, "name": "Cast iron frying pan", "category": "kitchen"}],
                "product_id",
            )
            await wait_for(lambda: service.index.version_of("t-04") == 2, what="v2 applied")
            after = await client.search(query)
            assert after["items"][0]["product_id"] == "t-04" and after["items"][0]["name"] == "Cast iron frying pan"

            await publish(
                bootstrap, updates, [{"product_id": "t-04", "version": 1, "name": "Steel kettle", "description": "old"}], "product_id"
            )
            await publish(bootstrap, updates, [{"product_id": "t-05", "version": 2, "deleted": True}], "product_id")
            await wait_for(lambda: "t-05" not in service.index, what="delete applied")
            assert service.index.version_of("t-04") == 2
            again = await client.search(query)
            assert again["items"][0]["product_id"] == "t-04", "an older version overwrote a newer one"
            gone = await client.search({"query_text": "Oak desk lamp. Adjustable lamp", "top_k": 20, "similarity_threshold": -1})
            assert "t-05" not in {i["product_id"] for i in gone["items"]}
            assert len(gone["items"]) == len(TEXT_PRODUCTS) - 1


async def test_lazy_model_loads_once_on_first_searches(settings_for, topics, broker):
    settings = settings_for(lazy_load_model=True, max_batch_size=4, max_batch_wait_ms=0)
    encoder = build_encoder(settings)
    from consumer.app import build_service

    service = build_service(settings, encoder)
    async with running(service):
        await publish(broker.bootstrap, topics["search_requests_topic"], [{"request_id": "junk"}])
        dead = await wait_dead_letters(broker.bootstrap, topics["dead_letter_topic"], 1)
        assert dict(dead[0].headers)["error.code"] == b"schema_violation"
        assert encoder.load_counts == {"text": 0, "vision": 0}, "consuming must not load the model"

        async with SearchClient(broker.bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
            waiters = [await client.send({"query_text": f"first query {n}"}) for n in range(12)]
            replies = await asyncio.wait_for(asyncio.gather(*waiters), 60)
        assert all(r["status"] == "ok" for r in replies)
        assert encoder.load_counts == {"text": 1, "vision": 0}


async def wait_dead_letters(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        records = await read_topic_records(bootstrap, topic)
        if len(records) >= count:
            return records
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"expected {count} dead letters, found {len(records)}")
        await asyncio.sleep(0.1)


class ReplyPathFault(Exception):
    pass


async def test_no_reply_is_lost_when_the_reply_path_fails_before_commit(settings_for, topics, broker):
    """The first replica consumes a batch but dies publishing it; a restarted replica answers everything."""
    from consumer.app import build_service

    settings = settings_for(max_batch_size=32, max_batch_wait_ms=200)
    failing = build_service(settings)

    async def broken_publish(messages):
        raise ReplyPathFault("injected: broker unreachable on the reply path")

    failing.publish = broken_publish
    request_ids = [f"crash-{n}" for n in range(20)]
    requests = [{"request_id": rid, "query_text": f"query {rid}", "reply_to": topics["reply_topic"]} for rid in request_ids]
    await failing.start()
    try:
        await asyncio.wait_for(failing.assigned.wait(), 30)
        await publish(broker.bootstrap, topics["search_requests_topic"], requests, key_field="request_id")
        try:
            await asyncio.wait_for(failing.run(), 60)
            raise AssertionError("the injected fault did not fire")
        except ReplyPathFault:
            pass
        assert failing.batches == 0
    finally:
        await failing.close()
    assert await read_topic_records(broker.bootstrap, topics["reply_topic"]) == []

    restarted = build_service(settings)
    async with running(restarted):
        await wait_for(lambda: restarted.batches > 0, what="restarted replica to process")
        records = []

        async def all_answered() -> bool:
            records[:] = await read_topic_records(broker.bootstrap, topics["reply_topic"])
            return len(records) >= len(request_ids)

        deadline = asyncio.get_running_loop().time() + 60
        while not await all_answered():
            assert asyncio.get_running_loop().time() < deadline, f"only {len(records)} replies"
            await asyncio.sleep(0.1)
    answered = sorted(json.loads(r.value)["request_id"] for r in records)
    assert answered == sorted(request_ids)


def fetches(service) -> float:
    return service.metrics.registry.get_sample_value("clip_search_fetches_total")


async def test_memory_backpressure_pauses_fetching_and_resumes_below_low_water(settings_for, topics, broker):
    from consumer.app import build_service

    rss = [10**12]
    service = build_service(settings_for(memory_limit_mb=400, memory_low_water=0.8))
    service.memory_guard.read_rss = lambda: rss[0]
    async with running(service):
        await wait_for(lambda: service.memory_guard.paused and service.consumer.paused(), what="fetching paused")
        async with SearchClient(broker.bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
            waiters = [await client.send({"request_id": f"bp-{n}", "query_text": f"q {n}"}) for n in range(10)]
            polls = fetches(service)
            await wait_for(lambda: fetches(service) >= polls + 3, what="loop keeps polling while paused")
            assert service.batches == 0 and not any(w.done() for w in waiters), "records were fetched while paused"
            rss[0] = 390 * 1024 * 1024
            polls = fetches(service)
            await wait_for(lambda: fetches(service) >= polls + 2, what="loop iterations")
            assert service.memory_guard.paused, "resumed above the low-water mark"
            rss[0] = 100 * 1024 * 1024
            replies = await asyncio.wait_for(asyncio.gather(*waiters), 60)
    assert sorted(r["request_id"] for r in replies) == sorted(f"bp-{n}" for n in range(10))
    assert service.metrics.registry.get_sample_value("clip_search_pauses_total") == 1


async def test_an_image_burst_is_applied_in_slices_while_searches_are_answered(service_factory, topics, broker):
    """ROLE=all, MAX_IMAGES_PER_BATCH=2: a burst of 9 image updates is encoded at most 2 images per batch
    (the rest of the partition is deferred to the next batch, not lost, and committed once applied),
    and a search sent during the burst is answered."""
    import base64
    import io

    from PIL import Image

    from tests.kafka_tools import committed_offsets

    def png(n: int) -> str:
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (n * 25 % 256, 80, 160)).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    service = service_factory(max_images_per_batch=2, max_batch_size=16, max_batch_wait_ms=50)
    batch_sizes: list[int] = []
    handle = service.product_handler.handle

    async def recording_handle(updates):
        batch_sizes.append(sum(1 for u in updates if u.image_b64))
        return await handle(updates)

    service.product_handler.handle = recording_handle
    products = [{"product_id": f"img-{n}", "version": 1, "name": f"picture {n}", "image_b64": png(n)} for n in range(9)]
    async with running(service), SearchClient(broker.bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
        await publish(broker.bootstrap, topics["product_updates_topic"], products, key_field="product_id")
        reply = await asyncio.wait_for(await client.send({"request_id": "during-burst", "query_text": "picture"}), 60)
        await wait_for(lambda: len(service.index) == len(products), what="every image update applied")
    committed = await committed_offsets(broker.bootstrap, topics["consumer_group_id"], topics["product_updates_topic"])
    assert reply["status"] == "ok"
    assert max(batch_sizes) <= 2 and sum(batch_sizes) == len(products), batch_sizes
    assert sum(committed.values()) == len(products)

"""Search replicas restarting from an index snapshot, over the real broker (Tansu) and store.

A restarted replica reads only the features published after its snapshot and ends with
the same index as a replica that read the whole topic; a snapshot the topic no longer
matches, or a damaged one, is discarded and the whole topic is read.
"""

from __future__ import annotations

import asyncio

import numpy as np

from consumer.app import build_service, readiness
from consumer.config.settings import Role
from consumer.index.feature_index import FeatureIndex, ProductMeta
from consumer.index.ranking import Query
from consumer.index.snapshot import SnapshotFile
from producer_examples.client import SearchClient, product_text, publish
from tests.conftest import feature_records, running
from tests.kafka_tools import read_topic_records
from tests.system.test_end_to_end import TEXT_PRODUCTS


async def features_published(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> None:
    """Poll the features topic until it holds ``count`` records."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(await read_topic_records(bootstrap, topic)) < count:
        assert asyncio.get_running_loop().time() < deadline, f"fewer than {count} records reached {topic}"
        await asyncio.sleep(0.1)


def contents(index: FeatureIndex) -> dict[str, ProductMeta]:
    return {pid: index.get(pid) for pid in index.ids()}


def ranking(index: FeatureIndex) -> list:
    queries = np.random.default_rng(3).standard_normal((4, index.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return [[(h.product_id, h.score) for h, _ in row] for row in index.search(queries, [Query(top_k=20)] * 4)]


async def test_restart_reads_only_features_newer_than_the_snapshot(settings_for, store_settings, broker, topics, tmp_path):
    features_topic = topics["features_topic"]
    search = {"role": Role.SEARCH, "feature_dtype": "int8", "index_snapshot_dir": str(tmp_path)}
    ingest = build_service(settings_for(**store_settings, role=Role.INGEST))
    async with running(ingest):
        await publish(broker.bootstrap, topics["product_updates_topic"], TEXT_PRODUCTS, key_field="product_id")
        await features_published(broker.bootstrap, features_topic, len(TEXT_PRODUCTS))

        first = build_service(settings_for(**search))
        async with running(first):
            assert not first.follower.snapshot_loaded
            assert len(first.index) == len(TEXT_PRODUCTS)
            follower = first.follower
        assert follower.snapshots_written == 1, "no snapshot at shutdown"
        assert first.metrics.registry.get_sample_value("clip_search_index_snapshot_writes_total", {"outcome": "written"}) == 1

        changes = [
            TEXT_PRODUCTS[0] | {"version": 2, "name": "Green cotton t-shirt"},
            {"product_id": TEXT_PRODUCTS[1]["product_id"], "version": 2, "deleted": True},
            {"product_id": "late-1", "version": 1, "name": "Glass teapot with infuser", "category": "kitchen"},
        ]
        await publish(broker.bootstrap, topics["product_updates_topic"], changes, key_field="product_id")
        await features_published(broker.bootstrap, features_topic, len(TEXT_PRODUCTS) + len(changes))

        restarted = build_service(settings_for(**search, consumer_group_id=topics["consumer_group_id"] + "-2"))
        seen_while_joining = []
        join = restarted._join_group

        async def join_and_ask_readiness() -> None:
            await join()
            seen_while_joining.append(await readiness(restarted))

        restarted._join_group = join_and_ask_readiness
        async with running(restarted):
            assert seen_while_joining[0] == "feature index still catching up with the features topic", (
                "the group join did not overlap the catch-up"
            )
            assert await readiness(restarted) is None
            sample = restarted.metrics.registry.get_sample_value
            assert sample("clip_search_index_snapshot_timestamp_seconds") == follower.snapshot_file.path.stat().st_mtime
            assert sample("clip_search_index_catch_up_seconds") > 0
            assert restarted.follower.snapshot_loaded
            assert feature_records(restarted) == len(changes), "the replica re-read features its snapshot holds"
            assert restarted.follower.applied == len(changes)
            assert restarted.index.get("t-00").name == "Green cotton t-shirt"
            assert "t-01" not in restarted.index and "late-1" in restarted.index
            async with SearchClient(broker.bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
                reply = await client.search({"query_text": product_text(changes[2]), "top_k": 1})
            assert reply["status"] == "ok" and reply["items"][0]["product_id"] == "late-1"
            warm = (contents(restarted.index), ranking(restarted.index))

        cold = build_service(settings_for(**(search | {"index_snapshot_dir": None}), consumer_group_id=topics["consumer_group_id"] + "-3"))
        async with running(cold):
            assert feature_records(cold) == cold.follower.applied == len(TEXT_PRODUCTS) + len(changes)
            assert (contents(cold.index), ranking(cold.index)) == warm


async def test_a_snapshot_the_topic_does_not_match_is_discarded(settings_for, store_settings, broker, topics, tmp_path):
    ingest = build_service(settings_for(**store_settings, role=Role.INGEST))
    async with running(ingest):
        await publish(broker.bootstrap, topics["product_updates_topic"], TEXT_PRODUCTS[:3], key_field="product_id")
        await features_published(broker.bootstrap, topics["features_topic"], 3)

    settings = settings_for(role=Role.SEARCH, index_snapshot_dir=str(tmp_path))
    replica = build_service(settings)
    file = SnapshotFile(tmp_path, settings.features_topic, replica.encoder.model_id, replica.index.dtype, replica.index.dim)
    ghost = FeatureIndex(replica.index.dim, replica.index.dtype)
    ghost.upsert(ProductMeta("ghost", 1, "from an older topic", "", None, None), np.ones(replica.index.dim, np.float32))
    file.save(ghost, {0: 10_000})

    async with running(replica):
        assert not replica.follower.snapshot_loaded
        assert sorted(replica.index.ids()) == sorted(p["product_id"] for p in TEXT_PRODUCTS[:3])
    replaced = file.load()
    assert replaced is not None and sorted(replaced.state.ids) == sorted(replica.index.ids()), "the discarded snapshot was not replaced"

    file.path.write_bytes(b"PK\x03\x04 damaged")
    again = build_service(
        settings_for(role=Role.SEARCH, index_snapshot_dir=str(tmp_path), consumer_group_id=topics["consumer_group_id"] + "-2")
    )
    async with running(again):
        assert not again.follower.snapshot_loaded
        assert len(again.index) == 3
    assert file.load() is not None

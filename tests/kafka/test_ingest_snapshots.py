"""The ingest role writes index snapshots (``INGEST_WRITES_SNAPSHOTS``), so a first search replica starts from one.

Over the real broker (Tansu) and store (SecantusDB), in-process replicas: an ingest replica with
``INDEX_SNAPSHOT_DIR`` follows the features topic it publishes to and writes the file a search
replica of the same model and ``FEATURE_DTYPE`` loads; its readiness never waits for that follower,
and a failure of the follower is reported and restarted without stopping the product lane.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import yaml

from consumer.app import build_service, readiness
from consumer.config.settings import Role, Settings
from consumer.index.snapshot import Snapshot, SnapshotFile
from consumer.kafka.service import Service
from producer_examples.client import SearchClient, product_text, publish
from tests.conftest import feature_records, products_encoded, running, wait_for
from tests.kafka.test_follower_supervision import fail_feature_apply_once
from tests.kafka_tools import read_topic_records
from tests.system.test_end_to_end import TEXT_PRODUCTS

SNAPSHOT_WRITES = "clip_search_index_snapshot_writes_total"


def snapshot_file(service: Service) -> SnapshotFile:
    """The snapshot file a replica of ``service``'s model and index layout reads and writes."""
    s, index = service.settings, service.index
    assert s.index_snapshot_dir is not None and index is not None
    return SnapshotFile(s.index_snapshot_dir, s.features_topic, service.encoder.model_id, index.dtype, index.dim)


def writes(service: Service) -> float:
    return service.metrics.registry.get_sample_value(SNAPSHOT_WRITES, {"outcome": "written"}) or 0.0


async def snapshot_at(file: SnapshotFile, offsets: dict[int, int], timeout: float = 30.0) -> Snapshot:
    """The snapshot in ``file`` once it reflects the features topic up to ``offsets``."""
    found: list[Snapshot] = []

    def reflects() -> bool:
        snapshot = file.load()
        if snapshot is not None and snapshot.offsets == offsets:
            found.append(snapshot)
        return bool(found)

    await wait_for(reflects, timeout, what=f"a snapshot at offsets {offsets}")
    return found[0]


async def topic_end(bootstrap: str, topic: str) -> dict[int, int]:
    """The next offset of every partition of ``topic`` that holds records."""
    ends: dict[int, int] = {}
    for record in await read_topic_records(bootstrap, topic):
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
    return ends


def test_ingest_writes_snapshots_only_with_a_snapshot_dir_unless_switched_off() -> None:
    base = {"_env_file": None, "index_snapshot_dir": "/snapshots"}
    assert Settings(**base, role=Role.INGEST).ingest_snapshots
    assert not Settings(**base, role=Role.INGEST, ingest_writes_snapshots=False).ingest_snapshots
    assert not Settings(**(base | {"index_snapshot_dir": None}), role=Role.INGEST).ingest_snapshots
    assert not Settings(**base, role=Role.SEARCH).ingest_snapshots
    assert not Settings(**base, role=Role.ALL).ingest_snapshots


@pytest.mark.usefixtures("tiny_exports")
def test_ingest_and_search_replicas_name_the_same_snapshot_file_without_loading_a_tower(tiny_model, tmp_path) -> None:
    common = {"_env_file": None, "clip_model": tiny_model, "index_snapshot_dir": str(tmp_path), "feature_dtype": "int8"}
    ingest = build_service(Settings(**common, role=Role.INGEST, mongodb_uri="mongodb://127.0.0.1:1"))
    search = build_service(Settings(**common, role=Role.SEARCH))
    assert ingest.index is not None and search.index is not None
    assert (ingest.encoder.model_id, ingest.index.dim, ingest.index.dtype) == (search.encoder.model_id, search.index.dim, "int8")
    assert snapshot_file(ingest).path == snapshot_file(search).path
    assert ingest.encoder.load_counts == {"text": 0, "vision": 0}, "the model id and dim come from the manifest and config"
    assert ingest.product_handler.index is None, "the ingest role checks versions in the store, not in its snapshot index"
    off = build_service(Settings(**common, role=Role.INGEST, mongodb_uri="mongodb://127.0.0.1:1", ingest_writes_snapshots=False))
    assert off.index is None


async def test_a_first_search_replica_starts_from_the_snapshot_the_ingest_replica_wrote(
    settings_for, store_settings, broker, topics, tmp_path
):
    layout = {"index_snapshot_dir": str(tmp_path), "feature_dtype": "int8"}
    ingest = build_service(settings_for(**store_settings, **layout, role=Role.INGEST, index_snapshot_interval_s=0.2))
    file = snapshot_file(ingest)
    await ingest.start()
    async with running(ingest, start=False):
        await publish(broker.bootstrap, topics["product_updates_topic"], TEXT_PRODUCTS, key_field="product_id")
        await wait_for(lambda: products_encoded(ingest) == len(TEXT_PRODUCTS), what="the updates applied")
        end = await topic_end(broker.bootstrap, topics["features_topic"])
        assert sum(end.values()) == len(TEXT_PRODUCTS)
        snapshot = await snapshot_at(file, end)
        await wait_for(lambda: writes(ingest) >= 1, what="the snapshot counted (the file is renamed into place first)")
        assert await readiness(ingest) is None
    assert sorted(snapshot.state.ids) == sorted(p["product_id"] for p in TEXT_PRODUCTS)

    search = build_service(settings_for(**layout, role=Role.SEARCH))
    async with running(search):
        assert search.follower is not None and search.follower.snapshot_loaded
        assert feature_records(search) == 0, "the search replica read features its snapshot holds"
        assert len(search.index) == len(TEXT_PRODUCTS)
        async with SearchClient(broker.bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
            for product in TEXT_PRODUCTS[:3]:
                reply = await client.search({"query_text": product_text(product), "top_k": 1})
                assert reply["status"] == "ok" and reply["items"][0]["product_id"] == product["product_id"]


async def test_ingest_is_ready_before_its_follower_caught_up_which_then_writes_a_snapshot_and_one_at_shutdown(
    settings_for, store_settings, broker, topics, tmp_path
):
    before, later = TEXT_PRODUCTS[:4], TEXT_PRODUCTS[4]
    plain = build_service(settings_for(**store_settings, role=Role.INGEST))
    async with running(plain):
        await publish(broker.bootstrap, topics["product_updates_topic"], before, key_field="product_id")
        await wait_for(lambda: products_encoded(plain) == len(before), what="the first updates applied")

    ingest = build_service(settings_for(**store_settings, role=Role.INGEST, index_snapshot_dir=str(tmp_path)))
    follower_blocked = ingest.index_lock
    await follower_blocked.acquire()
    await ingest.start()
    async with running(ingest, start=False):
        follower = ingest.follower
        assert follower is not None
        assert not follower.caught_up and await readiness(ingest) is None, "ingest readiness waited for the snapshot follower"
        follower_blocked.release()
        snapshot = await snapshot_at(snapshot_file(ingest), {0: len(before)})
        assert sorted(snapshot.state.ids) == [p["product_id"] for p in before]
        await wait_for(lambda: writes(ingest) >= 1, what="the snapshot counted (the file is renamed into place first)")
        assert writes(ingest) == 1, "the catch-up wrote one snapshot at once (the 300 s interval had not passed)"

        await publish(broker.bootstrap, topics["product_updates_topic"], [later], key_field="product_id")
        await wait_for(lambda: later["product_id"] in ingest.index, what="the new feature followed")
    assert writes(ingest) == 2, "no snapshot at shutdown"
    last = snapshot_file(ingest).load()
    assert last is not None and last.offsets == {0: len(before) + 1} and later["product_id"] in last.state.ids


async def test_a_failed_ingest_follower_is_reported_and_restarted_while_the_product_lane_goes_on(
    settings_for, store_settings, broker, topics, tmp_path, monkeypatch, caplog
):
    ingest = build_service(
        settings_for(**store_settings, role=Role.INGEST, index_snapshot_dir=str(tmp_path), retry_backoff_s=0.5, retry_backoff_max_s=1.0)
    )
    failed = fail_feature_apply_once(monkeypatch)
    await ingest.start()
    async with running(ingest, start=False):
        await publish(broker.bootstrap, topics["product_updates_topic"], TEXT_PRODUCTS, key_field="product_id")
        await asyncio.wait_for(failed.wait(), 30)
        await wait_for(lambda: products_encoded(ingest) == len(TEXT_PRODUCTS), what="the product lane to apply every update")
        await wait_for(lambda: len(ingest.index) == len(TEXT_PRODUCTS), what="the restarted follower to read every feature")
        await wait_for(lambda: ingest.supervisor.reason is None, what="the follower to report its recovery")
    failures = ingest.metrics.registry.get_sample_value("clip_search_background_task_failures_total", {"task": "feature-follower"})
    assert failures == 1
    errors = [r.getMessage() for r in caplog.records if r.name == "consumer.ops.supervisor" and r.levelno == logging.ERROR]
    assert errors == ["background task feature-follower failed: RuntimeError('boom'); restarting in 0.5 s"]
    last = snapshot_file(ingest).load()
    assert last is not None and sorted(last.state.ids) == sorted(p["product_id"] for p in TEXT_PRODUCTS)


def test_the_compose_ingest_replica_writes_to_the_search_replicas_snapshot_volume() -> None:
    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    ingest, search = (compose["services"][name] for name in ("clip-search-ingest", "clip-search-search"))
    env = {name: svc["environment"] for name, svc in (("ingest", ingest), ("search", search))}
    assert env["ingest"]["INDEX_SNAPSHOT_DIR"] == env["search"]["INDEX_SNAPSHOT_DIR"]
    assert env["ingest"].get("FEATURE_DTYPE") == env["search"].get("FEATURE_DTYPE"), "the snapshot file is named by FEATURE_DTYPE"
    mounted = {
        svc: {v for v in s["volumes"] if v.endswith(":" + env["search"]["INDEX_SNAPSHOT_DIR"])} for svc, s in (("i", ingest), ("s", search))
    }
    assert mounted["i"] == mounted["s"] != set()

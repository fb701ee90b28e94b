"""ProductStore against a real SecantusDB: versioning, tombstones, model ids, on-demand search, crash restart."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

import numpy as np
import pytest
from pymongo import AsyncMongoClient

from consumer.index.feature_index import FeatureIndex, ProductMeta
from consumer.index.ranking import Query, SearchFilter
from consumer.store.product_store import ProductStore
from devservices import MongoServer

MODEL = "clip-test"
OTHER_MODEL = "clip-old"
DIM = 64
CATEGORIES = ["shoes", "hats", "bags", None]


@pytest.fixture(scope="session")
def mongo() -> Iterator[MongoServer]:
    with MongoServer(storage_path=":memory:") as server:
        yield server


@pytest.fixture
async def store(mongo: MongoServer) -> AsyncIterator[ProductStore]:
    client: AsyncMongoClient = AsyncMongoClient(mongo.uri)
    name = f"store_{uuid.uuid4().hex[:8]}"
    s = ProductStore(client, name)
    await s.ensure_indexes()
    yield s
    await client.drop_database(name)
    await s.close()


def meta(pid: str, version: int, category: str | None = "shoes", price: float | None = 10.0) -> ProductMeta:
    return ProductMeta(pid, version, f"{pid} v{version}", f"about {pid}", category, price)


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def grid_products(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit vectors exactly representable in float16: m in {4, 16, 64} entries of ±1/sqrt(m), rest 0."""
    out = np.zeros((n, DIM), dtype=np.float32)
    for i in range(n):
        m = int(rng.choice([4, 16, 64]))
        cols = rng.choice(DIM, size=m, replace=False)
        out[i, cols] = rng.choice([-1.0, 1.0], size=m) / np.sqrt(m)
    return out


def grid_queries(rng: np.random.Generator, n: int) -> np.ndarray:
    """Near-unit queries on a 2**-8 grid: dot products with grid_products are exact in float32."""
    return np.round(unit(rng, n) * 256) / 256


def catalog(rng: np.random.Generator, n: int) -> list[ProductMeta]:
    metas = []
    for i in range(n):
        price = None if rng.random() < 0.1 else float(np.round(rng.uniform(0, 100), 2))
        metas.append(meta(f"p{i:05d}", int(rng.integers(1, 5)), CATEGORIES[int(rng.integers(0, 4))], price))
    return metas


QUERY_BATCHES: list[list[Query]] = [
    [Query(top_k=10), Query(top_k=1), Query(top_k=100), Query(top_k=25, threshold=0.2)],
    [Query(top_k=15, filter=SearchFilter(category="shoes"))] * 3,
    [Query(top_k=30, filter=SearchFilter(min_price=20.0, max_price=40.0), threshold=0.05)] * 2,
    [
        Query(top_k=10),
        Query(top_k=20, filter=SearchFilter(category="hats")),
        Query(top_k=5, filter=SearchFilter(min_price=90.0)),
        Query(top_k=50, filter=SearchFilter(category="bags", max_price=30.0), threshold=0.0),
        Query(top_k=3, threshold=0.35),
    ],
    [
        Query(top_k=40, filter=SearchFilter(category="hats", min_price=50.0)),
        Query(top_k=12, filter=SearchFilter(category="bags")),
        Query(top_k=7, filter=SearchFilter(max_price=5.0)),
        Query(top_k=5, filter=SearchFilter(category="no-such-category")),
    ],
    [Query(top_k=2000, filter=SearchFilter(category="hats", min_price=10.0, max_price=12.0))],
]


async def fill(store: ProductStore, metas: Sequence[ProductMeta], features: np.ndarray, model_id: str = MODEL) -> None:
    for start in range(0, len(metas), 500):
        items = list(zip(metas[start : start + 500], features[start : start + 500], strict=True))
        assert all(await store.upsert_many(items, model_id))


async def stale_ids(store: ProductStore, model_id: str) -> list[str]:
    """Ids of live products stored by another model than ``model_id`` (what a model switch re-encodes), sorted."""
    return sorted([m.product_id async for m, _ in store.iter_stale_model_products(model_id)])


async def test_journaled_by_default(store: ProductStore) -> None:
    assert store.collection.write_concern.document.get("j") is True


async def test_versioned_upsert(store: ProductStore) -> None:
    f = unit(np.random.default_rng(0))[0]
    assert await store.upsert(meta("a", 5), f, MODEL)
    assert not await store.upsert(meta("a", 5), f, MODEL)
    assert not await store.upsert(meta("a", 3, category="old"), f, MODEL)
    assert await store.get_versions(["a", "missing"]) == {"a": (5, MODEL, False)}
    [(stored, feature)] = [item async for item in store.iter_products(MODEL)]
    assert stored == meta("a", 5)
    assert feature.dtype == np.float32
    np.testing.assert_allclose(feature, f, atol=1e-3)
    assert await store.upsert(meta("a", 6, category="new", price=None), f, MODEL)
    [(stored, _)] = [item async for item in store.iter_products(MODEL)]
    assert stored == meta("a", 6, category="new", price=None)


async def test_upsert_rejects_bad_features(store: ProductStore) -> None:
    with pytest.raises(ValueError):
        await store.upsert(meta("z", 1), np.zeros(DIM), MODEL)
    with pytest.raises(ValueError):
        await store.upsert(meta("z", 1), np.full(DIM, np.nan), MODEL)
    with pytest.raises(ValueError):
        await store.upsert(meta("z", 1), np.ones((2, DIM)), MODEL)
    assert await store.get_versions(["z"]) == {}


async def test_concurrent_writers_keep_newest(store: ProductStore, mongo: MongoServer) -> None:
    """Shuffled versions from two clients (two 'processes'), all in flight at once: the newest wins."""
    other_client: AsyncMongoClient = AsyncMongoClient(mongo.uri)
    other = ProductStore(other_client, store.collection.database.name)
    rng = random.Random(7)
    f = unit(np.random.default_rng(1))[0]
    ids = [f"c{i}" for i in range(6)]
    writes = [(pid, v) for pid in ids for v in range(1, 31)]
    rng.shuffle(writes)
    try:
        applied = await asyncio.gather(*[(store if i % 2 else other).upsert(meta(pid, v), f, MODEL) for i, (pid, v) in enumerate(writes)])
    finally:
        await other.close()
    assert await store.get_versions(ids) == dict.fromkeys(ids, (30, MODEL, False))
    names = {m.product_id: m.name async for m, _ in store.iter_products(MODEL)}
    assert names == {pid: f"{pid} v30" for pid in ids}
    accepted = {(pid, v) for (pid, v), ok in zip(writes, applied, strict=True) if ok}
    assert {(pid, 30) for pid in ids} <= accepted


async def test_lost_first_insert_race_is_retried(store: ProductStore) -> None:
    """On MongoDB two first upserts of one id can race: the loser gets E11000 although it may be newer."""

    class RacingStore(ProductStore):
        __slots__ = ("raced",)

        async def _upsert_if_older(self, write) -> bool:
            pid = write.older["_id"]
            if pid in self.raced:
                return await super()._upsert_if_older(write)
            self.raced.append(pid)
            await self.collection.insert_one({"_id": pid, "version": 1, "deleted": False, "model_id": MODEL})
            return False

    racing = RacingStore(store.collection.database.client, store.collection.database.name)
    racing.raced = []
    assert await racing.upsert(meta("r", 5), unit(np.random.default_rng(11))[0], MODEL)
    assert await racing.delete("t", 4)
    assert racing.raced == ["r", "t"]
    assert await store.get_versions(["r", "t"]) == {"r": (5, MODEL, False), "t": (4, None, True)}


async def test_upsert_many(store: ProductStore) -> None:
    f = unit(np.random.default_rng(2), 6)
    assert await store.upsert(meta("m1", 5), f[0], MODEL)
    versions = [("m1", 4), ("m2", 1), ("m2", 3), ("m2", 2), ("m3", 1)]
    items = [(meta(pid, v), f[i + 1]) for i, (pid, v) in enumerate(versions)]
    applied = await store.upsert_many(items, MODEL)
    assert (applied[0], applied[2], applied[4]) == (False, True, True)  # m2's v1/v2 flags depend on the server's order
    assert await store.upsert_many([], MODEL) == []
    assert await store.get_versions(["m1", "m2", "m3"]) == {
        "m1": (5, MODEL, False),
        "m2": (3, MODEL, False),
        "m3": (1, MODEL, False),
    }


async def test_upsert_many_keeps_each_item_s_image(store: ProductStore) -> None:
    f = unit(np.random.default_rng(4), 3)
    items = [(meta(pid, 1), f[i]) for i, pid in enumerate(("i1", "i2", "i3"))]
    assert await store.upsert_many(items, "old-model", [b"jpeg-1", None, b"jpeg-3"]) == [True] * 3
    kept = {m.product_id: image async for m, image in store.iter_stale_model_products(MODEL)}
    assert kept == {"i1": b"jpeg-1", "i2": None, "i3": b"jpeg-3"}
    with pytest.raises(ValueError, match="2 images for 3 items"):
        await store.upsert_many(items, MODEL, [b"a", b"b"])


async def test_delete_tombstone(store: ProductStore) -> None:
    f = unit(np.random.default_rng(3))[0]
    assert await store.upsert(meta("d", 1), f, MODEL)
    assert not await store.delete("d", 0)
    assert await store.delete("d", 2)
    assert not await store.delete("d", 2)
    assert await store.get_versions(["d"]) == {"d": (2, None, True)}
    assert not await store.upsert(meta("d", 1), f, MODEL)
    assert not await store.upsert(meta("d", 2), f, MODEL)
    assert await store.count(MODEL) == 0
    assert [item async for item in store.iter_products(MODEL)] == []
    doc = await store.collection.find_one({"_id": "d"})
    assert doc is not None and "feature" not in doc and "name" not in doc
    assert await store.upsert(meta("d", 3), f, MODEL)
    assert await store.get_versions(["d"]) == {"d": (3, MODEL, False)}
    assert await store.delete("d", 3)  # same version as the live product deletes it, like FeatureIndex
    assert await store.delete("never-seen", 4)
    assert not await store.upsert(meta("never-seen", 4), f, MODEL)
    assert await store.get_versions(["d", "never-seen"]) == {"d": (3, None, True), "never-seen": (4, None, True)}


async def test_model_ids_are_not_mixed(store: ProductStore) -> None:
    rng = np.random.default_rng(4)
    f = unit(rng, 5)
    for i in range(3):
        assert await store.upsert(meta(f"new{i}", 1), f[i], MODEL)
    assert await store.upsert(meta("old0", 1), f[3], OTHER_MODEL)
    assert await store.upsert(meta("old1", 1), f[4], OTHER_MODEL)
    assert await store.delete("old1", 2)
    got = {m.product_id: feature async for m, feature in store.iter_products(MODEL, batch_size=2)}
    assert sorted(got) == ["new0", "new1", "new2"]
    for i in range(3):
        np.testing.assert_allclose(got[f"new{i}"], f[i], atol=1e-3)
    assert await store.count(MODEL) == 3
    assert await store.count(OTHER_MODEL) == 1
    assert await stale_ids(store, MODEL) == ["old0"]
    assert await stale_ids(store, OTHER_MODEL) == ["new0", "new1", "new2"]
    [[(hit, m)]] = await store.search(f[3:4], [Query(top_k=5)], OTHER_MODEL)
    assert (hit.product_id, m.name) == ("old0", "old0 v1")


async def test_reencode_same_version_with_current_model(store: ProductStore) -> None:
    """A stale-model product is replaced by the same version encoded with the current model."""
    f = unit(np.random.default_rng(10), 2)
    assert await store.upsert(meta("s", 3), f[0], OTHER_MODEL)
    assert await stale_ids(store, MODEL) == ["s"]
    assert not await store.upsert(meta("s", 2), f[1], MODEL)
    assert await store.upsert(meta("s", 3), f[1], MODEL)
    assert not await store.upsert(meta("s", 3), f[1], MODEL)
    assert await stale_ids(store, MODEL) == []
    [(m, feature)] = [item async for item in store.iter_products(MODEL)]
    assert m == meta("s", 3)
    np.testing.assert_allclose(feature, f[1], atol=1e-3)
    assert await store.upsert_many([(meta("s", 3), f[0])], OTHER_MODEL) == [True]
    assert await store.delete("s", 3)
    assert not await store.upsert(meta("s", 3), f[1], MODEL)


@pytest.fixture(scope="module")
def grid_catalog() -> tuple[list[ProductMeta], np.ndarray]:
    rng = np.random.default_rng(42)
    return catalog(rng, 2000), grid_products(rng, 2000)


async def test_search_equals_feature_index(store: ProductStore, grid_catalog: tuple[list[ProductMeta], np.ndarray]) -> None:
    """Identical ids, order, scores and metadata on data whose float16 copy is exact.

    Products are float16-exact unit vectors and queries lie on a 2**-8 grid, so every
    score is computed exactly by both sides and ties (broken by id) are real ties.
    On general data the float16 copy moves scores by up to ~5e-4, which could swap
    products whose float32 scores are that close (see test_search_general_data).
    """
    metas, features = grid_catalog
    await fill(store, metas, features)
    index = FeatureIndex(DIM, "float32")
    for m, f in zip(metas, features, strict=True):
        index.upsert(m, f)
    rng = np.random.default_rng(5)
    extra = unit(rng, 20)
    for i in range(10):
        assert await store.upsert(meta(f"x{i:02d}", 1), extra[i], OTHER_MODEL)
    for i in range(10, 20):
        m = meta(f"x{i:02d}", 1, category="shoes", price=25.0)
        assert await store.upsert(m, extra[i], MODEL)
        assert await store.delete(m.product_id, 2)
    for m in metas[:50]:
        newer = ProductMeta(m.product_id, m.version + 1, "renamed " + m.name, m.description, m.category, m.price)
        assert await store.upsert(newer, features[int(m.product_id[1:])], MODEL)
        assert index.upsert(newer, features[int(m.product_id[1:])])
    for m in metas[50:60]:
        assert await store.delete(m.product_id, m.version)
        assert index.delete(m.product_id, m.version)
    assert await store.count(MODEL) == len(index) == 1990

    for params in QUERY_BATCHES:
        queries = grid_queries(rng, len(params))
        expected = index.search(queries, params)
        assert any(expected), "every batch should find something"
        for chunk_rows in (4096, 333):
            got = await store.search(queries, params, MODEL, chunk_rows=chunk_rows)
            ids = [[h.product_id for h, _ in hits] for hits in got]
            assert ids == [[h.product_id for h, _ in hits] for hits in expected]
            for got_hits, exp_hits in zip(got, expected, strict=True):
                for (gh, gm), (eh, em) in zip(got_hits, exp_hits, strict=True):
                    assert abs(gh.score - eh.score) <= 1e-3
                    assert gm == em


async def test_search_general_data(store: ProductStore) -> None:
    """Random float data: hits are within 1e-3 of their float32 scores and form a correct top-k up to that error."""
    rng = np.random.default_rng(6)
    metas, features = catalog(rng, 1500), unit(rng, 1500)
    await fill(store, metas, features)
    for params in QUERY_BATCHES:
        queries = unit(rng, len(params))
        exact = queries.astype(np.float64) @ features.T.astype(np.float64)
        got = await store.search(queries, params, MODEL, chunk_rows=500)
        for r, (p, hits) in enumerate(zip(params, got, strict=True)):
            ok = np.array([p.filter is None or p.filter.matches(m.category, m.price) for m in metas], dtype=bool)
            scores = exact[r]
            ids = [int(h.product_id[1:]) for h, _ in hits]
            assert len(set(ids)) == len(ids) <= p.top_k
            assert [h.score for h, _ in hits] == sorted((h.score for h, _ in hits), reverse=True)
            threshold = -np.inf if p.threshold is None else p.threshold
            for (h, _), i in zip(hits, ids, strict=True):
                assert ok[i] and abs(h.score - scores[i]) <= 1e-3 and scores[i] >= threshold - 1e-3
            omitted = ok.copy()
            omitted[ids] = False
            if len(ids) == p.top_k:
                assert np.all(scores[omitted] <= min(scores[ids]) + 2e-3)
            else:
                assert np.all(scores[omitted] < threshold + 1e-3)


async def test_search_validation(store: ProductStore) -> None:
    rng = np.random.default_rng(8)
    assert await store.upsert(meta("v", 1), unit(rng)[0], MODEL)
    assert await store.search(np.zeros((0, DIM), np.float32), [], MODEL) == []
    assert await store.search(unit(rng), [Query(top_k=3)], "unknown-model") == [[]]
    with pytest.raises(ValueError):
        await store.search(unit(rng, 2), [Query(top_k=3)], MODEL)
    with pytest.raises(ValueError):
        await store.search(np.ones((1, DIM + 1), np.float32), [Query(top_k=3)], MODEL)


@pytest.mark.integration  # starts (and SIGKILLs) a SecantusDB of its own
async def test_kill_and_restart_keeps_data(tmp_path) -> None:
    """Acknowledged (journaled) writes survive SIGKILL of the server right after the ack."""
    server = MongoServer(storage_path=tmp_path / "data").start()
    try:
        client: AsyncMongoClient = AsyncMongoClient(server.uri)
        s = ProductStore(client, "durable")
        await s.ensure_indexes()
        rng = np.random.default_rng(9)
        features = unit(rng, 50)
        await fill(s, [meta(f"k{i:02d}", 1) for i in range(50)], features)
        assert await s.delete("k00", 2)
        assert await s.upsert(meta("k01", 2, category="hats"), features[1], MODEL)
        await s.close()
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)
        client = AsyncMongoClient(server.uri)
        s = ProductStore(client, "durable")
        try:
            assert await s.count(MODEL) == 49
            versions = await s.get_versions(["k00", "k01", "k02"])
            assert versions == {"k00": (2, None, True), "k01": (2, MODEL, False), "k02": (1, MODEL, False)}
            assert not await s.upsert(meta("k00", 1), features[0], MODEL)
            [[(hit, m)]] = await s.search(features[1:2], [Query(top_k=1)], MODEL)
            assert (hit.product_id, m.category) == ("k01", "hats")
            assert abs(hit.score - 1.0) <= 1e-3
            index_names = set(await s.collection.index_information())
            assert {"model_id_1_category_1", "model_id_1_price_1"} <= index_names
        finally:
            await s.close()
    finally:
        server.close()


async def test_feature_chunks_hold_every_live_product_once(store: ProductStore) -> None:
    rng = np.random.default_rng(4)
    features = {f"c{i}": v / np.linalg.norm(v) for i in range(5) for v in [rng.standard_normal(DIM).astype(np.float32)]}
    for pid, f in features.items():
        assert await store.upsert(meta(pid, 1), f, MODEL)
    assert await store.delete("c4", 2)
    chunks = [chunk async for chunk in store.iter_product_chunks(MODEL, rows=2)]
    assert [len(metas) for metas, _ in chunks] == [2, 2]
    for metas, matrix in chunks:
        assert matrix.shape == (len(metas), DIM) and matrix.dtype == np.float32
        for m, row in zip(metas, matrix, strict=True):
            np.testing.assert_allclose(row, features[m.product_id], atol=1e-3)
    assert sorted(m.product_id for metas, _ in chunks for m in metas) == ["c0", "c1", "c2", "c3"]

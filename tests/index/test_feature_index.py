from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.index.feature_index import FeatureIndex, ProductMeta
from consumer.index.ranking import Hit, Query, SearchFilter

DIM = 16


def meta(pid: str, version: int = 1, category: str | None = None, price: float | None = None) -> ProductMeta:
    return ProductMeta(pid, version, f"name {pid}", f"desc {pid}", category, price)


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def one_hot(i: int, dim: int = DIM) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i] = 1.0
    return v


def brute_force_topk(
    products: np.ndarray,
    ids: list[str],
    queries: np.ndarray,
    params: list[Query],
    categories: list[str | None],
    prices: list[float | None],
) -> list[list[tuple[str, float]]]:
    scores = queries.astype(np.float64) @ products.astype(np.float64).T
    out = []
    for r, p in enumerate(params):
        keep = [
            j
            for j in range(len(ids))
            if (p.threshold is None or scores[r, j] >= p.threshold) and (p.filter is None or p.filter.matches(categories[j], prices[j]))
        ]
        keep.sort(key=lambda j: (-scores[r, j], ids[j]))
        out.append([(ids[j], float(scores[r, j])) for j in keep[: p.top_k]])
    return out


def hit_ids(results: list[list[tuple[Hit, ProductMeta]]]) -> list[list[str]]:
    return [[h.product_id for h, _ in row] for row in results]


def test_insert_search_and_metadata() -> None:
    index = FeatureIndex(DIM)
    for i in range(4):
        assert index.upsert(meta(f"p{i}", price=float(i)), one_hot(i) * (i + 2))
    assert len(index) == 4 and "p2" in index and "nope" not in index
    assert sorted(index.ids()) == ["p0", "p1", "p2", "p3"]
    assert index.get("p1") == meta("p1", price=1.0)
    assert index.version_of("p1") == 1 and index.version_of("nope") is None
    [[(hit, m)]] = index.search(one_hot(2)[None, :], [Query(top_k=1)])
    assert hit == Hit("p2", 1.0)
    assert m == meta("p2", price=2.0)


def test_replace_in_place_and_stale_versions_ignored() -> None:
    index = FeatureIndex(DIM, initial_capacity=4)
    assert index.upsert(meta("a", 2, category="x"), one_hot(0))
    capacity, nbytes = index.capacity, index.nbytes
    assert not index.upsert(meta("a", 2, category="stale"), one_hot(1))
    assert not index.upsert(meta("a", 1, category="stale"), one_hot(1))
    assert index.get("a") == meta("a", 2, category="x") and index.nbytes == nbytes
    assert index.upsert(meta("a", 3, category="y"), one_hot(1))
    assert len(index) == 1 and index.capacity == capacity
    assert index.get("a") == meta("a", 3, category="y")
    [[(hit, _)]] = index.search(one_hot(1)[None, :], [Query(top_k=5)])
    assert hit == Hit("a", 1.0)
    assert index.search(one_hot(0)[None, :], [Query(top_k=5, threshold=0.5)]) == [[]]


def test_product_text_round_trips_and_rewrites_stay_bounded() -> None:
    index = FeatureIndex(DIM, initial_capacity=4)
    texts = ["", "\u00e9\u6f22\U0001f600 \ud800", "x" * 5000, "plain"]
    for i, text in enumerate(texts):
        index.upsert(ProductMeta(f"p{i}", 1, text, text[::-1], "c", None), one_hot(i))
    for version in range(2, 800):
        index.upsert(ProductMeta("p2", version, "y" * 3000, f"v{version}", None, 1.5), one_hot(2))
        index.delete("p3")
        index.upsert(ProductMeta("p3", version, "", "", None, None), one_hot(3))
    assert [index.get(f"p{i}") for i in range(2)] == [ProductMeta(f"p{i}", 1, t, t[::-1], "c", None) for i, t in enumerate(texts[:2])]
    assert index.get("p2") == ProductMeta("p2", 799, "y" * 3000, "v799", None, 1.5)
    assert index.get("p3") == ProductMeta("p3", 799, "", "", None, None)
    live_text = sum(len(t.encode("utf-8", "surrogatepass")) * 2 for t in texts[:2]) + 3000 + len(b"v799")
    assert index.state().text.shape[0] <= 2 * live_text + (1 << 20), "superseded text is never reclaimed"


def test_delete_tombstone_blocks_older_upsert() -> None:
    index = FeatureIndex(DIM)
    index.upsert(meta("a", 5), one_hot(0))
    index.upsert(meta("b", 1), one_hot(1))
    assert not index.delete("a", version=4)
    assert "a" in index
    assert index.delete("a", version=6)
    assert "a" not in index and index.get("a") is None and len(index) == 1
    assert not index.delete("a", version=7)
    assert not index.upsert(meta("a", 6), one_hot(0))
    assert not index.upsert(meta("a", 7), one_hot(0))
    assert hit_ids(index.search(one_hot(0)[None, :], [Query(top_k=5)])) == [["b"]]
    assert index.upsert(meta("a", 8), one_hot(0))
    assert hit_ids(index.search(one_hot(0)[None, :], [Query(top_k=1)])) == [["a"]]


def test_unversioned_delete_uses_live_version_as_tombstone() -> None:
    index = FeatureIndex(DIM)
    index.upsert(meta("a", 3), one_hot(0))
    assert index.delete("a")
    assert not index.delete("a")
    assert not index.upsert(meta("a", 3), one_hot(0))
    assert index.upsert(meta("a", 4), one_hot(0))


def test_delete_before_upsert_arrives() -> None:
    index = FeatureIndex(DIM)
    assert not index.delete("ghost", version=5)
    assert not index.upsert(meta("ghost", 5), one_hot(0))
    assert index.upsert(meta("ghost", 6), one_hot(0))


def test_deleted_slot_is_reused_without_growth() -> None:
    index = FeatureIndex(DIM, initial_capacity=2)
    index.upsert(meta("a"), one_hot(0))
    index.upsert(meta("b"), one_hot(1))
    capacity = index.capacity
    index.delete("a")
    index.upsert(meta("c"), one_hot(2))
    assert index.capacity == capacity and len(index) == 2
    results = index.search(np.stack([one_hot(0), one_hot(2)]), [Query(top_k=1), Query(top_k=1)])
    assert hit_ids(results) == [["b"], ["c"]]
    assert results[0][0][0].score == 0.0


def test_capacity_growth_keeps_data() -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng, 300)
    index = FeatureIndex(DIM, initial_capacity=1, chunk_rows=7)
    for i, v in enumerate(vectors):
        index.upsert(meta(f"p{i:03d}", category=f"c{i % 3}", price=float(i)), v)
    assert index.capacity >= 300 and len(index) == 300
    results = index.search(vectors, [Query(top_k=1)] * 300)
    assert hit_ids(results) == [[f"p{i:03d}"] for i in range(300)]
    assert all(m == meta(f"p{i:03d}", category=f"c{i % 3}", price=float(i)) for i, [(_, m)] in enumerate(results))


def test_deleted_products_never_returned() -> None:
    rng = np.random.default_rng(1)
    index = FeatureIndex(DIM, chunk_rows=4)
    for i, v in enumerate(unit(rng, 20)):
        index.upsert(meta(f"p{i:02d}"), v)
    for i in range(0, 20, 2):
        index.delete(f"p{i:02d}")
    for i in range(4, 8):
        index.delete(f"p{i:02d}")
    [row] = hit_ids(index.search(unit(rng, 1), [Query(top_k=50)]))
    assert sorted(row) == sorted(f"p{i:02d}" for i in range(1, 20, 2) if not 4 <= i < 8)


def test_filters_and_threshold() -> None:
    index = FeatureIndex(DIM)
    index.upsert(meta("shoe-cheap", category="shoes", price=10.0), one_hot(0) + 0.1 * one_hot(1))
    index.upsert(meta("shoe-dear", category="shoes", price=200.0), one_hot(0))
    index.upsert(meta("shoe-unpriced", category="shoes"), one_hot(0) + 0.2 * one_hot(1))
    index.upsert(meta("hat", category="hats", price=20.0), one_hot(0) + 0.3 * one_hot(1))
    index.upsert(meta("misc"), one_hot(0) + one_hot(1))
    q = np.repeat(one_hot(0)[None, :], 6, axis=0)
    params = [
        Query(top_k=10),
        Query(top_k=10, filter=SearchFilter(category="shoes")),
        Query(top_k=10, filter=SearchFilter(category="shoes", max_price=100.0)),
        Query(top_k=10, filter=SearchFilter(min_price=15.0)),
        Query(top_k=10, filter=SearchFilter(category="unknown")),
        Query(top_k=10, threshold=0.97, filter=SearchFilter(category="shoes")),
    ]
    assert hit_ids(index.search(q, params)) == [
        ["shoe-dear", "shoe-cheap", "shoe-unpriced", "hat", "misc"],
        ["shoe-dear", "shoe-cheap", "shoe-unpriced"],
        ["shoe-cheap"],
        ["shoe-dear", "hat"],
        [],
        ["shoe-dear", "shoe-cheap", "shoe-unpriced"],
    ]
    index.delete("shoe-dear")
    assert hit_ids(index.search(q[:2], params[:2])) == [
        ["shoe-cheap", "shoe-unpriced", "hat", "misc"],
        ["shoe-cheap", "shoe-unpriced"],
    ]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_exact_ties_broken_by_id(dtype: str) -> None:
    index = FeatureIndex(DIM, dtype=dtype, chunk_rows=2)  # type: ignore[arg-type]
    for pid in ["d", "a", "c", "b", "e"]:
        index.upsert(meta(pid), one_hot(3) * 5)
    index.upsert(meta("other"), one_hot(4))
    assert hit_ids(index.search(one_hot(3)[None, :], [Query(top_k=3)])) == [["a", "b", "c"]]


def test_feature_is_normalised_and_input_not_mutated() -> None:
    index = FeatureIndex(DIM)
    feature = one_hot(0) * 3 + one_hot(1) * 4
    original = feature.copy()
    index.upsert(meta("a"), feature)
    np.testing.assert_array_equal(feature, original)
    [[(hit, _)]] = index.search(one_hot(1)[None, :], [Query(top_k=1)])
    assert hit.score == pytest.approx(0.8, abs=1e-6)


def test_invalid_inputs() -> None:
    index = FeatureIndex(DIM)
    with pytest.raises(ValueError):
        index.upsert(meta("a"), np.zeros(DIM, np.float32))
    with pytest.raises(ValueError):
        index.upsert(meta("a"), np.ones(DIM + 1, np.float32))
    with pytest.raises(ValueError):
        index.upsert(meta("a"), np.full(DIM, np.nan, np.float32))
    assert len(index) == 0
    with pytest.raises(ValueError):
        index.search(np.zeros((2, DIM), np.float32), [Query(top_k=1)])
    with pytest.raises(ValueError):
        FeatureIndex(DIM, dtype="bfloat16")  # type: ignore[arg-type]
    assert index.search(np.zeros((1, DIM), np.float32), [Query(top_k=3)]) == [[]]


def test_nbytes_reflects_storage_dtype() -> None:
    sizes = {d: FeatureIndex(512, dtype=d, initial_capacity=1000).nbytes for d in ("float32", "float16", "int8")}  # type: ignore[arg-type]
    per_slot_meta = 4 + 8 + 1 + 8 + 8 + 8 + 4 + 4
    assert sizes["float32"] == 1000 * (512 * 4 + per_slot_meta)
    assert sizes["float16"] == 1000 * (512 * 2 + per_slot_meta)
    assert sizes["int8"] == 1000 * (512 + 4 + per_slot_meta)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 400),
    q=st.integers(1, 6),
    chunk_rows=st.sampled_from([1, 7, 64, 8192]),
    n_deleted=st.integers(0, 50),
)
def test_float32_search_equals_brute_force(seed: int, n: int, q: int, chunk_rows: int, n_deleted: int) -> None:
    rng = np.random.default_rng(seed)
    dim = 32
    index = FeatureIndex(dim, initial_capacity=8, chunk_rows=chunk_rows)
    raw = rng.standard_normal((n, dim)).astype(np.float32) * rng.uniform(0.5, 3, (n, 1)).astype(np.float32)
    ids = [f"p{i:04d}" for i in rng.permutation(n)]
    categories = [[None, "a", "b"][i] for i in rng.integers(0, 3, n)]
    prices = [None if rng.random() < 0.2 else float(rng.integers(0, 100)) for _ in range(n)]
    for i in range(n):
        index.upsert(ProductMeta(ids[i], 1, "", "", categories[i], prices[i]), raw[i])
    deleted = set(rng.choice(n, size=min(n, n_deleted), replace=False).tolist()) if n else set()
    for i in deleted:
        index.delete(ids[i])
    live = [i for i in range(n) if i not in deleted]
    stored = raw / np.linalg.norm(raw, axis=1, keepdims=True).astype(np.float32)
    queries = unit(rng, q, dim)
    params = [
        Query(
            top_k=int(rng.integers(1, 30)),
            threshold=None if rng.random() < 0.6 else float(rng.uniform(-0.2, 0.3)),
            filter=None
            if rng.random() < 0.5
            else SearchFilter(
                category=[None, "a", "b"][int(rng.integers(3))],
                min_price=None if rng.random() < 0.5 else 20.0,
                max_price=None if rng.random() < 0.5 else 80.0,
            ),
        )
        for _ in range(q)
    ]
    expected = brute_force_topk(
        stored[live],
        [ids[i] for i in live],
        queries,
        params,
        [categories[i] for i in live],
        [prices[i] for i in live],
    )
    got = index.search(queries, params)
    assert hit_ids(got) == [[pid for pid, _ in row] for row in expected]
    for got_row, exp_row in zip(got, expected, strict=True):
        for (hit, m), (pid, score) in zip(got_row, exp_row, strict=True):
            assert abs(hit.score - score) <= 1e-5
            assert m.product_id == pid


def clustered(rng: np.random.Generator, n: int, dim: int, n_clusters: int, spread: float) -> np.ndarray:
    centres = unit(rng, n_clusters, dim)
    x = centres[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered_corpus() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    products = clustered(rng, 20_000, 512, n_clusters=64, spread=0.6)
    queries = clustered(rng, 64, 512, n_clusters=64, spread=0.6)
    return products, queries


def top_10(dtype: str, products: np.ndarray, queries: np.ndarray) -> list[list[str]]:
    """Product ids of the top 10 per query from an index of ``dtype`` (filled with ``upsert_many``, in chunks)."""
    index = FeatureIndex(512, dtype=dtype, initial_capacity=len(products))  # type: ignore[arg-type]
    for start in range(0, len(products), 5000):
        chunk = products[start : start + 5000]
        index.upsert_many([ProductMeta(f"p{start + i:05d}", 1, "", "", None, None) for i in range(len(chunk))], chunk)
    return hit_ids(index.search(queries, [Query(top_k=10)] * len(queries)))


@pytest.fixture(scope="module")
def exact_top_10(clustered_corpus: tuple[np.ndarray, np.ndarray]) -> list[list[str]]:
    return top_10("float32", *clustered_corpus)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_quantised_recall_at_10(dtype: str, clustered_corpus: tuple[np.ndarray, np.ndarray], exact_top_10: list[list[str]]) -> None:
    approx = top_10(dtype, *clustered_corpus)
    recall = float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact_top_10, strict=True)]))
    print(f"recall@10 {dtype}: {recall:.4f}")
    assert recall >= 0.95


def test_int8_kernel_is_exact_against_an_integer_reference():
    from consumer.index.int8_kernel import QUERY_LEVELS, Int8Scorer, quantise_rows, to_offset_uint8

    rng = np.random.default_rng(11)
    values = rng.integers(-127, 128, (300, 64)).astype(np.int8)
    queries = rng.normal(size=(5, 64)).astype(np.float32)
    got = Int8Scorer(threads=1).scores(to_offset_uint8(values), queries)
    q_values, q_scales = quantise_rows(queries, QUERY_LEVELS)
    expected = (q_values.astype(np.int64) @ values.T.astype(np.int64)) * q_scales[:, None]
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(["float32", "float16", "int8"]),
    n_ops=st.integers(1, 120),
    batch=st.integers(1, 40),
)
def test_upsert_many_equals_upserting_row_by_row(seed: int, dtype: str, n_ops: int, batch: int) -> None:
    """Duplicates, stale versions, zero vectors and deletes between batches: same state either way."""
    rng = np.random.default_rng(seed)
    dim = 8
    one_by_one = FeatureIndex(dim, dtype, initial_capacity=2)
    bulk = FeatureIndex(dim, dtype, initial_capacity=2)
    ids = [f"p{i}" for i in range(12)]
    pending: list[tuple[ProductMeta, np.ndarray]] = []
    rejected: list[str] = []

    def flush() -> None:
        if pending:
            report = bulk.upsert_many([m for m, _ in pending], np.stack([f for _, f in pending]))
            rejected.extend(report.invalid)
            pending.clear()

    for _ in range(n_ops):
        pid = ids[int(rng.integers(len(ids)))]
        version = int(rng.integers(0, 6))
        if rng.random() < 0.15:
            flush()
            assert one_by_one.delete(pid, version) == bulk.delete(pid, version)
            continue
        feature = np.zeros(dim, np.float32) if rng.random() < 0.1 else rng.standard_normal(dim).astype(np.float32)
        m = ProductMeta(pid, version, f"n{version}", "", str(rng.integers(3)), float(rng.integers(9)))
        try:
            one_by_one.upsert(m, feature)
        except ValueError:
            rejected.append(f"expected:{pid}")
        pending.append((m, feature))
        if len(pending) >= batch:
            flush()
    flush()

    assert sorted(r for r in rejected if not r.startswith("expected:")) == sorted(r[9:] for r in rejected if r.startswith("expected:"))
    assert sorted(one_by_one.ids()) == sorted(bulk.ids())
    assert [one_by_one.get(i) for i in sorted(one_by_one.ids())] == [bulk.get(i) for i in sorted(bulk.ids())]
    queries = unit(rng, 3, dim)
    params = [Query(top_k=len(ids)), Query(top_k=5, filter=SearchFilter(category="1")), Query(top_k=4, filter=SearchFilter(max_price=4.0))]
    expected = [[(h.product_id, h.score) for h, _ in row] for row in one_by_one.search(queries, params)]
    assert [[(h.product_id, h.score) for h, _ in row] for row in bulk.search(queries, params)] == expected


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_large_upsert_many_stores_exactly_what_single_upserts_store(dtype: str) -> None:
    rng = np.random.default_rng(5)
    raw = rng.standard_normal((700, DIM)).astype(np.float32) * rng.uniform(0.1, 10, (700, 1)).astype(np.float32)
    metas = [meta(f"p{i}") for i in range(700)]
    bulk, single = FeatureIndex(DIM, dtype), FeatureIndex(DIM, dtype)  # type: ignore[arg-type]
    bulk.upsert_many(metas, raw)
    for m, row in zip(metas, raw, strict=True):
        single.upsert(m, row)
    a, b = bulk.state(), single.state()
    assert np.array_equal(a.matrix, b.matrix)
    assert (a.scales is None and b.scales is None) or np.array_equal(a.scales, b.scales)


def test_upsert_many_rejects_a_wrong_shape_without_changing_anything() -> None:
    index = FeatureIndex(DIM)
    with pytest.raises(ValueError, match="shape"):
        index.upsert_many([meta("a"), meta("b")], np.ones((2, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="shape"):
        index.upsert_many([meta("a")], np.ones((2, DIM), np.float32))
    assert len(index) == 0

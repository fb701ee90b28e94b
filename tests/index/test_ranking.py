from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.index.ranking import Hit, Query, RunningTopK, SearchFilter, filter_mask


def reference_topk(scores: np.ndarray, ids: list[str], mask: np.ndarray | None, queries: list[Query]) -> list[list[Hit]]:
    out = []
    for r, q in enumerate(queries):
        entries = [
            (float(scores[r, j]), ids[j])
            for j in range(len(ids))
            if (mask is None or mask[r, j])
            and not math.isnan(scores[r, j])
            and scores[r, j] != -math.inf
            and (q.threshold is None or scores[r, j] >= q.threshold)
        ]
        entries.sort(key=lambda e: (-e[0], e[1]))
        out.append([Hit(pid, s) for s, pid in entries[: q.top_k]])
    return out


def push_in_chunks(queries: list[Query], scores: np.ndarray, ids: list[str], mask: np.ndarray | None, bounds: list[int]) -> list[list[Hit]]:
    topk = RunningTopK(queries)
    edges = [0, *bounds, scores.shape[1]]
    for a, b in itertools.pairwise(edges):
        topk.push(scores[:, a:b], ids[a:b], None if mask is None else mask[:, a:b])
    return topk.results()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    q=st.integers(1, 5),
    n=st.integers(0, 300),
    levels=st.sampled_from([0, 3, 50]),
    use_mask=st.booleans(),
    n_cuts=st.integers(0, 6),
)
def test_chunked_topk_matches_reference(seed: int, q: int, n: int, levels: int, use_mask: bool, n_cuts: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((q, n)).astype(np.float32)
    if levels:
        scores = np.round(scores * levels / 4).astype(np.float32)
    ids = [f"p{i:04d}" for i in rng.permutation(n)]
    mask = rng.random((q, n)) < 0.6 if use_mask else None
    queries = [
        Query(
            top_k=int(rng.integers(1, 25)),
            threshold=None if rng.random() < 0.5 else float(rng.standard_normal()),
        )
        for _ in range(q)
    ]
    bounds = sorted(rng.integers(0, n + 1, size=n_cuts).tolist())
    expected = reference_topk(scores, ids, mask, queries)
    assert push_in_chunks(queries, scores, ids, mask, bounds) == expected
    assert push_in_chunks(queries, scores, ids, mask, []) == expected


def test_ties_broken_by_id_across_chunks() -> None:
    topk = RunningTopK([Query(top_k=3)])
    topk.push(np.array([[0.5, 0.5, 0.9]], np.float32), ["d", "b", "z"], None)
    topk.push(np.array([[0.5, 0.5]], np.float32), ["c", "a"], None)
    assert topk.results() == [[Hit("z", 0.8999999761581421), Hit("a", 0.5), Hit("b", 0.5)]]


def test_threshold_is_inclusive_and_nan_or_neg_inf_never_returned() -> None:
    scores = np.array([[0.25, 0.2, np.nan, -np.inf, 0.3]], np.float32)
    topk = RunningTopK([Query(top_k=10, threshold=0.25)])
    topk.push(scores, ["a", "b", "c", "d", "e"], None)
    assert [h.product_id for h in topk.results()[0]] == ["e", "a"]
    unbounded = RunningTopK([Query(top_k=10)])
    unbounded.push(scores, ["a", "b", "c", "d", "e"], None)
    assert [h.product_id for h in unbounded.results()[0]] == ["e", "a", "b"]


def test_broadcast_mask_and_empty_push() -> None:
    topk = RunningTopK([Query(top_k=2), Query(top_k=1)])
    topk.push(np.zeros((2, 0), np.float32), [], None)
    topk.push(np.array([[1, 2, 3], [3, 2, 1]], np.float32), ["a", "b", "c"], np.array([[True, True, False]]))
    assert topk.results() == [[Hit("b", 2.0), Hit("a", 1.0)], [Hit("a", 3.0)]]


def test_push_validates_shapes() -> None:
    topk = RunningTopK([Query(top_k=1)])
    with pytest.raises(ValueError):
        topk.push(np.zeros((2, 3), np.float32), ["a", "b", "c"], None)
    with pytest.raises(ValueError):
        topk.push(np.zeros((1, 3), np.float32), ["a", "b"], None)


def test_query_requires_positive_top_k() -> None:
    with pytest.raises(ValueError):
        Query(top_k=0)


@pytest.mark.parametrize(
    ("flt", "category", "price", "expected"),
    [
        (SearchFilter(), None, None, True),
        (SearchFilter(category="shoes"), "shoes", None, True),
        (SearchFilter(category="shoes"), "hats", 1.0, False),
        (SearchFilter(category="shoes"), None, 1.0, False),
        (SearchFilter(min_price=10), None, None, False),
        (SearchFilter(max_price=10), "x", math.nan, False),
        (SearchFilter(min_price=10, max_price=20), None, 10.0, True),
        (SearchFilter(min_price=10, max_price=20), None, 20.0, True),
        (SearchFilter(min_price=10, max_price=20), None, 20.01, False),
        (SearchFilter(category="a", max_price=5), "a", 4.99, True),
    ],
)
def test_search_filter_matches(flt: SearchFilter, category: str | None, price: float | None, expected: bool) -> None:
    assert flt.matches(category, price) is expected


def test_filter_mask_none_when_no_query_filters() -> None:
    cats = np.array(["a", None], dtype=object)
    prices = np.array([1.0, np.nan])
    assert filter_mask([None, SearchFilter()], cats, prices) is None


@settings(max_examples=100, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 60))
def test_filter_mask_agrees_with_matches(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    vocab = ["a", "b", "c"]
    categories = [None if rng.random() < 0.2 else vocab[rng.integers(3)] for _ in range(n)]
    prices = [None if rng.random() < 0.2 else round(float(rng.uniform(0, 100)), 2) for _ in range(n)]
    price_arr = np.array([np.nan if p is None else p for p in prices], dtype=np.float64)

    def bound() -> float | None:
        return None if rng.random() < 0.4 else round(float(rng.uniform(0, 100)), 2)

    filters = [
        None
        if rng.random() < 0.2
        else SearchFilter(
            category=None if rng.random() < 0.4 else ["a", "b", "zz"][rng.integers(3)],
            min_price=bound(),
            max_price=bound(),
        )
        for _ in range(6)
    ]
    filters.append(filters[-1])
    filters.append(SearchFilter(category="a"))
    expected = np.array(
        [[f is None or f.matches(c, p) for c, p in zip(categories, prices, strict=True)] for f in filters],
        dtype=bool,
    ).reshape(len(filters), n)

    obj = filter_mask(filters, np.array(categories, dtype=object), price_arr)
    codes = {"a": 0, "b": 1, "c": 2}
    coded_cats = np.array([-1 if c is None else codes[c] for c in categories], dtype=np.int32)
    coded = filter_mask(filters, coded_cats, price_arr, codes)
    assert obj is not None and coded is not None
    np.testing.assert_array_equal(obj, expected)
    np.testing.assert_array_equal(coded, expected)


def test_filter_mask_int_codes_need_vocabulary() -> None:
    with pytest.raises(ValueError):
        filter_mask([SearchFilter(category="a")], np.array([0], np.int32), np.array([1.0]))

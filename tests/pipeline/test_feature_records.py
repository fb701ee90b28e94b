"""Features-topic records parsed in bulk: the same events and the same index as parsing them one by one."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from consumer.index.feature_index import FeatureIndex
from consumer.index.ranking import Query
from consumer.pipeline.features import apply_feature_events, parse_feature_records
from schemas import ProductFeature

DIM = 8
MODEL = "m#onnx-int8"


def record(i: int, rng: np.random.Generator, **kw: object) -> bytes:
    from consumer.domain.codecs import encode_feature

    dim, b64 = encode_feature(rng.normal(size=DIM).astype(np.float32))
    fields = {"product_id": f"p{i % 37}", "version": i, "model_id": MODEL, "name": f"n{i}", "dim": dim, "feature_b64": b64} | kw
    return ProductFeature(**fields).model_dump_json().encode()  # type: ignore[arg-type]


def one_by_one(values: list[bytes | None]) -> tuple[list[ProductFeature], list[int]]:
    """The per-record parse the follower did before bulk parsing."""
    events, invalid = [], []
    for i, value in enumerate(values):
        try:
            events.append(ProductFeature.model_validate_json(value or b""))
        except ValidationError:
            invalid.append(i)
    return events, invalid


def topic(rng: np.random.Generator, n: int) -> list[bytes | None]:
    values: list[bytes | None] = []
    for i in range(n):
        kind = rng.integers(0, 10)
        if kind == 0:
            values.append(record(i, rng, deleted=True, dim=None, feature_b64=None))
        elif kind == 1:
            values.append(record(i, rng, model_id="another-model"))
        else:
            values.append(record(i, rng))
    return values


def index_of(events: list[ProductFeature]) -> FeatureIndex:
    index = FeatureIndex(DIM, dtype="int8")
    for start in range(0, len(events), 50):
        apply_feature_events(index, events[start : start + 50], MODEL)
    return index


def test_a_valid_batch_gives_the_same_events_and_index_as_one_by_one():
    values = topic(np.random.default_rng(1), 400)
    bulk, invalid = parse_feature_records(values)
    single, _ = one_by_one(values)
    assert invalid == [] and bulk == single
    reserved = FeatureIndex(DIM, dtype="int8")
    reserved.reserve(len(values))
    for start in range(0, len(bulk), 50):
        apply_feature_events(reserved, bulk[start : start + 50], MODEL)
    a, b = reserved, index_of(single)
    assert sorted(a.ids()) == sorted(b.ids()) and len(a) > 20
    assert {pid: a.get(pid) for pid in a.ids()} == {pid: b.get(pid) for pid in b.ids()}
    queries = np.random.default_rng(3).normal(size=(4, DIM)).astype(np.float32)
    params = [Query(top_k=len(a), threshold=-1.0)] * 4
    hits = lambda index: [[(h.product_id, round(h.score, 5)) for h, _ in row] for row in index.search(queries, params)]  # noqa: E731
    assert hits(a) == hits(b)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        b"",
        b"not json",
        b"[1, 2]",
        b'{"product_id": "x"}',
        b'{"product_id": "x", "version": 1, "model_id": "m"}, {"product_id": "y", "version": 1, "model_id": "m"}',
        b'{"product_id": "x", "version": 1, "model_id": "m"',
    ],
)
def test_an_invalid_value_is_reported_at_its_position_and_the_rest_still_parse(bad):
    rng = np.random.default_rng(2)
    values = topic(rng, 30)
    values[7] = bad
    if bad is not None and bad.endswith(b'"m"'):
        values[8] = b'"x": 1}'
    events, invalid = parse_feature_records(values)
    assert (events, invalid) == one_by_one(values)
    assert 7 in invalid


def test_a_batch_of_nothing_is_nothing():
    assert parse_feature_records([]) == ([], [])

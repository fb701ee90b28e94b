"""Index snapshot files: exact round trip, atomic replacement, and refusal of unusable files."""

from __future__ import annotations

import numpy as np
import pytest

from consumer.index import snapshot as index_snapshot
from consumer.index.feature_index import FeatureIndex, ProductMeta
from consumer.index.ranking import Query, SearchFilter
from consumer.index.snapshot import SnapshotError, SnapshotFile

DIM = 16


def filled(dtype: str, n: int = 300, seed: int = 0) -> FeatureIndex:
    rng = np.random.default_rng(seed)
    index = FeatureIndex(DIM, dtype, initial_capacity=4)
    metas = [
        ProductMeta(f"p{i}", i % 5 + 1, f"name {i} \u00e9\u6f22", f"desc {i}", [None, "a", "b"][i % 3], None if i % 7 == 0 else float(i))
        for i in range(n)
    ]
    index.upsert_many(metas, rng.standard_normal((n, DIM)).astype(np.float32))
    for i in range(0, n, 9):
        index.delete(f"p{i}", 50)
    index.delete("never-seen", 7)
    return index


def results(index: FeatureIndex, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    params = [Query(top_k=50), Query(top_k=10, filter=SearchFilter(category="a")), Query(top_k=10, filter=SearchFilter(max_price=100.0))]
    return [[(h.product_id, h.score, m) for h, m in row] for row in index.search(queries, params)]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_round_trip_restores_the_same_index(tmp_path, dtype: str) -> None:
    original = filled(dtype)
    file = SnapshotFile(tmp_path, "features", "model-a", dtype, DIM)
    assert file.load() is None
    file.save(original, {0: 1234, 2: 5})

    snapshot = file.load()
    assert snapshot is not None and snapshot.offsets == {0: 1234, 2: 5}
    loaded = [snapshot.state.matrix, snapshot.state.text] + ([] if snapshot.state.scales is None else [snapshot.state.scales])
    assert all(a.flags.owndata for a in loaded), "a loaded array is a view: restore would copy it"
    restored = FeatureIndex(DIM, dtype)
    restored.restore(snapshot.state)
    assert sorted(restored.ids()) == sorted(original.ids())
    assert all(restored.get(i) == original.get(i) for i in original.ids())
    assert results(restored) == results(original)
    assert not restored.upsert(ProductMeta("p0", 50, "", "", None, None), np.ones(DIM)), "tombstone lost"
    assert not restored.upsert(ProductMeta("never-seen", 7, "", "", None, None), np.ones(DIM)), "tombstone of an absent id lost"
    capacity = restored.capacity
    assert restored.upsert(ProductMeta("new", 1, "", "", "c", 1.0), np.ones(DIM))
    assert restored.capacity == capacity, "a freed slot was not reused"


def test_files_are_per_topic_model_and_layout(tmp_path) -> None:
    index = filled("int8", n=20)
    SnapshotFile(tmp_path, "features", "model-a", "int8", DIM).save(index, {0: 20})
    assert SnapshotFile(tmp_path, "features", "model-b", "int8", DIM).load() is None
    assert SnapshotFile(tmp_path, "other-topic", "model-a", "int8", DIM).load() is None
    assert SnapshotFile(tmp_path, "features", "model-a", "float16", DIM).load() is None
    with pytest.raises(ValueError):
        SnapshotFile(tmp_path, "features", "model-a", "float16", DIM).save(index, {0: 20})


def test_a_file_made_for_another_model_is_refused(tmp_path) -> None:
    a = SnapshotFile(tmp_path, "features", "model-a", "int8", DIM)
    b = SnapshotFile(tmp_path, "features", "model-b", "int8", DIM)
    a.save(filled("int8", n=20), {0: 20})
    a.path.rename(b.path)
    with pytest.raises(SnapshotError, match="model-a"):
        b.load()


def test_a_file_of_another_format_version_is_refused_in_place(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(index_snapshot, "FORMAT_VERSION", index_snapshot.FORMAT_VERSION - 1)
    old = SnapshotFile(tmp_path, "features", "m", "int8", DIM)
    old.save(filled("int8", n=20), {0: 20})
    monkeypatch.undo()
    current = SnapshotFile(tmp_path, "features", "m", "int8", DIM)
    assert current.path == old.path, "a new format must replace the old file, not sit beside it"
    with pytest.raises(SnapshotError, match="format"):
        current.load()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_damaged_files_are_refused(tmp_path, damage: str) -> None:
    file = SnapshotFile(tmp_path, "features", "m", "int8", DIM)
    file.save(filled("int8"), {0: 1})
    data = bytearray(file.path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a snapshot at all" * 10)
    else:
        data[len(data) // 3] ^= 0xFF
    file.path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        file.load()


def test_a_failed_write_leaves_the_previous_snapshot(tmp_path, monkeypatch) -> None:
    file = SnapshotFile(tmp_path, "features", "m", "int8", DIM)
    file.save(filled("int8", n=10), {0: 10})
    written = []
    real_write = index_snapshot._write_npy

    def disk_full(member, array):
        if written:
            raise OSError(28, "No space left on device")
        written.append(array)
        real_write(member, array)

    monkeypatch.setattr(index_snapshot, "_write_npy", disk_full)
    with pytest.raises(OSError):
        file.save(filled("int8", n=200), {0: 200})
    monkeypatch.undo()
    snapshot = file.load()
    assert snapshot is not None and snapshot.offsets == {0: 10} and len(snapshot.state.ids) == len(filled("int8", n=10))
    assert [p.name for p in tmp_path.iterdir()] == [file.path.name], "a temporary file was left behind"


def test_restore_rejects_inconsistent_states(tmp_path) -> None:
    file = SnapshotFile(tmp_path, "features", "m", "float32", DIM)
    file.save(filled("float32", n=30), {0: 30})
    state = file.load().state
    index = FeatureIndex(DIM, "float32")
    for broken in (
        {"live_slots": state.live_slots + state.matrix.shape[0]},
        {"ids": state.ids[:-1]},
        {"ids": [state.ids[0]] * len(state.ids)},
        {"prices": state.prices[:-1]},
        {"category_names": []},
        {"dim": DIM + 1},
        {"text": state.text[:-1]},
        {"name_bytes": state.name_bytes - 100},
        {"versions": state.versions[:-1]},
        {"text": state.text.astype(np.int16)},
    ):
        with pytest.raises(ValueError):
            index.restore(state.__class__(**(vars(state) | broken)))
    assert len(index) == 0

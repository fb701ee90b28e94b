"""Memory of the feature index at catalog scale: build, snapshot write, snapshot restore, catch-up.

Builds a ``FeatureIndex`` of ``--products`` products (``benchmarks.catalog`` fields, every string a
fresh object as a features-topic record's parse makes it) in runs of 2,000 rows like the follower,
then writes its snapshot and restores it in a fresh process. Reports RSS / anonymous memory (MB)
before and after each step, and the peak RSS during the snapshot write (VmHWM, reset just before).
``catch_up`` (another fresh process) replays a search replica's catch-up without the broker: features
records as JSON bytes, parsed and applied in polls of 4,096 (``parse_feature_records``,
``apply_feature_events``); its peak anonymous memory above the process before the index (sampled every
2 ms), at the end, and after ``malloc_trim`` (what the follower then returns to the OS).

``--checkout DIR`` imports ``consumer`` from another checkout (e.g. ``git worktree add /tmp/base HEAD``),
so a baseline and the working tree are measured by the same script:

    python -m benchmarks.index_memory --checkout /tmp/base --out /tmp/base.json
    python -m benchmarks.index_memory
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 2**20
REPORT = Path(__file__).parent / "reports" / "index-memory.json"


def _memory() -> dict[str, float]:
    from consumer.ops import memory

    gc.collect()
    memory.release_memory()
    proc = memory.proc_memory()
    return {"rss": round((proc.rss or 0) / MB, 1), "anon": round((proc.anon or 0) / MB, 1)}


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak_mb() -> float:
    from consumer.ops import memory

    return round((memory.peak_rss_bytes() or 0) / MB, 1)


def _build(products: int, dtype: str, dim: int) -> object:
    from benchmarks.catalog import features, fields
    from consumer.index.feature_index import FeatureIndex, ProductMeta

    index = FeatureIndex(dim, dtype)  # type: ignore[arg-type]
    index.reserve(products)
    run = 2000
    for start in range(0, products, run):
        stop = min(products, start + run)
        parsed = json.loads(json.dumps([fields(i) for i in range(start, stop)]))
        metas = [ProductMeta(**f) for f in parsed]
        index.upsert_many(metas, features(stop - start, dim=dim, seed=start))
    return index


def _queries(index: object, dim: int) -> list[list[list[str]]]:
    from consumer.index.ranking import Query

    rng = np.random.default_rng(7)
    queries = rng.standard_normal((8, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rows = index.search(queries, [Query(top_k=10)] * 8)  # type: ignore[attr-defined]
    return [[[hit.product_id, meta.name] for hit, meta in row] for row in rows]


def measure(products: int, dtype: str, dim: int, directory: str, checkout: str | None) -> dict[str, object]:
    from consumer.index.snapshot import SnapshotFile

    report: dict[str, object] = {"products": products, "dtype": dtype, "dim": dim}
    before = _memory()
    started = time.perf_counter()
    index = _build(products, dtype, dim)
    report["build_s"] = round(time.perf_counter() - started, 2)
    built = _memory()
    report["empty"], report["built"] = before, built
    report["index_anon_mb"] = round(built["anon"] - before["anon"], 1)
    report["index_arrays_mb"] = round(index.nbytes / MB, 1)  # type: ignore[attr-defined]
    top = _queries(index, dim)
    report["searched"] = searched = _memory()

    file = SnapshotFile(directory, "features", "model", dtype, dim)
    _reset_peak()
    started = time.perf_counter()
    size = file.save(index, {0: products})  # type: ignore[arg-type]
    report["save_s"] = round(time.perf_counter() - started, 2)
    report["save_peak_rss_mb"] = _peak_mb()
    report["save_extra_rss_mb"] = round(_peak_mb() - searched["rss"], 1)
    report["snapshot_mb"] = round(size / MB, 1)
    del index
    gc.collect()

    command = [sys.executable, __file__, "--restore", directory, "--dtype", dtype, "--dim", str(dim)]
    child = subprocess.run([*command, *(["--checkout", checkout] if checkout else [])], check=True, capture_output=True, text=True)
    restored = json.loads(child.stdout.strip().splitlines()[-1])
    catch_up = [sys.executable, __file__, "--catch-up", "--products", str(products), "--dtype", dtype, "--dim", str(dim)]
    child = subprocess.run([*catch_up, *(["--checkout", checkout] if checkout else [])], check=True, capture_output=True, text=True)
    report["catch_up"] = json.loads(child.stdout.strip().splitlines()[-1])
    if (restored_top := restored.pop("top")) != top:
        raise SystemExit(f"the restored index ranks differently from the one saved: {top[0]} vs {restored_top[0]}")
    report["restore"] = restored
    return report


def restore(directory: str, dtype: str, dim: int) -> dict[str, object]:
    from consumer.index.feature_index import FeatureIndex
    from consumer.index.snapshot import SnapshotFile

    before = _memory()
    _reset_peak()
    started = time.perf_counter()
    snapshot = SnapshotFile(directory, "features", "model", dtype, dim).load()
    assert snapshot is not None
    index = FeatureIndex(dim, dtype)  # type: ignore[arg-type]
    index.restore(snapshot.state)
    del snapshot
    seconds = round(time.perf_counter() - started, 2)
    peak = _peak_mb()
    after = _memory()
    return {
        "empty": before,
        "restored": after,
        "index_anon_mb": round(after["anon"] - before["anon"], 1),
        "peak_rss_mb": peak,
        "load_s": seconds,
        "top": _queries(index, dim),
    }


def catch_up(products: int, dtype: str, dim: int, poll: int = 4096) -> dict[str, object]:
    import threading

    from benchmarks.catalog import features, fields
    from consumer.domain.codecs import encode_feature
    from consumer.index.feature_index import FeatureIndex
    from consumer.ops import memory
    from consumer.pipeline.features import apply_feature_events, parse_feature_records
    from schemas import ProductFeature

    values = []
    for start in range(0, products, 10_000):
        block = features(min(10_000, products - start), dim=dim, seed=start)
        for i, row in enumerate(block, start=start):
            size, feature_b64 = encode_feature(row)
            values.append(ProductFeature(model_id="m", dim=size, feature_b64=feature_b64, **fields(i)).model_dump_json().encode())
    base = _memory()["anon"]
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], (memory.anon_bytes() or 0) / MB)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    index = FeatureIndex(dim, dtype)  # type: ignore[arg-type]
    index.reserve(products)
    for start in range(0, products, poll):
        events, _ = parse_feature_records(values[start : start + poll])
        apply_feature_events(index, events, "m")
    seconds = round(time.perf_counter() - started, 2)
    end = (memory.anon_bytes() or 0) / MB
    done.set()
    sampler.join()
    trimmed = _memory()["anon"]
    return {
        "poll_records": poll,
        "seconds": seconds,
        "peak_anon_above_empty_mb": round(max(peak[0], end) - base, 1),
        "end_anon_above_empty_mb": round(end - base, 1),
        "trimmed_anon_above_empty_mb": round(trimmed - base, 1),
        "products": len(index),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--dtype", default="int8", choices=["float32", "float16", "int8"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--checkout", help="import consumer from this checkout instead")
    parser.add_argument("--out", type=Path, default=REPORT)
    parser.add_argument("--restore", help=argparse.SUPPRESS)
    parser.add_argument("--catch-up", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if args.checkout:
        sys.path.insert(0, args.checkout)
    if args.restore:
        print(json.dumps(restore(args.restore, args.dtype, args.dim)))
        return
    if args.catch_up:
        print(json.dumps(catch_up(args.products, args.dtype, args.dim)))
        return
    with tempfile.TemporaryDirectory() as directory:
        report = measure(args.products, args.dtype, args.dim, directory, args.checkout)
    import consumer

    report["consumer"] = str(Path(consumer.__file__).parent.parent)
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

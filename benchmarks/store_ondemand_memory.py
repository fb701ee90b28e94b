"""Peak RSS and latency of ProductStore's on-demand search vs an in-memory FeatureIndex.

Starts a SecantusDB (file storage in a temp dir), inserts N products of 512-d
float16 features straight into a collection (insert_many, the ProductStore
document layout), then runs the searches in a fresh child process so its peak
RSS (ru_maxrss) covers only imports, the client and the search. A FeatureIndex
float32 child at the largest N gives the in-memory comparison. Prints and writes
benchmarks/reports/store_ondemand_memory.json.

    python benchmarks/store_ondemand_memory.py [--sizes 10000 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 512
QUERIES = 32
TOP_K = 10
MODEL = "bench-model"
CATEGORIES = ["shoes", "hats", "bags", "coats"]
REPORT = REPO / "benchmarks" / "reports" / "store_ondemand_memory.json"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def queries_and_params(filtered: bool):
    from consumer.index.ranking import Query, SearchFilter

    queries = unit_rows(np.random.default_rng(123), QUERIES)
    f = SearchFilter(category="hats") if filtered else None
    return queries, [Query(top_k=TOP_K, filter=f) for _ in range(QUERIES)]


async def populate(uri: str, database: str, collection: str, n: int, batch: int = 1000) -> float:
    from bson import Binary
    from pymongo import AsyncMongoClient

    from consumer.store.product_store import FEATURE_DTYPE, ProductStore

    client: AsyncMongoClient = AsyncMongoClient(uri)
    store = ProductStore(client, database, collection)
    await store.collection.drop()
    await store.ensure_indexes()
    rng = np.random.default_rng(n)
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        rows = unit_rows(rng, min(batch, n - start)).astype(FEATURE_DTYPE)
        docs = [
            {
                "_id": f"p{start + i:07d}",
                "version": 1,
                "deleted": False,
                "name": f"Product {start + i} with a plausible name",
                "description": "A description of a typical length for a catalogue entry, " * 3,
                "category": CATEGORIES[(start + i) % len(CATEGORIES)],
                "price": float((start + i) % 997) / 10,
                "model_id": MODEL,
                "dim": DIM,
                "feature": Binary(row.tobytes()),
                "updated_at": now,
            }
            for i, row in enumerate(rows)
        ]
        await store.collection.insert_many(docs, ordered=False)
    seconds = time.perf_counter() - t0
    assert await store.count(MODEL) == n
    await store.close()
    return seconds


async def child_store(uri: str, database: str, collection: str, repeats: int) -> dict:
    from pymongo import AsyncMongoClient

    from consumer.store.product_store import ProductStore

    client: AsyncMongoClient = AsyncMongoClient(uri)
    store = ProductStore(client, database, collection)
    await client.admin.command("ping")
    out: dict = {"rss_before_search_mib": round(rss_mib(), 1)}
    for name, filtered in (("all", False), ("category_filter", True)):
        queries, params = queries_and_params(filtered)
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = await store.search(queries, params, MODEL)
            seconds.append(time.perf_counter() - t0)
            assert all(len(r) == TOP_K for r in results)
        out[f"latency_{name}_ms"] = summary(seconds)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    await store.close()
    return out


def child_index(n: int, repeats: int) -> dict:
    from consumer.index.feature_index import FeatureIndex, ProductMeta

    rng = np.random.default_rng(n)
    index = FeatureIndex(DIM, "float32", initial_capacity=n)
    rss_before = rss_mib()
    for start in range(0, n, 1000):
        rows = unit_rows(rng, min(1000, n - start))
        for i, row in enumerate(rows):
            pid = start + i
            index.upsert(ProductMeta(f"p{pid:07d}", 1, f"Product {pid}", "", CATEGORIES[pid % 4], pid % 997 / 10), row)
    out: dict = {"rss_after_fill_mib": round(rss_mib(), 1), "index_fill_rss_mib": round(rss_mib() - rss_before, 1)}
    for name, filtered in (("all", False), ("category_filter", True)):
        queries, params = queries_and_params(filtered)
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            index.search(queries, params)
            seconds.append(time.perf_counter() - t0)
        out[f"latency_{name}_ms"] = summary(seconds)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    out["index_nbytes_mib"] = round(index.nbytes / 2**20, 1)
    return out


def summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"min": round(ms[0], 1), "median": round(ms[len(ms) // 2], 1), "max": round(ms[-1], 1)}


def run_child(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, *rest = args.child
        if kind == "store":
            uri, database, collection = rest
            result = asyncio.run(child_store(uri, database, collection, args.repeats))
        else:
            result = child_index(int(rest[0]), args.repeats)
        print(json.dumps(result))
        return

    import psutil

    from devservices import MongoServer

    report: dict = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "dim": DIM,
        "queries_per_search": QUERIES,
        "top_k": TOP_K,
        "chunk_rows": 4096,
        "feature_storage": "float16 BSON binary",
        "server": "SecantusDB (secantusd-py, WiredTiger, --cache-size 256M), same machine",
        "note": "peak_rss_mib is the searching process's ru_maxrss (includes Python, numpy and pymongo); "
        "server_rss_mib is the database server's RSS after the searches",
        "store": {},
    }
    with (
        tempfile.TemporaryDirectory(prefix="store-bench-") as tmp,
        MongoServer(storage_path=Path(tmp) / "data") as server,
    ):
        for n in args.sizes:
            collection = f"products_{n}"
            insert_s = asyncio.run(populate(server.uri, "bench", collection, n))
            result = run_child("store", server.uri, "bench", collection, "--repeats", str(args.repeats))
            result["insert_seconds"] = round(insert_s, 1)
            result["server_rss_mib"] = round(psutil.Process(server.pid).memory_info().rss / 2**20, 1)
            report["store"][str(n)] = result
            print(f"store n={n}: {json.dumps(result)}", flush=True)
    biggest = max(args.sizes)
    report["feature_index_float32"] = {str(biggest): run_child("index", str(biggest), "--repeats", str(args.repeats))}
    print(f"feature_index float32 n={biggest}: {json.dumps(report['feature_index_float32'][str(biggest)])}")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {REPORT.relative_to(REPO)}")


if __name__ == "__main__":
    main()

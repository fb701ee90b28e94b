"""Speed and memory of the service against a seed-style baseline, on real processes.

    ./run.sh bench            full run: 100,000 products (well inside 15 minutes)
    ./run.sh bench --quick    10,000 products, short phases (about a minute or two)

Builds the ViT-B/32-shaped random CLIP once (cached in .cache/), exports it to ONNX int8,
starts a Tansu broker and a SecantusDB store, writes the catalog's features straight to the
store and the compacted features topic, then runs each configuration as its own
``python -m consumer`` process while a separate load-generator process drives it (closed loop
for throughput, open loop at a fixed rate for latency) and a sampler reads the process's
VmRSS/RssAnon from /proc every 50 ms. ``ROLE=search`` starts twice: as a new replica that reads
the whole features topic (and writes an index snapshot at shutdown), then as a restart from that
snapshot. The seed-style baseline (benchmarks/seed_baseline.py)
runs through the same broker in the same run. Prints a table and writes a JSON report
(benchmarks/reports/benchmark[-quick].json).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.catalog import features, fields
from consumer.app import onnx_dir_for
from consumer.config.settings import Settings
from consumer.index.feature_index import ProductMeta
from consumer.tools.model_builder import build_random_clip
from devservices import MongoServer, TansuBroker, create_topics, free_port

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
REPORTS = REPO / "benchmarks" / "reports"
TOPICS = {
    "PRODUCT_UPDATES_TOPIC": "bench-product-updated",
    "DEAD_LETTER_TOPIC": "bench-dead-letters",
    "FEATURES_TOPIC": "bench-product-features",
}
SCENARIOS = ("search", "all", "seed")


def scenario_topics(scenario: str) -> dict[str, str]:
    """Each scenario gets its own request and reply topics, so none starts behind another's backlog."""
    return TOPICS | {"SEARCH_REQUESTS_TOPIC": f"bench-search-requests-{scenario}", "REPLY_TOPIC": f"bench-search-results-{scenario}"}


class RssSampler:
    """Samples VmRSS and RssAnon (MiB) of one pid every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self._marks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> tuple[float, float] | None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        values = {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                values[key] = int(rest.split()[0]) / 1024
        return values.get("VmRSS", 0.0), values.get("RssAnon", 0.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            reading = self._read()
            if reading:
                self.samples.append((time.monotonic(), *reading))

    def mark(self, name: str) -> None:
        self._marks[name] = len(self.samples)

    def peak(self, since: str | None = None, until: str | None = None) -> dict:
        rows = self.samples[self._marks.get(since, 0) if since else 0 : self._marks.get(until) if until else None]
        if not rows:
            return {"rss_mb": None, "anon_mb": None}
        return {"rss_mb": round(max(r[1] for r in rows), 1), "anon_mb": round(max(r[2] for r in rows), 1)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def loadgen(bootstrap: str, scenario: str, mode: str, **kw) -> dict:
    topics = scenario_topics(scenario)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.loadgen",
        "--bootstrap",
        bootstrap,
        "--topic",
        topics["SEARCH_REQUESTS_TOPIC"],
        "--reply-topic",
        topics["REPLY_TOPIC"],
        "--mode",
        mode,
    ]
    for key, value in kw.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> float:
    """Seconds until ``url`` answers 200 (polling every 20 ms); raises if the process dies first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # nosec B310 - loopback URL built here
                if resp.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def metric(port: int, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # nosec B310 - loopback
        for line in resp.read().decode().splitlines():
            if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


class ServiceProcess:
    """``python -m consumer`` with the benchmark's environment, its RSS sampled from the start."""

    def __init__(self, env: dict[str, str], log_path: Path, module: str = "consumer") -> None:
        self.port = int(env.get("METRICS_PORT", "0"))
        self.log = open(log_path, "w")  # noqa: SIM115 - the service writes to it until stop() closes it
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module], env=os.environ | env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.rss = RssSampler(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.rss.stop()
        self.log.close()


async def write_catalog(n: int, model_id: str, bootstrap: str, mongo_uri: str | None) -> dict:
    """Features straight to the compacted features topic and (optionally) the store; seconds taken."""
    from aiokafka import AIOKafkaProducer
    from pymongo import AsyncMongoClient

    from consumer.domain.codecs import encode_feature
    from consumer.store.product_store import ProductStore
    from schemas import ProductFeature

    feats = features(n)
    timings = {}
    start = time.monotonic()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        pending = []
        for i in range(n):
            f = fields(i)
            dim, feature_b64 = encode_feature(feats[i])
            event = ProductFeature(model_id=model_id, dim=dim, feature_b64=feature_b64, **f)
            pending.append(await producer.send(TOPICS["FEATURES_TOPIC"], event.model_dump_json().encode(), key=f["product_id"].encode()))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    timings["features_topic_s"] = round(time.monotonic() - start, 1)
    if mongo_uri:
        start = time.monotonic()
        store = ProductStore(AsyncMongoClient(mongo_uri), "bench", journal=False)
        await store.ensure_indexes()
        for chunk in range(0, n, 2000):
            items = [(ProductMeta(**fields(i)), feats[i]) for i in range(chunk, min(n, chunk + 2000))]
            await store.upsert_many(items, model_id)
        await store.close()
        timings["store_s"] = round(time.monotonic() - start, 1)
    return timings


def image_updates(count: int, start_id: int) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(5)
    out = []
    for i in range(count):
        pixels = (rng.random((224, 224, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
        f = fields(start_id + i)
        out.append(f | {"image_b64": base64.b64encode(buf.getvalue()).decode()})
    return out


def fidelity(model_dir: str, onnx_dir: Path, n_products: int) -> dict:
    """Child process (torch): ORT int8 vs torch fp32 text embeddings and recall@10; int8 feature storage recall@10."""
    code = f"""
import json, numpy as np, sys
sys.path.insert(0, {str(REPO)!r})
from benchmarks.onnx_levers import products, queries
from consumer.encoder.encoder import Encoder
from consumer.encoder.torch_backend import TorchBackend
from consumer.encoder.onnx_backend import OnnxBackend
from consumer.index.feature_index import FeatureIndex, ProductMeta
from consumer.index.ranking import Query
from benchmarks.catalog import features
torch_enc = Encoder(TorchBackend({model_dir!r}, 2), "fp32")
ort_enc = Encoder(OnnxBackend({str(onnx_dir)!r}, 2), "int8")
qs, ps = queries(), products({n_products})
def enc(e, texts):
    return np.vstack([e.encode_text(texts[i:i+32]) for i in range(0, len(texts), 32)])
qt, qo, pt = enc(torch_enc, qs), enc(ort_enc, qs), enc(torch_enc, ps)
cos = float(np.mean(np.sum(qt * qo, axis=1)))
top = lambda q: np.argsort(-(q @ pt.T), axis=1)[:, :10]
a, b = top(qt), top(qo)
recall = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]))
feats = features(20000)
rng = np.random.default_rng(3)
qv = feats[rng.integers(0, 20000, 64)] + 0.05 * rng.normal(size=(64, 512)).astype(np.float32)
qv /= np.linalg.norm(qv, axis=1, keepdims=True)
res = {{}}
for dtype in ("float32", "int8", "float16"):
    idx = FeatureIndex(512, dtype=dtype)
    for i in range(20000):
        idx.upsert(ProductMeta(str(i), 1, "", "", None, None), feats[i])
    res[dtype] = [[h.product_id for h, _ in hits] for hits in idx.search(qv, [Query(top_k=10, threshold=-1.0)] * 64)]
feat_recall = {{d: float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(res["float32"], res[d])])) for d in ("int8", "float16")}}
print(json.dumps({{"query_mean_cosine_int8_vs_fp32": cos, "query_recall_at_10_int8_vs_fp32": recall, "feature_recall_at_10": feat_recall}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def service_env(bootstrap: str, model_dir: str, scenario: str, **extra: str) -> dict[str, str]:
    group = f"bench-{scenario}"
    return (
        scenario_topics(scenario)
        | {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "CLIP_MODEL": model_dir,
            "MODEL_CACHE_DIR": str(CACHE),
            "CONSUMER_GROUP_ID": group,
            "KAFKA_SESSION_TIMEOUT_MS": "1500",
            "KAFKA_HEARTBEAT_INTERVAL_MS": "250",
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": str(free_port()),
            "TORCH_NUM_THREADS": "2",
            "MALLOC_ARENA_MAX": "2",
            "LOG_LEVEL": "WARNING",
        }
        | extra
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--products", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    n = args.products or (10_000 if args.quick else 100_000)
    phase = 8.0 if args.quick else 30.0
    images = 40 if args.quick else 200
    out = args.out or REPORTS / ("benchmark-quick.json" if args.quick else "benchmark.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / "logs"
    logs.mkdir(exist_ok=True)
    report: dict = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "products": n,
        "phase_s": phase,
        "image_updates": images,
    }

    t = time.monotonic()
    model_dir = str(build_random_clip(CACHE / "models" / "vit-b-32", size="vit-b-32"))
    settings = Settings(clip_model=model_dir, model_cache_dir=str(CACHE), _env_file=None)
    from consumer.tools.onnx_export import export_in_subprocess

    onnx_dir = export_in_subprocess(model_dir, onnx_dir_for(settings), quantize="int8")
    model_id = model_dir + "#onnx-int8"
    report["prepare_model_s"] = round(time.monotonic() - t, 1)
    print(f"model ready ({report['prepare_model_s']} s); catalog of {n} products ...", flush=True)

    with (
        tempfile.TemporaryDirectory(prefix="bench-store-") as store_dir,
        tempfile.TemporaryDirectory(prefix="bench-snapshots-") as snapshot_dir,
        TansuBroker() as broker,
        MongoServer(storage_path=store_dir) as mongo,
    ):
        bootstrap = broker.bootstrap
        asyncio.run(create_topics(bootstrap, [scenario_topics(s)["SEARCH_REQUESTS_TOPIC"] for s in SCENARIOS], partitions=4))
        asyncio.run(create_topics(bootstrap, [scenario_topics(s)["REPLY_TOPIC"] for s in SCENARIOS]))
        asyncio.run(create_topics(bootstrap, [TOPICS[k] for k in ("PRODUCT_UPDATES_TOPIC", "DEAD_LETTER_TOPIC")]))
        asyncio.run(create_topics(bootstrap, [TOPICS["FEATURES_TOPIC"]], compacted={TOPICS["FEATURES_TOPIC"]}))
        report["catalog_write"] = asyncio.run(write_catalog(n, model_id, bootstrap, mongo.uri))
        print(f"catalog written: {report['catalog_write']}", flush=True)

        # 1. ROLE=search: text tower only, int8 features followed from the compacted topic. The first
        #    start reads the whole topic and writes an index snapshot at shutdown; the restart loads it.
        search_env = service_env(
            bootstrap,
            model_dir,
            "search",
            ROLE="search",
            FEATURE_DTYPE="int8",
            MAX_BATCH_SIZE="32",
            MAX_BATCH_WAIT_MS="5",
            INDEX_SNAPSHOT_DIR=snapshot_dir,
        )
        svc = ServiceProcess(search_env, logs / "search.log")
        try:
            cold_ready = wait_http(f"http://127.0.0.1:{svc.port}/readyz", 300, svc.proc)
            indexed = metric(svc.port, "clip_search_index_products")
            svc.rss.mark("ready")
            first = loadgen(bootstrap, "search", "single")
            svc.rss.mark("closed")
            closed = loadgen(bootstrap, "search", "closed", concurrency=64, duration=phase)
            svc.rss.mark("open")
            opened = loadgen(bootstrap, "search", "open", rate=20, duration=phase)
            svc.rss.mark("stopping")
        finally:
            svc.stop()
        restart = ServiceProcess(search_env | {"METRICS_PORT": str(free_port())}, logs / "search-restart.log")
        try:
            ready = wait_http(f"http://127.0.0.1:{restart.port}/readyz", 300, restart.proc)
            restart_indexed = metric(restart.port, "clip_search_index_products")
            restart_first = loadgen(bootstrap, "search", "single")
        finally:
            restart.stop()
        report["search"] = {
            "start_to_consuming_s": round(ready, 2),
            "cold_start_to_consuming_s": round(cold_ready, 2),
            "indexed_products": indexed,
            "indexed_after_restart": restart_indexed,
            "first_search_ms": first["p50_ms"],
            "first_search_after_restart_ms": restart_first["p50_ms"],
            "closed_loop": closed,
            "open_loop_20rps": opened,
            "peak": svc.rss.peak(),
            "peak_under_load": svc.rss.peak(since="closed", until="stopping"),
            "peak_restart": restart.rss.peak(),
        }
        print(f"search role: {json.dumps(report['search'])}", flush=True)

        # 2. ROLE=all: store-filled int8 cache, searches at 20/s during a burst of image updates.
        svc = ServiceProcess(
            service_env(
                bootstrap,
                model_dir,
                "all",
                ROLE="all",
                FEATURE_DTYPE="int8",
                MAX_BATCH_SIZE="32",
                MAX_BATCH_WAIT_MS="5",
                MONGODB_URI=mongo.uri,
                MONGODB_DATABASE="bench",
            ),
            logs / "all.log",
        )
        try:
            ready = wait_http(f"http://127.0.0.1:{svc.port}/readyz", 300, svc.proc)
            svc.rss.mark("ready")
            updates = image_updates(images, n)
            done = threading.Event()
            result: dict = {}

            def burst() -> None:
                from producer_examples.client import publish

                started = time.monotonic()
                asyncio.run(publish(bootstrap, TOPICS["PRODUCT_UPDATES_TOPIC"], updates, key_field="product_id"))
                while metric(svc.port, "clip_search_product_updates_total", '{outcome="applied"}') < images:
                    time.sleep(0.05)
                result["burst_s"] = time.monotonic() - started
                done.set()

            thread = threading.Thread(target=burst)
            thread.start()
            opened_all = loadgen(bootstrap, "all", "open", rate=20, duration=phase)
            thread.join(600)
        finally:
            svc.stop()
        report["all"] = {
            "start_to_consuming_s": round(ready, 2),
            "open_loop_20rps_during_burst": opened_all,
            "image_updates_per_s": round(images / result["burst_s"], 1) if done.is_set() else None,
            "peak": svc.rss.peak(),
        }
        print(f"all role: {json.dumps(report['all'])}", flush=True)

        # 3. Seed-style baseline through the same broker.
        svc = ServiceProcess(
            service_env(bootstrap, model_dir, "seed", BENCH_PRODUCTS=str(n)), logs / "seed.log", module="benchmarks.seed_baseline"
        )
        try:
            t0 = time.monotonic()
            while "consuming" not in (logs / "seed.log").read_text():
                if svc.proc.poll() is not None or time.monotonic() - t0 > 300:
                    raise RuntimeError("seed baseline did not start")
                time.sleep(0.05)
            seed_ready = time.monotonic() - svc.started
            seed_first = loadgen(bootstrap, "seed", "single")
            svc.rss.mark("closed")
            seed_closed = loadgen(bootstrap, "seed", "closed", concurrency=8, duration=phase)
            seed_open = loadgen(bootstrap, "seed", "open", rate=20, duration=phase)
        finally:
            svc.stop()
        report["seed_baseline"] = {
            "start_to_consuming_s": round(seed_ready, 2),
            "first_search_ms": seed_first["p50_ms"],
            "closed_loop": seed_closed,
            "open_loop_20rps": seed_open,
            "peak": svc.rss.peak(),
        }
        print(f"seed baseline: {json.dumps(report['seed_baseline'])}", flush=True)

    report["fidelity"] = fidelity(model_dir, Path(onnx_dir), 2000 if args.quick else 5000)
    report["table"] = table(report)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report["table"])
    print(f"\nreport: {out}")
    return 0


def table(r: dict) -> list[dict]:
    s, a, b, f = r["search"], r["all"], r["seed_baseline"], r["fidelity"]
    thr, bthr = s["closed_loop"]["throughput_per_s"], b["closed_loop"]["throughput_per_s"]
    rows = [
        ("peak RSS, ROLE=search, cached, under load (MB)", s["peak"]["rss_mb"], "<= 350", b["peak"]["rss_mb"], lambda v: v <= 350),
        ("peak RSS, ROLE=all, searches + image burst (MB)", a["peak"]["rss_mb"], "<= 512", b["peak"]["rss_mb"], lambda v: v <= 512),
        ("sustained searches/s, MAX_BATCH_SIZE=32", thr, ">= 150 and >= 10x seed", bthr, lambda v: v >= 150 and v >= 10 * bthr),
        ("latency p50 at 20 req/s (ms)", s["open_loop_20rps"]["p50_ms"], "<= 50", b["open_loop_20rps"]["p50_ms"], lambda v: v <= 50),
        ("latency p99 at 20 req/s (ms)", s["open_loop_20rps"]["p99_ms"], "<= 200", b["open_loop_20rps"]["p99_ms"], lambda v: v <= 200),
        ("process start -> consuming, from a snapshot (s)", s["start_to_consuming_s"], "<= 2", b["start_to_consuming_s"], lambda v: v <= 2),
        (
            "  same, first replica, no snapshot anywhere (s)",
            s["cold_start_to_consuming_s"],
            "<= 2",
            b["start_to_consuming_s"],
            lambda v: v <= 2,
        ),
        (
            "first search incl. model load (ms)",
            max(s["first_search_ms"], s["first_search_after_restart_ms"]),
            "<= 3000",
            b["first_search_ms"],
            lambda v: v <= 3000,
        ),
        ("product updates with a 224 px image (/s)", a["image_updates_per_s"], ">= 10", None, lambda v: v is not None and v >= 10),
        ("query embedding mean cosine, int8 vs fp32", round(f["query_mean_cosine_int8_vs_fp32"], 4), ">= 0.99", None, lambda v: v >= 0.99),
        ("recall@10, int8 queries vs fp32", round(f["query_recall_at_10_int8_vs_fp32"], 3), ">= 0.95", None, lambda v: v >= 0.95),
        ("recall@10, int8 feature matrix vs fp32", round(f["feature_recall_at_10"]["int8"], 3), ">= 0.95", None, lambda v: v >= 0.95),
    ]
    out = []
    for name, value, target, baseline, ok in rows:
        ratio = None
        if value and baseline:
            ratio = round(value / baseline, 2)
        out.append(
            {
                "figure": name,
                "measured": value,
                "target": target,
                "seed_baseline": baseline,
                "ratio": ratio,
                "met": bool(value is not None and ok(value)),
            }
        )
    return out


def print_table(rows: list[dict]) -> None:
    print(f"\n{'figure':<52} {'measured':>10} {'target':>24} {'seed':>10} {'ratio':>7}  met")

    def fmt(v: object) -> str:
        return "-" if v is None else str(v)

    for row in rows:
        print(
            f"{row['figure']:<52} {fmt(row['measured']):>10} {row['target']:>24} {fmt(row['seed_baseline']):>10} {fmt(row['ratio']):>7}  {'yes' if row['met'] else 'NO'}"
        )


if __name__ == "__main__":
    raise SystemExit(main())

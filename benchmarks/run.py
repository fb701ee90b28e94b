"""Speed and memory of the service against a seed-style baseline, on real processes.

    ./run.sh bench                    full run: 100,000 products, then every model family on 10,000
    ./run.sh bench --quick            10,000 products, short phases, no families (--families adds them on 2,000)
    ./run.sh bench --skip-families    the full run without the families; --families-only: only them
    ./run.sh bench --replot [--quick] tables and plots again from the existing JSON report, nothing run

Builds the ViT-B/32-shaped random CLIP once (cached in .cache/), exports it to ONNX int8,
starts a Tansu broker and a SecantusDB store, writes the catalog's features straight to the
store and the compacted features topic, then runs each configuration as its own
``python -m consumer`` process while a separate load-generator process drives it (closed loop
for throughput, open loop at a fixed rate for latency) and a sampler reads the process's
VmRSS/RssAnon from /proc every 50 ms. ``ROLE=search`` starts three times: as a new replica that reads
the whole features topic (and writes an index snapshot at shutdown), as a restart from that
snapshot, and as a first replica from the snapshot a ``ROLE=ingest`` replica wrote.
``ROLE=ingest`` runs alone with a burst of image updates (images/s from the burst's
first publish to its last update applied, after one update that loads the vision tower, timed
on its own); ``ROLE=all`` answers 20 searches/s during a burst of the same size. The seed-style
baseline (benchmarks/seed_baseline.py) runs through the same broker in the same run. Per family
(``model_builder.FAMILIES``): the export's process-tree peak (into an empty cache), the towers' ms
per query and per image (all families timed in turns in one process), and ROLE=search, ingest
and all on a smaller catalog.
Prints the tables and writes a JSON report (benchmarks/reports/benchmark[-quick].json) with
PNG plots next to it (benchmarks/plots.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.catalog import features, fields, publish_features
from benchmarks.plots import write_plots
from benchmarks.report import OPENAI, family_figures, family_table, format_family_table, format_table, table
from benchmarks.sampling import RssSampler, TreePeak
from consumer.app import onnx_dir_for
from consumer.config.settings import Settings
from consumer.index.feature_index import ProductMeta
from consumer.tools.model_builder import build_random_clip
from devservices import MongoServer, TansuBroker, create_topics, free_port

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
REPORTS = REPO / "benchmarks" / "reports"
SCENARIOS = ("search", "ingest", "all", "seed")
FAMILY_SCENARIOS = ("search", "ingest", "all")


def scenario_topics(scenario: str, prefix: str = "bench") -> dict[str, str]:
    """Each scenario gets its own request, reply and product-update topics, so none starts behind another's backlog;
    the features topic is shared by every scenario of one ``prefix`` (one model)."""
    return {
        "PRODUCT_UPDATES_TOPIC": f"{prefix}-product-updated-{scenario}",
        "DEAD_LETTER_TOPIC": f"{prefix}-dead-letters",
        "FEATURES_TOPIC": f"{prefix}-product-features",
        "SEARCH_REQUESTS_TOPIC": f"{prefix}-search-requests-{scenario}",
        "REPLY_TOPIC": f"{prefix}-search-results-{scenario}",
    }


async def create_bench_topics(bootstrap: str, prefix: str, scenarios: tuple[str, ...]) -> None:
    topics = [scenario_topics(s, prefix) for s in scenarios]
    await create_topics(bootstrap, [t["SEARCH_REQUESTS_TOPIC"] for t in topics], partitions=4)
    await create_topics(bootstrap, [t[k] for t in topics for k in ("REPLY_TOPIC", "PRODUCT_UPDATES_TOPIC")])
    await create_topics(bootstrap, [topics[0]["DEAD_LETTER_TOPIC"]])
    await create_topics(bootstrap, [topics[0]["FEATURES_TOPIC"]], compacted={topics[0]["FEATURES_TOPIC"]})


def loadgen(bootstrap: str, scenario: str, mode: str, prefix: str = "bench", **kw: object) -> dict:
    topics = scenario_topics(scenario, prefix)
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


def stage_totals(port: int) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of ``clip_search_stage_seconds`` per stage, as the service's /metrics has them now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # nosec B310 - loopback
        return parse_stage_totals(resp.read().decode())


def parse_stage_totals(exposition: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) per stage of ``clip_search_stage_seconds`` in a Prometheus text exposition."""
    totals: dict[str, list[float]] = {}
    for line in exposition.splitlines():
        for suffix, slot in (("_sum", 0), ("_count", 1)):
            head = f'clip_search_stage_seconds{suffix}{{stage="'
            if line.startswith(head):
                stage = line[len(head) :].split('"', 1)[0]
                totals.setdefault(stage, [0.0, 0.0])[slot] = float(line.rsplit(" ", 1)[1])
    return {stage: (t[0], t[1]) for stage, t in totals.items()}


def stage_means_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean ms per search of each stage between two ``stage_totals`` readings (stages with no new observation left out)."""
    out = {}
    for stage, (total, count) in after.items():
        total0, count0 = before.get(stage, (0.0, 0.0))
        if count > count0:
            out[stage] = round((total - total0) / (count - count0) * 1000, 2)
    return out


class ServiceProcess:
    """``python -m consumer`` with the benchmark's environment, its RSS sampled from the start."""

    def __init__(self, env: dict[str, str], log_path: Path, module: str = "consumer", cwd: Path = REPO) -> None:
        self.port = int(env.get("METRICS_PORT", "0"))
        self.log = open(log_path, "w")  # noqa: SIM115 - the service writes to it until stop() closes it
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module], env=os.environ | env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT
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


async def write_catalog(n: int, model_id: str, bootstrap: str, mongo_uri: str | None, prefix: str = "bench", dim: int = 512) -> dict:
    """Features straight to ``prefix``'s compacted features topic and (optionally) the store database ``prefix``; seconds taken."""
    from pymongo import AsyncMongoClient

    from consumer.store.product_store import ProductStore

    topic = scenario_topics("search", prefix)["FEATURES_TOPIC"]
    timings = {}
    start = time.monotonic()
    await publish_features(bootstrap, topic, model_id, n, dim)
    feats = features(n, dim=dim)
    timings["features_topic_s"] = round(time.monotonic() - start, 1)
    if mongo_uri:
        start = time.monotonic()
        store = ProductStore(AsyncMongoClient(mongo_uri), prefix, journal=False)
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


def process_env(bootstrap: str, model_dir: str, log_level: str = "WARNING") -> dict[str, str]:
    """What every benchmarked ``python -m consumer`` gets: the broker, the model, quick group timeouts, a fresh
    metrics port, 2 encoder threads and 2 malloc arenas."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CLIP_MODEL": model_dir,
        "MODEL_CACHE_DIR": str(CACHE),
        "KAFKA_SESSION_TIMEOUT_MS": "1500",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "250",
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(free_port()),
        "TORCH_NUM_THREADS": "2",
        "MALLOC_ARENA_MAX": "2",
        "LOG_LEVEL": log_level,
    }


def service_env(bootstrap: str, model_dir: str, scenario: str, prefix: str = "bench", **extra: str) -> dict[str, str]:
    return (
        scenario_topics(scenario, prefix)
        | process_env(bootstrap, model_dir)
        | {
            "CONSUMER_GROUP_ID": f"{prefix}-{scenario}",
            "FEATURE_DTYPE": "int8",
            "MAX_BATCH_SIZE": "32",
            "MAX_BATCH_WAIT_MS": "5",
        }
        | extra
    )


@dataclass
class Run:
    """What every scenario needs: the broker, the store, the model and the phase lengths of this run."""

    bootstrap: str
    mongo_uri: str
    model_dir: str
    logs: Path
    phase: float
    images: int
    products: int
    prefix: str = "bench"
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, scenario: str, **extra: str) -> dict[str, str]:
        return service_env(self.bootstrap, self.model_dir, scenario, self.prefix, **(self.extra_env | extra))

    def log(self, name: str) -> Path:
        return self.logs / f"{self.prefix}-{name}.log"


def await_applied(port: int, count: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll the service's metrics until ``count`` product updates are applied; raise if it dies or stalls."""
    deadline = time.monotonic() + timeout
    while metric(port, "clip_search_product_updates_total", '{outcome="applied"}') < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{count} product updates were not applied (service exit code {proc.returncode})")
        time.sleep(0.05)


def image_burst(run: Run, svc: ServiceProcess, scenario: str, start_id: int, result: dict) -> None:
    """One image update, then a burst of ``run.images``: ``first_update_s`` is the seconds until the first is applied
    (it loads the vision tower), ``burst_s`` from the burst's first publish until all of it is applied."""
    from producer_examples.client import publish

    topic = scenario_topics(scenario, run.prefix)["PRODUCT_UPDATES_TOPIC"]
    first, *burst = image_updates(run.images + 1, start_id)
    started = time.monotonic()
    asyncio.run(publish(run.bootstrap, topic, [first], key_field="product_id"))
    await_applied(svc.port, 1, svc.proc)
    result["first_update_s"] = time.monotonic() - started
    started = time.monotonic()
    asyncio.run(publish(run.bootstrap, topic, burst, key_field="product_id"))
    await_applied(svc.port, 1 + run.images, svc.proc)
    result["burst_s"] = time.monotonic() - started


def burst_figures(run: Run, result: dict) -> dict:
    """The burst's figures for the report: images/s is warm (the vision tower was loaded by the first update)."""
    if "burst_s" not in result:
        return {"first_update_s": None, "burst_s": None, "image_updates_per_s": None}
    return {
        "first_update_s": round(result["first_update_s"], 2),
        "burst_s": round(result["burst_s"], 2),
        "image_updates_per_s": round(run.images / result["burst_s"], 1),
    }


def search_scenario(
    run: Run, snapshot_dir: str | None, *, restart: bool, from_ingest_snapshot: bool = False
) -> tuple[dict, dict[str, dict]]:
    """ROLE=search: text tower only, int8 features followed from the compacted topic. The first start reads the whole
    topic (and writes an index snapshot at shutdown); with ``restart`` a second start loads that snapshot; with
    ``from_ingest_snapshot``, ``search_from_ingest_snapshot`` too."""
    env = run.env("search", ROLE="search", **({"INDEX_SNAPSHOT_DIR": snapshot_dir} if snapshot_dir else {}))
    svc = ServiceProcess(env, run.log("search"))
    try:
        cold_ready = wait_http(f"http://127.0.0.1:{svc.port}/readyz", 300, svc.proc)
        indexed = metric(svc.port, "clip_search_index_products")
        svc.rss.mark("ready")
        first = loadgen(run.bootstrap, "search", "single", run.prefix)
        svc.rss.mark("closed")
        closed = loadgen(run.bootstrap, "search", "closed", run.prefix, concurrency=64, duration=run.phase)
        svc.rss.mark("open")
        stages_before = stage_totals(svc.port)
        opened = loadgen(run.bootstrap, "search", "open", run.prefix, rate=20, duration=run.phase)
        opened["stage_mean_ms"] = stage_means_ms(stages_before, stage_totals(svc.port))
        svc.rss.mark("stopping")
    finally:
        svc.stop()
    out = {
        "cold_start_to_consuming_s": round(cold_ready, 2),
        "indexed_products": indexed,
        "first_search_ms": first["p50_ms"],
        "closed_loop": closed,
        "open_loop_20rps": opened,
        "peak": svc.rss.peak(),
        "peak_under_load": svc.rss.peak(since="closed", until="stopping"),
    }
    timelines = {"search": svc.rss.timeline()}
    if restart:
        again = ServiceProcess(env | {"METRICS_PORT": str(free_port())}, run.log("search-restart"))
        try:
            ready = wait_http(f"http://127.0.0.1:{again.port}/readyz", 300, again.proc)
            again.rss.mark("ready")
            out["indexed_after_restart"] = metric(again.port, "clip_search_index_products")
            out["first_search_after_restart_ms"] = loadgen(run.bootstrap, "search", "single", run.prefix)["p50_ms"]
            again.rss.mark("stopping")
        finally:
            again.stop()
        out["start_to_consuming_s"] = round(ready, 2)
        out["peak_restart"] = again.rss.peak()
        timelines["search restart (snapshot)"] = again.rss.timeline()
    if from_ingest_snapshot:
        out |= search_from_ingest_snapshot(run)
    return out, timelines


def search_from_ingest_snapshot(run: Run) -> dict:
    """A deployment's first search replica when only the ingest role has run: ROLE=ingest with a fresh
    INDEX_SNAPSHOT_DIR follows the features topic until its snapshots-written counter moves (it writes one on
    catching up), is stopped, and ROLE=search starts from that directory (start -> /readyz, first search)."""
    with tempfile.TemporaryDirectory(prefix="bench-ingest-snapshots-") as snapshot_dir:
        env = run.env("ingest", ROLE="ingest", MONGODB_URI=run.mongo_uri, MONGODB_DATABASE=run.prefix, INDEX_SNAPSHOT_DIR=snapshot_dir)
        ingest = ServiceProcess(env, run.log("ingest-snapshot"))
        try:
            wait_http(f"http://127.0.0.1:{ingest.port}/readyz", 300, ingest.proc)
            deadline = time.monotonic() + 300
            while metric(ingest.port, "clip_search_index_snapshot_writes_total", '{outcome="written"}') < 1:
                if ingest.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ROLE=ingest wrote no index snapshot (exit code {ingest.proc.returncode})")
                time.sleep(0.05)
            written_s = time.monotonic() - ingest.started
            index_mb = metric(ingest.port, "clip_search_index_bytes") / 2**20
            rss_mb = metric(ingest.port, "clip_search_memory_rss_bytes") / 2**20
            anon_mb = metric(ingest.port, "clip_search_memory_anon_bytes") / 2**20
        finally:
            ingest.stop()
        search = ServiceProcess(run.env("search", ROLE="search", INDEX_SNAPSHOT_DIR=snapshot_dir), run.log("search-ingest-snapshot"))
        try:
            ready = wait_http(f"http://127.0.0.1:{search.port}/readyz", 300, search.proc)
            indexed = metric(search.port, "clip_search_index_products")
            records_read = metric(search.port, "clip_search_feature_records_total")
            first = loadgen(run.bootstrap, "search", "single", run.prefix)
        finally:
            search.stop()
    return {
        "start_from_ingest_snapshot_s": round(ready, 2),
        "first_search_from_ingest_snapshot_ms": first["p50_ms"],
        "from_ingest_snapshot": {
            "ingest_start_to_snapshot_s": round(written_s, 2),
            "ingest_index_mb": round(index_mb, 1),
            "ingest_rss_mb_after_snapshot": round(rss_mb, 1),
            "ingest_anon_mb_after_snapshot": round(anon_mb, 1),
            "ingest_peak": ingest.rss.peak(),
            "indexed_products": indexed,
            "features_records_read": records_read,
        },
    }


def ingest_scenario(run: Run, start_id: int) -> tuple[dict, dict[str, dict]]:
    """ROLE=ingest alone: a burst of ``run.images`` image updates after one that loads the vision tower (``image_burst``)."""
    svc = ServiceProcess(run.env("ingest", ROLE="ingest", MONGODB_URI=run.mongo_uri, MONGODB_DATABASE=run.prefix), run.log("ingest"))
    result: dict = {}
    try:
        ready = wait_http(f"http://127.0.0.1:{svc.port}/readyz", 300, svc.proc)
        svc.rss.mark("ready, burst")
        image_burst(run, svc, "ingest", start_id, result)
        svc.rss.mark("stopping")
    finally:
        svc.stop()
    out = {
        "start_to_consuming_s": round(ready, 2),
        **burst_figures(run, result),
        "peak": svc.rss.peak(),
    }
    return out, {"ingest": svc.rss.timeline()}


def all_scenario(run: Run, start_id: int) -> tuple[dict, dict[str, dict]]:
    """ROLE=all: store-filled int8 cache, searches at 20/s during a burst of image updates."""
    svc = ServiceProcess(run.env("all", ROLE="all", MONGODB_URI=run.mongo_uri, MONGODB_DATABASE=run.prefix), run.log("all"))
    result: dict = {}
    try:
        ready = wait_http(f"http://127.0.0.1:{svc.port}/readyz", 300, svc.proc)
        thread = threading.Thread(target=image_burst, args=(run, svc, "all", start_id, result))
        svc.rss.mark("ready, burst + 20 req/s")
        thread.start()
        opened = loadgen(run.bootstrap, "all", "open", run.prefix, rate=20, duration=run.phase)
        svc.rss.mark("searches done")
        thread.join(600)
        svc.rss.mark("stopping")
    finally:
        svc.stop()
    out = {
        "start_to_consuming_s": round(ready, 2),
        "open_loop_20rps_during_burst": opened,
        **burst_figures(run, result),
        "peak": svc.rss.peak(),
    }
    return out, {"all": svc.rss.timeline()}


def seed_scenario(run: Run) -> tuple[dict, dict[str, dict]]:
    """The seed-style baseline through the same broker."""
    log = run.log("seed")
    svc = ServiceProcess(run.env("seed", BENCH_PRODUCTS=str(run.products)), log, module="benchmarks.seed_baseline")
    try:
        t0 = time.monotonic()
        while "consuming" not in log.read_text():
            if svc.proc.poll() is not None or time.monotonic() - t0 > 300:
                raise RuntimeError("seed baseline did not start")
            time.sleep(0.05)
        seed_ready = time.monotonic() - svc.started
        svc.rss.mark("ready")
        seed_first = loadgen(run.bootstrap, "seed", "single", run.prefix)
        svc.rss.mark("closed")
        seed_closed = loadgen(run.bootstrap, "seed", "closed", run.prefix, concurrency=8, duration=run.phase)
        svc.rss.mark("open")
        seed_open = loadgen(run.bootstrap, "seed", "open", run.prefix, rate=20, duration=run.phase)
        svc.rss.mark("stopping")
    finally:
        svc.stop()
    out = {
        "start_to_consuming_s": round(seed_ready, 2),
        "first_search_ms": seed_first["p50_ms"],
        "closed_loop": seed_closed,
        "open_loop_20rps": seed_open,
        "peak": svc.rss.peak(),
    }
    return out, {"seed baseline": svc.rss.timeline()}


def text_encode_ms(onnx_dir: Path) -> dict:
    """Child process: the ONNX text tower's ms per query, one query at a time (median of 50) and in batches of 32."""
    code = f"""
import json, statistics, sys, time
sys.path.insert(0, {str(REPO)!r})
from benchmarks.loadgen import query_texts
from consumer.encoder.encoder import Encoder
from consumer.encoder.onnx_backend import OnnxBackend
enc = Encoder(OnnxBackend({str(onnx_dir)!r}, 2), "bench")
texts = query_texts(210, 7)
for t in texts[:5]:
    enc.encode_text([t])
single = []
for t in texts[10:60]:
    s = time.perf_counter(); enc.encode_text([t]); single.append(time.perf_counter() - s)
batch = []
for i in range(60, 60 + 32 * 4, 32):
    s = time.perf_counter(); enc.encode_text(texts[i:i + 32]); batch.append((time.perf_counter() - s) / 32)
print(json.dumps({{"single_p50_ms": round(statistics.median(single) * 1000, 2), "batch32_per_query_ms": round(statistics.median(batch) * 1000, 2)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def family_names() -> list[str]:
    """The full-size families of ``model_builder.FAMILIES`` (OpenAI B/32 first); just OpenAI B/32 until they exist."""
    from consumer.tools import model_builder

    names = list(getattr(model_builder, "FAMILIES", {})) or [OPENAI]
    return sorted(names, key=lambda name: name != OPENAI)


def towers_interleaved(onnx_dirs: dict[str, str], rounds: int = 10) -> dict[str, dict]:
    """Child process: every family's int8 towers loaded at once and timed in turns (round-robin, ``rounds`` times), so
    machine noise hits all alike: text ms per single query (median) and vision ms per image in runs of 8 (median)."""
    code = f"""
import json, statistics, sys, time
import numpy as np
sys.path.insert(0, {str(REPO)!r})
from benchmarks.loadgen import query_texts
from consumer.encoder.encoder import Encoder
from consumer.encoder.onnx_backend import OnnxBackend
dirs = {onnx_dirs!r}
encoders = {{name: Encoder(OnnxBackend(path, 2), name) for name, path in dirs.items()}}
texts = query_texts({rounds} * 10, 11)
text, vision = {{n: [] for n in dirs}}, {{n: [] for n in dirs}}
rng = np.random.default_rng(3)
pixels = {{n: rng.random((8, 3, e.preprocess.image_size, e.preprocess.image_size), dtype=np.float32) for n, e in encoders.items()}}
for name, enc in encoders.items():
    enc.encode_text(texts[:2]); enc.encode_images(pixels[name])
for r in range({rounds}):
    for name, enc in encoders.items():
        for t in texts[r * 10:r * 10 + 10]:
            s = time.perf_counter(); enc.encode_text([t]); text[name].append(time.perf_counter() - s)
        s = time.perf_counter(); enc.encode_images(pixels[name]); vision[name].append((time.perf_counter() - s) / 8)
print(json.dumps({{n: {{"text_single_ms": round(statistics.median(text[n]) * 1000, 2),
                       "vision_ms_per_image": round(statistics.median(vision[n]) * 1000, 2)}} for n in dirs}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ingest_interleaved(runs: dict[str, Run], start_id: int, rounds: int = 3) -> dict[str, dict]:
    """``ROLE=ingest`` bursts of every family in turns (round-robin, ``rounds`` times), so machine noise hits all alike:
    each family's images/s per round and their median."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for k, (name, run) in enumerate(runs.items()):
            result, _ = ingest_scenario(run, start_id + (r * len(runs) + k) * (run.images + 1))
            rates[name].append(result["image_updates_per_s"])
    return {name: {"rates": values, "median": statistics.median(values)} for name, values in rates.items()}


def family_run(name: str, bootstrap: str, mongo_uri: str, logs: Path, products: int, phase: float, images: int, cache: str) -> dict:
    """One family end to end: a measured export into ``cache`` (empty), then ROLE=search, ingest and all on a small catalog."""
    from consumer.tools import model_builder
    from consumer.tools.onnx_export import export_in_subprocess

    model_dir = str(build_random_clip(CACHE / "models" / name, size=name))
    dim = int(json.loads((Path(model_dir) / "config.json").read_text()).get("projection_dim", 512))
    family = getattr(model_builder, "FAMILIES", {}).get(name)
    hub_id = family.get("hub_id") if isinstance(family, dict) else getattr(family, "hub_id", None)
    settings = Settings(clip_model=model_dir, model_cache_dir=cache, _env_file=None)
    with TreePeak() as tree:
        onnx_dir = export_in_subprocess(model_dir, onnx_dir_for(settings), quantize="int8")
    out: dict = {"hub_id": hub_id, "dim": dim, "onnx_dir": str(onnx_dir), "export": {"peak": tree.result()}}
    out["run"] = run = Run(bootstrap, mongo_uri, model_dir, logs, phase, images, products, f"fam-{name}", {"MODEL_CACHE_DIR": cache})
    print(f"[{name}] export: {out['export']}", flush=True)
    asyncio.run(create_bench_topics(bootstrap, run.prefix, FAMILY_SCENARIOS))
    out["catalog_write"] = asyncio.run(write_catalog(products, model_dir + "#onnx-int8", bootstrap, mongo_uri, run.prefix, dim))
    out["text_encode"] = text_encode_ms(Path(onnx_dir))
    out["search"], _ = search_scenario(run, None, restart=False)
    out["ingest"], _ = ingest_scenario(run, products)
    out["all"], _ = all_scenario(run, products + 10 * images)
    print(f"[{name}] {json.dumps(family_figures({k: v for k, v in out.items() if k != 'run'}))}", flush=True)
    return out


def first_start_without_export(model_dir: str, memory_limit_mb: int = 450) -> dict:
    """Issue 13's first start: ``python -m consumer`` on a model with no ONNX export yet and
    ``MEMORY_LIMIT_MB`` below the export's need; the process tree's peak and how it ended."""
    with tempfile.TemporaryDirectory(prefix="bench-first-start-") as tmp:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "CLIP_MODEL": model_dir,
            "ONNX_DIR": str(Path(tmp) / "export"),
            "MEMORY_LIMIT_MB": str(memory_limit_mb),
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
            "METRICS_PORT": str(free_port()),
        }
        with TreePeak() as peak:
            proc = subprocess.run(
                [sys.executable, "-m", "consumer"], cwd=tmp, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
            )
        lines = proc.stderr.strip().splitlines()
        return {
            "memory_limit_mb": memory_limit_mb,
            "exit_code": proc.returncode,
            "last_line": lines[-1] if lines else "",
            "export_written": (Path(tmp) / "export" / "export.json").is_file(),
            "peak": peak.result(),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--products", type=int)
    parser.add_argument("--out", type=Path)
    fam = parser.add_mutually_exclusive_group()
    fam.add_argument("--families", action="store_true", help="compare the model families (default for the full run)")
    fam.add_argument("--skip-families", action="store_true", help="no per-family rows (default for --quick)")
    fam.add_argument("--families-only", action="store_true", help="only the per-family rows")
    parser.add_argument("--family", action="append", help="only this family (repeatable); default: every one in FAMILIES")
    parser.add_argument("--replot", action="store_true", help="tables and plots again from the existing report; nothing is run")
    args = parser.parse_args()
    n = args.products or (10_000 if args.quick else 100_000)
    phase = 8.0 if args.quick else 30.0
    images = 40 if args.quick else 200
    with_families = args.families or args.families_only or not (args.quick or args.skip_families)
    fam_products, fam_phase = (2_000, 4.0) if args.quick else (10_000, 10.0)
    out = args.out or REPORTS / ("benchmark-quick.json" if args.quick else "benchmark.json")
    if args.replot:
        return finish(json.loads(out.read_text()), out)
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
    began = time.monotonic()

    with (
        tempfile.TemporaryDirectory(prefix="bench-store-") as store_dir,
        tempfile.TemporaryDirectory(prefix="bench-snapshots-") as snapshot_dir,
        TansuBroker() as broker,
        MongoServer(storage_path=store_dir) as mongo,
    ):
        bootstrap = broker.bootstrap
        if not args.families_only:
            t = time.monotonic()
            model_dir = str(build_random_clip(CACHE / "models" / OPENAI, size=OPENAI))
            settings = Settings(clip_model=model_dir, model_cache_dir=str(CACHE), _env_file=None)
            from consumer.tools.onnx_export import export_in_subprocess

            onnx_dir = export_in_subprocess(model_dir, onnx_dir_for(settings), quantize="int8")
            report["prepare_model_s"] = round(time.monotonic() - t, 1)
            report["first_start_without_export"] = first_start_without_export(model_dir)
            print(f"first start without an export: {json.dumps(report['first_start_without_export'])}", flush=True)
            print(f"model ready ({report['prepare_model_s']} s); catalog of {n} products ...", flush=True)
            asyncio.run(create_bench_topics(bootstrap, "bench", SCENARIOS))
            report["catalog_write"] = asyncio.run(write_catalog(n, model_dir + "#onnx-int8", bootstrap, mongo.uri))
            print(f"catalog written: {report['catalog_write']}", flush=True)
            run = Run(bootstrap, mongo.uri, model_dir, logs, phase, images, n)
            timelines: dict[str, dict] = {}
            for key, scenario in (
                ("search", lambda: search_scenario(run, snapshot_dir, restart=True, from_ingest_snapshot=True)),
                ("ingest", lambda: ingest_scenario(run, n)),
                ("all", lambda: all_scenario(run, n + 10 * images)),
                ("seed_baseline", lambda: seed_scenario(run)),
            ):
                report[key], tl = scenario()
                timelines |= tl
                print(f"{key}: {json.dumps(report[key])}", flush=True)
            report["timelines"] = timelines
        if with_families:
            report["family_settings"] = {"products": fam_products, "phase_s": fam_phase, "image_updates": images}
            report["families"] = {}
            with contextlib.ExitStack() as caches:
                for name in args.family or family_names():
                    cache = caches.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-export-{name}-"))
                    try:
                        report["families"][name] = family_run(name, bootstrap, mongo.uri, logs, fam_products, fam_phase, images, cache)
                    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                        print(f"[{name}] FAILED: {exc!r}; see {logs}/fam-{name}-*.log", flush=True)
                        report["families"][name] = {"error": repr(exc)}
                exported = {name: fam.pop("onnx_dir") for name, fam in report["families"].items() if "onnx_dir" in fam}
                runs = {name: fam.pop("run") for name, fam in report["families"].items() if "run" in fam}
                if exported:
                    for name, towers in towers_interleaved(exported).items():
                        report["families"][name]["towers"] = towers
                    print(f"towers, interleaved: {json.dumps({n: f.get('towers') for n, f in report['families'].items()})}", flush=True)
                if len(runs) > 1:
                    for name, rounds in ingest_interleaved(runs, fam_products + 100 * images).items():
                        report["families"][name]["ingest_rounds"] = rounds
                    print(
                        f"ingest, interleaved: {json.dumps({n: f.get('ingest_rounds') for n, f in report['families'].items()})}", flush=True
                    )

    if not args.families_only:
        report["fidelity"] = fidelity(model_dir, Path(onnx_dir), 2000 if args.quick else 5000)
    report["total_s"] = round(time.monotonic() - began, 1)
    return finish(report, out)


def finish(report: dict, out: Path) -> int:
    """Tables into the report, the report to ``out``, the plots next to it; print them."""
    report["table"] = table(report)
    report["family_table"] = family_table(report)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plots = write_plots(report, out)
    print("\n" + format_table(report["table"]))
    if report["family_table"]:
        fs = report["family_settings"]
        print(f"\nper family ({fs['products']} products, {fs['phase_s']:.0f} s phases, {fs['image_updates']} image updates):")
        print(format_family_table(report["family_table"]))
    print(f"\nreport: {out} ({report.get('total_s')} s)")
    for path in plots:
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Image ingest rate and first-replica cold start, of this checkout and optionally a baseline checkout, in one run.

    .venv/bin/python -m benchmarks.ingest_speed [--images 200] [--products 100000] [--baseline /tmp/base]

Builds (or reuses) the ViT-B/32-shaped random CLIP in .cache/models/vit-b-32 and its int8 ONNX export,
starts a Tansu broker and a SecantusDB store, then for each checkout runs ``python -m consumer`` as a
process (cwd = that checkout, so its ``consumer`` package is the one imported):

- ``ingest_rate(role=ingest|all)``: publishes ``--images`` product updates with a 224 px JPEG each to a
  fresh topic and reports images/s from the first publish to the last update counted ``applied``;
- ``cold_start``: ``ROLE=search`` with no snapshot anywhere and no store, over a compacted features
  topic of ``--products`` records: seconds from process start to ``/readyz`` answering 200.

Random weights: the rates are real, the rankings meaningless. Prints one JSON line per measurement and
writes benchmarks/reports/ingest_speed.json. Runs alternate between checkouts so load from other
processes on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.catalog import fields, publish_features
from benchmarks.run import CACHE, REPO, REPORTS, ServiceProcess, metric, process_env, wait_http
from devservices import MongoServer, TansuBroker, create_topics


def prepare_model(size: str = "vit-b-32") -> tuple[str, str]:
    """(model dir, model id) of the int8 random CLIP of ``size`` (a ``model_builder`` size or family), exported into
    .cache/ if not yet."""
    from consumer.app import onnx_dir_for
    from consumer.config.settings import Settings
    from consumer.tools.model_builder import build_random_clip
    from consumer.tools.onnx_export import export_in_subprocess

    model_dir = str(build_random_clip(CACHE / "models" / size, size=size))
    settings = Settings(clip_model=model_dir, model_cache_dir=str(CACHE), _env_file=None)
    export_in_subprocess(model_dir, onnx_dir_for(settings), quantize="int8")
    return model_dir, model_dir + "#onnx-int8"


def jpeg_updates(count: int, prefix: str) -> list[dict]:
    """``count`` product updates, each with a distinct random 224 px JPEG (quality 85, about 30 kB)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray((rng.random((224, 224, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
        out.append(fields(i) | {"product_id": f"{prefix}-{i}", "image_b64": base64.b64encode(buf.getvalue()).decode()})
    return out


class Service(ServiceProcess):
    """``python -m consumer`` run from ``repo`` (this checkout or a baseline one) with ``env``; output to ``log``."""

    def __init__(self, repo: Path, env: dict[str, str], log: Path) -> None:
        super().__init__(env, log, cwd=repo)

    def ready_after(self, timeout: float = 300) -> float:
        """Seconds from process start until /readyz answers 200."""
        waited = time.monotonic() - self.started
        return waited + wait_http(f"http://127.0.0.1:{self.port}/readyz", timeout, self.proc)

    def applied(self) -> float:
        return metric(self.port, "clip_search_product_updates_total", '{outcome="applied"}')

    def cpu_s(self) -> float:
        """User + system CPU seconds of the service process so far (all its threads)."""
        return cpu_s(self.proc.pid)


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads); 0 without one."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def base_env(bootstrap: str, model_dir: str, name: str) -> dict[str, str]:
    return process_env(bootstrap, model_dir, log_level="INFO") | {
        "PRODUCT_UPDATES_TOPIC": f"{name}-updates",
        "SEARCH_REQUESTS_TOPIC": f"{name}-requests",
        "REPLY_TOPIC": f"{name}-replies",
        "DEAD_LETTER_TOPIC": f"{name}-dead-letters",
        "CONSUMER_GROUP_ID": f"{name}-search",
        "INGEST_GROUP_ID": f"{name}-ingest",
    }


def ingest_rate(
    repo: Path, bootstrap: str, mongo_uri: str, model_dir: str, images: int, role: str, logs: Path, others: dict[str, int | None]
) -> dict:
    """Images/s of ``ROLE=role`` (``ingest`` or ``all``) for a burst of ``images`` image updates, store included;
    CPU ms per image of the service and of each process in ``others`` (name -> pid), and the mean batch size."""
    from producer_examples.client import publish

    name = f"ingest-{uuid.uuid4().hex[:8]}"
    env = base_env(bootstrap, model_dir, name) | {
        "ROLE": role,
        "FEATURES_TOPIC": f"{name}-features",
        "MONGODB_URI": mongo_uri,
        "MONGODB_DATABASE": name.replace("-", "_"),
        "FEATURE_DTYPE": "int8",
        "LAZY_LOAD_MODEL": "false",
    }
    topics = [env[k] for k in ("PRODUCT_UPDATES_TOPIC", "SEARCH_REQUESTS_TOPIC", "REPLY_TOPIC", "DEAD_LETTER_TOPIC")]
    asyncio.run(create_topics(bootstrap, topics))
    asyncio.run(create_topics(bootstrap, [env["FEATURES_TOPIC"]], compacted={env["FEATURES_TOPIC"]}))
    updates = jpeg_updates(images, name)
    svc = Service(repo, env, logs / f"{name}-{role}.log")
    try:
        ready = svc.ready_after()
        cpu = svc.cpu_s()
        other_cpu = {name: cpu_s(pid) for name, pid in others.items()}
        batches = (metric(svc.port, "clip_search_batch_size_sum"), metric(svc.port, "clip_search_batch_size_count"))
        started = time.monotonic()
        asyncio.run(publish(bootstrap, env["PRODUCT_UPDATES_TOPIC"], updates, key_field="product_id"))
        while svc.applied() < images:
            if svc.proc.poll() is not None or time.monotonic() - started > 900:
                raise RuntimeError(f"burst did not finish; see {svc.log.name}")
            time.sleep(0.05)
        seconds = time.monotonic() - started
        cpu = svc.cpu_s() - cpu
        other_cpu = {name: cpu_s(pid) - before for (name, pid), before in zip(others.items(), other_cpu.values(), strict=True)}
        records = metric(svc.port, "clip_search_batch_size_sum") - batches[0]
        count = metric(svc.port, "clip_search_batch_size_count") - batches[1]
    finally:
        svc.stop()
    return {
        "role": role,
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "service_cpu_ms_per_image": round(cpu / images * 1000, 1),
        **{f"{name}_cpu_ms_per_image": round(value / images * 1000, 1) for name, value in other_cpu.items()},
        "mean_batch_size": round(records / count, 1) if count else None,
        "load_average_1m": os.getloadavg()[0],
        "ready_s": round(ready, 2),
    }


async def write_features(bootstrap: str, topic: str, model_id: str, n: int) -> None:
    await publish_features(bootstrap, topic, model_id, n)


def cold_start(repo: Path, bootstrap: str, model_dir: str, features_topic: str, logs: Path, **extra: str) -> dict:
    """Seconds from process start to ready for a ``ROLE=search`` replica with no snapshot and no store."""
    name = f"cold-{uuid.uuid4().hex[:8]}"
    env = base_env(bootstrap, model_dir, name) | {"ROLE": "search", "FEATURES_TOPIC": features_topic, "FEATURE_DTYPE": "int8"} | extra
    asyncio.run(create_topics(bootstrap, [env[k] for k in ("SEARCH_REQUESTS_TOPIC", "REPLY_TOPIC", "DEAD_LETTER_TOPIC")]))
    svc = Service(repo, env, logs / f"{name}.log")
    try:
        ready = svc.ready_after()
        cpu = svc.cpu_s()
    finally:
        svc.stop()
    return {"start_to_consuming_s": round(ready, 2), "service_cpu_s": round(cpu, 2), "load_average_1m": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2, help="runs per checkout and measurement, alternating checkouts")
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. `git worktree add /tmp/base HEAD~3`) measured alike")
    parser.add_argument("--roles", default="ingest,all")
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--model", default="vit-b-32", help="a model_builder size or family (default: OpenAI B/32 shapes)")
    parser.add_argument("--out", type=Path, default=REPORTS / "ingest_speed.json")
    args = parser.parse_args()
    checkouts = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    logs = args.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model_dir, model_id = prepare_model(args.model)
    report: dict = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "checkouts": {k: str(v) for k, v in checkouts.items()},
        "commits": {
            k: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=v, capture_output=True, text=True).stdout.strip()
            for k, v in checkouts.items()
        },
        "runs": [],
    }
    with MongoServer(storage_path=str(logs / f"store-{uuid.uuid4().hex[:6]}")) as mongo, TansuBroker() as broker:
        if not args.skip_cold_start:
            topic = f"cold-features-{uuid.uuid4().hex[:6]}"
            asyncio.run(create_topics(broker.bootstrap, [topic], compacted={topic}))
            asyncio.run(write_features(broker.bootstrap, topic, model_id, args.products))
        for _ in range(args.repeats):
            for label, repo in checkouts.items():
                for role in [r for r in args.roles.split(",") if r]:
                    others = {"store": mongo.pid, "broker": broker.pid}
                    row = {"checkout": label, "measure": "ingest"} | ingest_rate(
                        repo, broker.bootstrap, mongo.uri, model_dir, args.images, role, logs, others
                    )
                    print(json.dumps(row), flush=True)
                    report["runs"].append(row)
                if not args.skip_cold_start:
                    row = {"checkout": label, "measure": "cold_start", "products": args.products} | cold_start(
                        repo, broker.bootstrap, model_dir, topic, logs
                    )
                    print(json.dumps(row), flush=True)
                    report["runs"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

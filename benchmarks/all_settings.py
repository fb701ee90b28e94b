"""ROLE=all under a catalog burst with two settings of its image work, in turns: search latency and images/s.

    .venv/bin/python -m benchmarks.all_settings [--products 50000] [--rounds 5] [--out benchmarks/reports/all_settings.json]

Writes ``--products`` features to a fresh store and features topic (Tansu, SecantusDB), then per round starts
``ROLE=all`` once with each variant (``VISION_THREADS=2 IMAGE_WORK_NICE=0``, and the defaults: one vision
thread at nice 10), sends 20 searches/s for 30 s while a burst of 200 image updates is published (after one
update that loads the vision tower), and records p50/p90/p99, images/s and peak RSS. Variants alternate
within each round, so machine noise hits both alike. Random weights: the timings are real, the rankings
meaningless. Prints one JSON line per run and writes the report with per-variant medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.run import (
    CACHE,
    OPENAI,
    REPORTS,
    Run,
    ServiceProcess,
    build_random_clip,
    create_bench_topics,
    image_burst,
    loadgen,
    wait_http,
    write_catalog,
)
from consumer.app import onnx_dir_for
from consumer.config.settings import Settings
from consumer.tools.onnx_export import export_in_subprocess
from devservices import MongoServer, TansuBroker

VARIANTS = {"2 threads, nice 0": {"VISION_THREADS": "2", "IMAGE_WORK_NICE": "0"}, "defaults (1 thread, nice 10)": {}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPORTS / "all_settings.json")
    args = parser.parse_args()
    model_dir = str(build_random_clip(CACHE / "models" / OPENAI, size=OPENAI))
    export_in_subprocess(
        model_dir, onnx_dir_for(Settings(clip_model=model_dir, model_cache_dir=str(CACHE), _env_file=None)), quantize="int8"
    )
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="all-settings-") as work, TansuBroker() as broker, MongoServer(storage_path=work) as mongo:
        asyncio.run(create_bench_topics(broker.bootstrap, "allset", ("all",)))
        asyncio.run(write_catalog(args.products, model_dir + "#onnx-int8", broker.bootstrap, mongo.uri, "allset"))
        run = Run(broker.bootstrap, mongo.uri, model_dir, Path(work), 30.0, 200, args.products, "allset")
        for rnd in range(args.rounds):
            for k, (label, extra) in enumerate(VARIANTS.items()):
                env = run.env("all", ROLE="all", MONGODB_URI=mongo.uri, MONGODB_DATABASE="allset", **extra)
                svc = ServiceProcess(env, Path(work) / f"all-{rnd}-{k}.log")
                burst: dict = {}
                try:
                    wait_http(f"http://127.0.0.1:{svc.port}/readyz", 300, svc.proc)
                    first_id = args.products + (rnd * len(VARIANTS) + k + 1) * (run.images + 1)
                    thread = threading.Thread(target=image_burst, args=(run, svc, "all", first_id, burst))
                    thread.start()
                    searches = loadgen(broker.bootstrap, "all", "open", "allset", rate=20, duration=run.phase)
                    thread.join(600)
                finally:
                    svc.stop()
                row = {
                    "round": rnd,
                    "variant": label,
                    **{k: searches[k] for k in ("p50_ms", "p90_ms", "p99_ms", "received", "errors")},
                    "image_updates_per_s": round(run.images / burst["burst_s"], 1) if "burst_s" in burst else None,
                    "peak": svc.rss.peak(),
                }
                print(json.dumps(row), flush=True)
                runs.append(row)
    medians = {
        label: {
            key: statistics.median(r[key] for r in runs if r["variant"] == label and r[key] is not None)
            for key in ("p50_ms", "p99_ms", "image_updates_per_s")
        }
        for label in VARIANTS
    }
    report = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "products": args.products, "runs": runs, "medians": medians}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(medians))
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

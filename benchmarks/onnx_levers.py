"""Memory, latency and fidelity of the CLIP towers: torch fp32 vs ONNX Runtime fp32 / int8 and its memory levers.

Builds the random ViT-B/32-shaped model (``.cache/models/vit-b-32``) and its ONNX exports
(``.cache/onnx/vit-b-32-{none,int8}``, in a child process), then measures every configuration
in a fresh child process: /proc/self/status (VmRSS, RssAnon, VmHWM) before and after loading
one tower, after the latency runs and, for text, after a worst-case batch (32 x 77 tokens);
median wall-clock latency; and fidelity against torch fp32: mean cosine of 200 product-style
queries / 16 images, and recall@10 of the 200 queries ranked against 5,000 product embeddings
computed by torch fp32 (top-10 of the candidate's query embedding vs top-10 of torch's).
Prints a table and writes benchmarks/reports/onnx_levers.json. With ``--threads 1`` the table
shows the calling thread's CPU time per call, which a busy shared machine barely disturbs;
otherwise wall-clock time (both are in the report).

    python benchmarks/onnx_levers.py [--threads 1] [--products 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL_DIR = REPO / ".cache" / "models" / "vit-b-32"
ONNX_DIRS = {q: REPO / ".cache" / "onnx" / f"vit-b-32-{q}" for q in ("none", "int8")}
REPORT = REPO / "benchmarks" / "reports" / "onnx_levers.json"
QUERIES = 200
IMAGES = 16
TEXT_BATCHES = {1: 30, 8: 15, 32: 8}
VISION_BATCHES = {1: 12, 8: 5}
TOWERS = ("text", "vision")

ADJECTIVES = (
    "red blue green black white leather cotton wooden steel vintage modern slim waterproof wireless organic compact"
    " oversized soft heavy-duty linen"
).split()
ITEMS = [
    "running shoes",
    "rain jacket",
    "desk lamp",
    "office chair",
    "hiking backpack",
    "smart watch",
    "noise cancelling headphones",
    "electric kettle",
    "coffee mug",
    "corner sofa",
    "standing desk",
    "wool blanket",
    "canvas sneakers",
    "summer dress",
    "mirrorless camera",
    "water bottle",
    "camping tent",
    "chef knife",
    "memory foam pillow",
    "bluetooth speaker",
]
AUDIENCES = ["men", "women", "kids", "travel", "the office", "the kitchen", "outdoor use", "gaming", "winter"]
DETAILS = [
    "with free shipping",
    "in three sizes",
    "made from recycled materials",
    "with a two year warranty",
    "machine washable",
    "for everyday use",
    "with adjustable straps",
    "limited edition",
]

TEXT, VISION = {"tower": "text"}, {"tower": "vision"}
TORCH = {"runtime": "torch"}
FP32 = {"runtime": "onnx", "quantize": "none", "max_batch": 32}
INT8 = {"runtime": "onnx", "quantize": "int8", "max_batch": 32}
CONFIGS: list[dict] = [
    {"label": "torch fp32", **TEXT, **TORCH},
    {"label": "ORT fp32 .onnx", **TEXT, **FP32, "mmap": False},
    {"label": "ORT fp32 .ort mmap", **TEXT, **FP32, "mmap": True},
    {"label": "ORT int8 .onnx, no arena", **TEXT, **INT8, "mmap": False, "arena": False},
    {"label": "ORT int8 .onnx", **TEXT, **INT8, "mmap": False, "arena_shrink": False},
    {"label": "ORT int8 .onnx +shrink", **TEXT, **INT8, "mmap": False},
    {"label": "ORT int8 .ort mmap +shrink", **TEXT, **INT8},
    {"label": "ORT int8 .ort mmap +shrink, max_batch 8 (default)", **TEXT, "runtime": "onnx", "quantize": "int8"},
    {"label": "torch fp32", **VISION, **TORCH},
    {"label": "ORT fp32 .onnx", **VISION, **FP32, "mmap": False},
    {"label": "ORT fp32 .ort mmap", **VISION, **FP32, "mmap": True},
    {"label": "ORT int8 .onnx", **VISION, **INT8, "mmap": False, "arena_shrink": False},
    {"label": "ORT int8 .ort mmap +shrink, max_batch 8 (default)", **VISION, "runtime": "onnx", "quantize": "int8"},
]


def proc_status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def product_text(seed: int, detail: bool) -> str:
    rng = np.random.default_rng(seed)
    text = f"{rng.choice(ADJECTIVES)} {rng.choice(ADJECTIVES)} {rng.choice(ITEMS)} for {rng.choice(AUDIENCES)}"
    return f"{text} {rng.choice(DETAILS)}" if detail else text


def products(n: int) -> list[str]:
    return [product_text(i, detail=True) for i in range(n)]


def queries() -> list[str]:
    return [product_text(1_000_000 + i, detail=i % 4 == 0) for i in range(QUERIES)]


def images() -> np.ndarray:
    from PIL import Image, ImageDraw

    from consumer.encoder.images import clip_pixels

    files = sorted((REPO / "producer_examples" / "catalog" / "images").glob("*.png"))
    out = [clip_pixels(Image.open(p).convert("RGB")) for p in files[:IMAGES]]
    rng = np.random.default_rng(7)

    def colour() -> tuple[int, ...]:
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    while len(out) < IMAGES:
        img = Image.new("RGB", (int(rng.integers(200, 400)), int(rng.integers(200, 400))), colour())
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, 150)), int(rng.integers(0, 150))
            draw.ellipse((x0, y0, x0 + int(rng.integers(30, 200)), y0 + int(rng.integers(30, 200))), fill=colour())
        out.append(clip_pixels(img))
    return np.stack(out)


def long_texts(n: int) -> list[str]:
    return [" ".join(product_text(i * 100 + j, detail=True) for j in range(8)) for i in range(n)]


def encode_chunked(tower, inputs, size: int) -> np.ndarray:
    return np.concatenate([tower.encode(inputs[i : i + size]) for i in range(0, len(inputs), size)])


def timed(fn, reps: int) -> dict[str, float]:
    """Wall-clock and calling-thread CPU time per call (the latter equals the work done when threads=1)."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)

    def ms(xs: list[float], f: Callable[[list[float]], float]) -> float:
        return round(1000 * float(f(xs)), 1)

    return {"median_ms": ms(wall, np.median), "min_ms": ms(wall, min), "cpu_median_ms": ms(cpu, np.median), "cpu_min_ms": ms(cpu, min)}


def worker(cfg: dict, threads: int, out_npz: str, n_products: int) -> dict:
    """One configuration in this (fresh) process; embeddings go to ``out_npz``."""
    pixels = images() if cfg["tower"] == "vision" else None
    texts = queries()
    base = proc_status()
    if cfg["runtime"] == "torch":
        from consumer.encoder.torch_backend import TorchBackend

        backend = TorchBackend(str(MODEL_DIR), threads)
    else:
        from consumer.encoder.onnx_backend import OnnxBackend

        levers = {k: cfg[k] for k in ("mmap", "arena", "arena_shrink", "max_batch") if k in cfg}
        backend = OnnxBackend(str(ONNX_DIRS[cfg["quantize"]]), threads, **levers)
    start = time.perf_counter()
    tower = backend.load_text() if cfg["tower"] == "text" else backend.load_vision()
    result = {"load_s": round(time.perf_counter() - start, 2), "base": base, "loaded": proc_status()}
    result["nbytes"] = tower.nbytes
    result["file"] = getattr(getattr(tower, "path", None), "name", "model.safetensors")

    if cfg["tower"] == "text":
        result["latency"] = {bs: timed(lambda b=bs: tower.encode(texts[:b]), reps) for bs, reps in TEXT_BATCHES.items()}
        result["after_runs"] = proc_status()
        embeddings = {"queries": encode_chunked(tower, texts, 32)}
        tower.encode(long_texts(32))
        tower.encode(long_texts(32))
        result["after_worst_batch"] = proc_status()
        if cfg["runtime"] == "torch" and n_products:
            embeddings["products"] = encode_chunked(tower, products(n_products), 32)
    else:
        result["latency"] = {bs: timed(lambda b=bs: tower.encode(pixels[:b]), reps) for bs, reps in VISION_BATCHES.items()}
        result["after_runs"] = proc_status()
        embeddings = {"images": encode_chunked(tower, pixels, 8)}
    result["heavy_modules"] = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("torch", "transformers")})
    np.savez(out_npz, **embeddings)
    return result


def ensure_artifacts() -> None:
    from consumer.tools.model_builder import build_random_clip
    from consumer.tools.onnx_export import export_in_subprocess, is_current

    if not (MODEL_DIR / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "consumer.tools.model_builder", "--out", str(MODEL_DIR), "--size", "vit-b-32"], check=True, cwd=REPO
        )
    build_random_clip(MODEL_DIR, size="vit-b-32")
    for quantize, out in ONNX_DIRS.items():
        if not is_current(str(MODEL_DIR), out, quantize=quantize):
            print(f"exporting {quantize} to {out} ...", flush=True)
        export_in_subprocess(str(MODEL_DIR), out, quantize=quantize)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fidelity(rows: list[dict], tmp: Path) -> None:
    """Fill ``fidelity`` of each row against the torch fp32 row of the same tower."""
    ref = {t: next(i for i, c in enumerate(CONFIGS) if c["tower"] == t and c["runtime"] == "torch") for t in TOWERS}
    ref_text, ref_vision = np.load(tmp / f"{ref['text']}.npz"), np.load(tmp / f"{ref['vision']}.npz")
    prod = normalise(ref_text["products"]) if "products" in ref_text else None
    ref_q = normalise(ref_text["queries"])
    ref_top = np.argsort(-(ref_q @ prod.T), axis=1)[:, :10] if prod is not None else None
    for i, row in enumerate(rows):
        emb = np.load(tmp / f"{i}.npz")
        if row["tower"] == "text":
            q = normalise(emb["queries"])
            cos = np.sum(q * ref_q, axis=1)
            fid = {"mean_cos": float(cos.mean()), "min_cos": float(cos.min())}
            if ref_top is not None:
                top = np.argsort(-(q @ prod.T), axis=1)[:, :10]
                fid["recall@10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, ref_top, strict=True)]))
        else:
            im, ref_im = normalise(emb["images"]), normalise(ref_vision["images"])
            cos = np.sum(im * ref_im, axis=1)
            fid = {"mean_cos": float(cos.mean()), "min_cos": float(cos.min())}
        row["fidelity"] = {k: round(v, 5) for k, v in fid.items()}


def print_table(rows: list[dict], clock: str) -> None:
    head = f"{'tower':6} {'config':50} {'file MB':>7} {'load s':>6} {'RSS':>5} {'Anon':>5} {'HWM':>5} {'RSS run':>7} {'HWM run':>7} {'HWM 32x77':>9}  {'latency ms, min (median)':40} {'cos':>7} {'R@10':>5}"
    print(head)
    print("-" * len(head))
    for r in rows:
        key = "cpu_" if clock == "cpu" else ""
        lat = " ".join(f"{bs}:{v[key + 'min_ms']:.0f}({v[key + 'median_ms']:.0f})" for bs, v in r["latency"].items())
        worst = r.get("after_worst_batch", {}).get("VmHWM")
        fid = r.get("fidelity", {})
        print(
            f"{r['tower']:6} {r['label']:50} {r['nbytes'] / 1e6:7.0f} {r['load_s']:6.2f} {r['loaded']['VmRSS']:5.0f} {r['loaded']['RssAnon']:5.0f} "
            f"{r['loaded']['VmHWM']:5.0f} {r['after_runs']['VmRSS']:7.0f} {r['after_runs']['VmHWM']:7.0f} {worst if worst else '-':>9}  {lat:40} "
            f"{fid.get('mean_cos', float('nan')):7.4f} {fid.get('recall@10', float('nan')):5.3f}"
        )
    print("MiB from /proc/self/status; RSS/Anon/HWM after loading one tower in a fresh process (python+numpy+runtime included);")
    print("'run' after the latency runs; 'HWM 32x77' after two worst-case text batches (32 texts x 77 tokens).")
    what = "thread CPU" if clock == "cpu" else "wall-clock"
    print(f"latency: batch size:min(median) {what} ms per call; cos/R@10 vs torch fp32.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--products", type=int, default=5000)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--npz", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(CONFIGS[int(args.worker)], args.threads, args.npz, args.products)))
        return 0

    ensure_artifacts()
    rows = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="onnx-levers-") as tmp:
        for i, cfg in enumerate(CONFIGS):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                str(i),
                "--threads",
                str(args.threads),
                "--products",
                str(args.products),
                "--npz",
                str(Path(tmp) / f"{i}.npz"),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{cfg['tower']} {cfg['label']} failed:\n{proc.stderr[-3000:]}")
            rows.append(cfg | json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"measured {cfg['tower']} {cfg['label']}", flush=True)
        fidelity(rows, Path(tmp))
    clock = "cpu" if args.threads == 1 else "wall"
    print_table(rows, clock)
    from consumer.encoder.manifest import read_manifest

    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "threads": args.threads,
        "table_clock": clock,
        "products": args.products,
        "queries": QUERIES,
        "images": IMAGES,
        "model": str(MODEL_DIR.relative_to(REPO)),
        "manifests": {q: read_manifest(d) for q, d in ONNX_DIRS.items()},
        "rows": rows,
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {REPORT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

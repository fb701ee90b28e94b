"""Per-family serving cost with random weights and real shapes: params, int8 export size, encode speed, RSS.

Usage::

    python -m benchmarks.families_quick [--families NAME ...] [--out FILE.json]

For each ``model_builder.FAMILIES`` entry: build the random-weights model (cached in ``.cache/models``),
export it to ONNX int8 (cached in ``.cache/onnx``), then in a fresh child process (no torch imported)
load both towers with ``OnnxBackend`` as a search replica does, and time single-query text encodes
(median of 30 after 3 warm-ups) and single-image encodes (decode + preprocess + encode, median of 15),
then read the child's RSS (``VmRSS``) with both towers loaded. Prints one JSON row per family.
Random weights: the timing and memory are the real shapes', the rankings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import base64, io, json, statistics, sys, time
import numpy as np
from PIL import Image
from consumer.encoder.encoder import Encoder
from consumer.encoder.images import ImageLimits, pixels_from_base64
from consumer.encoder.onnx_backend import OnnxBackend

onnx_dir = sys.argv[1]
encoder = Encoder(OnnxBackend(onnx_dir, threads=2), model_id=onnx_dir)
encoder.ensure_loaded("text", "vision")
buf = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buf, format="JPEG")
image = base64.b64encode(buf.getvalue()).decode()

def timed(fn, n):
    for _ in range(3):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out) * 1000

text_ms = timed(lambda: encoder.encode_text(["red cotton t-shirt with a round neck"]), 30)
image_ms = timed(lambda: encoder.encode_images(pixels_from_base64(image, ImageLimits(), encoder.preprocess)[None]), 15)
rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))
print(json.dumps({"text_ms": round(text_ms, 1), "image_ms": round(image_ms, 1), "rss_bytes": rss}))
"""


def measure(name: str) -> dict[str, object]:
    from consumer.encoder.manifest import read_manifest
    from consumer.tools.model_builder import FAMILIES, build_random_clip
    from consumer.tools.onnx_export import export_in_subprocess

    model = build_random_clip(REPO / ".cache" / "models" / name, size=name)
    out = export_in_subprocess(str(model), REPO / ".cache" / "onnx" / f"family-{name}-int8", quantize="int8")
    manifest = read_manifest(out)
    towers = manifest["towers"]
    child = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, check=True, cwd=REPO)
    row: dict[str, object] = {
        "family": name,
        "hub_id": FAMILIES[name].hub_id,
        "parameters": sum(int(t["parameters"]) for t in towers.values()),
        "onnx_int8_bytes": sum(int(t["bytes"]) for t in towers.values()),
    }
    row.update(json.loads(child.stdout.strip().splitlines()[-1]))
    return row


def main(argv: list[str] | None = None) -> int:
    from consumer.tools.model_builder import FAMILIES

    parser = argparse.ArgumentParser(prog="python -m benchmarks.families_quick", description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--out", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    for name in args.families:
        rows.append(measure(name))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

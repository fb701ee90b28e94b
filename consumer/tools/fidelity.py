"""Export fidelity: how closely an exported ONNX tower reproduces the torch model it was traced from.

A fixed probe set is kept in the repository (``assets/probes``): 64 short product texts and 32 small
synthetic images. Each tower's *probe catalog* is its probes plus deterministic variants of each
(texts: ``"a photo of {t}"`` and ``"{t} on sale"``; images: mirrored, darkened and noised copies),
192 texts and 128 images. The source model and the exported tower encode the whole catalog, in the
same chunks of ``CHUNK`` rows the serving path uses, and ``compare`` reports:

- ``mean_cosine`` / ``min_cosine``: cosine between the source's and the export's embedding of each
  catalog row, averaged / at its worst;
- ``recall_at_10``: for each original probe (the queries), the share of its 10 nearest catalog
  neighbours (itself excluded, cosine) under the source's embeddings that are also among its 10
  nearest under the export's embeddings; averaged over the queries.

``outlier_matmuls`` ranks the weight MatMuls of an fp32 graph by how badly per-tensor uint8
activation quantization would resolve their input (range over RMS), which is what dynamic int8 does.

Imports onnx and onnxruntime when called; torch only in ``run_torch``. Used by ``consumer.tools.onnx_export``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from consumer.encoder.images import CLIP_MEAN, CLIP_STD

PROBE_DIR = Path(__file__).resolve().parent / "assets" / "probes"
TEXTS_FILE = PROBE_DIR / "texts.txt"
IMAGES_DIR = PROBE_DIR / "images"
PROBE_IMAGE_COUNT = 32
PROBE_IMAGE_SIZE = 64
TEXT_VARIANTS = ("{}", "a photo of {}", "{} on sale")
RECALL_K = 10
CHUNK = 8
"""Rows per run, as ``OnnxBackend``'s default ``max_batch``: dynamic int8 scales activations per run."""
OUTLIER_FACTOR = 3.0
"""A MatMul is an outlier when its input's range/RMS exceeds this many times the median MatMul's."""

Feeds = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class Fidelity:
    """Agreement of an export with its source over a probe catalog (see the module docstring)."""

    mean_cosine: float
    min_cosine: float
    recall_at_10: float

    def to_dict(self) -> dict[str, float]:
        return {
            "mean_cosine": round(self.mean_cosine, 6),
            "min_cosine": round(self.min_cosine, 6),
            "recall_at_10": round(self.recall_at_10, 4),
        }


@dataclass(frozen=True)
class Probe:
    """One tower's probe catalog as model inputs: ``feeds`` in chunks; the first ``queries`` rows are the original probes."""

    feeds: Feeds
    queries: int

    @property
    def rows(self) -> int:
        return sum(len(next(iter(f.values()))) for f in self.feeds)


def probe_texts() -> list[str]:
    return [line.strip() for line in TEXTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def probe_images() -> list[np.ndarray]:
    """The probe images as uint8 [H, W, 3] arrays, in file-name order."""
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(IMAGES_DIR.glob("*.png"))]


def write_probe_images(folder: Path = IMAGES_DIR, count: int = PROBE_IMAGE_COUNT, size: int = PROBE_IMAGE_SIZE) -> None:
    """Generate the committed probe images (deterministic): gradients, discs, stripes and checkers, every 8th noised."""
    rng = np.random.default_rng(20261201)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    for i in range(count):
        c1, c2 = rng.integers(0, 256, 3).astype(np.float32), rng.integers(0, 256, 3).astype(np.float32)
        kind = i % 4
        if kind == 0:
            t = (xx * np.cos(i) + yy * np.sin(i)) % 1.0
        elif kind == 1:
            cx, cy = (float(v) for v in rng.uniform(0.25, 0.75, 2))
            r = float(rng.uniform(0.15, 0.4))
            t = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).astype(np.float32)
        elif kind == 2:
            t = (np.sin((xx * np.cos(i) + yy * np.sin(i)) * np.pi * (2 + i % 7)) > 0).astype(np.float32)
        else:
            t = ((np.floor(xx * (2 + i % 5)) + np.floor(yy * (2 + i % 5))) % 2).astype(np.float32)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        if i % 8 == 7:
            img = img + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"probe_{i:02d}.png", optimize=True)


def _image_variants(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    rng = np.random.default_rng(14)
    mirrored = [img[:, ::-1] for img in images]
    darker = [(img.astype(np.float32) * 0.6).astype(np.uint8) for img in images]
    noisy = [np.clip(img.astype(np.float32) + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8) for img in images]
    return [*images, *mirrored, *darker, *noisy]


def _chunks(rows: int) -> list[slice]:
    return [slice(i, min(i + CHUNK, rows)) for i in range(0, rows, CHUNK)]


def text_probe(model_dir: str) -> Probe:
    """Token ids of the text catalog, each chunk padded to its longest text as the serving path does."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model_dir)  # nosec B615  # CLIP_MODEL is operator configuration (README: Security)
    texts = probe_texts()
    catalog = [variant.format(t) for variant in TEXT_VARIANTS for t in texts]
    ids: list[list[int]] = tok(catalog, truncation=True, max_length=tok.model_max_length)["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    feeds: Feeds = []
    for part in _chunks(len(ids)):
        rows = ids[part]
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = r
            mask[j, : len(r)] = 1
        feeds.append({"input_ids": input_ids, "attention_mask": mask})
    return Probe(feeds, queries=len(texts))


def _normalisation(model_dir: str) -> tuple[np.ndarray, np.ndarray]:
    config = Path(model_dir) / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.get("image_mean") and data.get("image_std"):
            return np.asarray(data["image_mean"], np.float32), np.asarray(data["image_std"], np.float32)
    return CLIP_MEAN, CLIP_STD


def vision_probe(model_dir: str, image_size: int) -> Probe:
    """Pixels of the image catalog: bicubic resize to ``image_size``, the model's mean/std (OpenAI's when it ships none)."""
    mean, std = _normalisation(model_dir)
    images = probe_images()
    catalog = _image_variants(images)
    pixels = np.stack(
        [np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.Resampling.BICUBIC), np.float32) / 255.0 for img in catalog]
    )
    pixels = ((pixels - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
    return Probe([{"pixel_values": np.ascontiguousarray(pixels[part])} for part in _chunks(len(pixels))], queries=len(images))


def run_torch(module: Callable[..., Any], probe: Probe) -> np.ndarray:
    """The source's embeddings of the catalog: ``module(**feed)`` per chunk, float32 [rows, dim]."""
    import torch

    with torch.inference_mode():
        return np.concatenate([module(**{k: torch.from_numpy(v) for k, v in feed.items()}).float().numpy() for feed in probe.feeds])


def run_onnx(path: Path, probe: Probe) -> np.ndarray:
    """The ONNX graph's embeddings of the catalog (first output), float32 [rows, dim]."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([np.asarray(session.run(None, feed)[0], np.float32) for feed in probe.feeds])


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    unit: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return unit


def _top_k(unit: np.ndarray, queries: int, k: int) -> np.ndarray:
    sims = unit[:queries] @ unit.T
    sims[np.arange(queries), np.arange(queries)] = -np.inf
    top: np.ndarray = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return top


def compare(reference: np.ndarray, candidate: np.ndarray, queries: int, k: int = RECALL_K) -> Fidelity:
    """Fidelity of ``candidate`` embeddings to ``reference`` (same rows); the first ``queries`` rows are the queries."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {candidate.shape}")
    ref, cand = _unit(reference), _unit(candidate)
    cosines = np.sum(ref * cand, axis=1)
    k = min(k, len(ref) - 1)
    top_ref, top_cand = _top_k(ref, queries, k), _top_k(cand, queries, k)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_ref, top_cand, strict=True)]
    return Fidelity(float(cosines.mean()), float(cosines.min()), float(np.mean(overlap)))


def outlier_matmuls(fp32_path: Path, probe: Probe, factor: float = OUTLIER_FACTOR, chunks: int = 2) -> list[str]:
    """Names of the weight MatMuls whose input's (range / RMS) exceeds ``factor`` x the median's, worst first.

    Dynamic int8 quantizes each MatMul's input per tensor to 256 levels, so a tensor whose range is
    dominated by a few outliers loses its other values. Measured on the first ``chunks`` probe chunks
    with one fp32 run that also outputs every weight MatMul's input.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32_path))
    weights = {init.name for init in model.graph.initializer}
    nodes = [(n.name, n.input[0]) for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    inputs = sorted({name for _, name in nodes})
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inputs if name not in existing
    )
    with tempfile.TemporaryDirectory(dir=fp32_path.parent) as tmp:
        probed = Path(tmp) / "probed.onnx"
        onnx.save(model, str(probed))
        del model
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(probed), opts, providers=["CPUExecutionProvider"])
        score = dict.fromkeys(inputs, 0.0)
        for feed in probe.feeds[:chunks]:
            for name, value in zip(inputs, session.run(inputs, feed), strict=True):
                x = np.asarray(value, np.float64)
                rms = float(np.sqrt(np.mean(x * x))) or 1e-12
                score[name] = max(score[name], (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / rms)
    if not nodes:
        return []
    median = float(np.median([score[i] for _, i in nodes]))
    ranked = sorted(nodes, key=lambda node: -score[node[1]])
    return [name for name, inp in ranked if score[inp] > factor * median]


if __name__ == "__main__":
    write_probe_images()

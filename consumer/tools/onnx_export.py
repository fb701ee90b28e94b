"""Export CLIP's text and vision towers to ONNX, optionally with weight int8 dynamic quantization.

(One tool, about 440 lines: tracing, quantization, the ORT-format copy, the manifest and the
child-process runner are the steps of one export and share its staging directory.)

Usage::

    python -m consumer.tools.onnx_export --model DIR_OR_HUB_ID --out DIR [--towers text,vision] [--quantize int8|none]

The output directory holds ``text.onnx`` (inputs ``input_ids``, ``attention_mask``: int64
[batch, sequence]; output ``text_embeds``: float32 [batch, projection_dim]), ``vision.onnx``
(input ``pixel_values``: float32 [batch, 3, S, S]; output ``image_embeds``), ``text.ort`` /
``vision.ort`` (the same graphs in ORT format with extended optimisations applied, for
memory-mapped loading by the same onnxruntime version), the source's ``tokenizer.json``, the
``export.json`` manifest (written last) and, for random-weights sources, a copy of
``random_weights.json``. Embeddings are not normalised.

``export_onnx`` imports torch and transformers in the calling process; a serving process should
call ``export_in_subprocess`` (or ``is_current`` first), which never imports them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from consumer.encoder.extras import EXPORT_MODULES, missing_extra
from consumer.encoder.manifest import MANIFEST_FILE, TOKENIZER_FILE, read_manifest, source_preprocess

log = logging.getLogger(__name__)

EXPORT_FORMAT = 2
MARKER_FILE = "random_weights.json"
TOWERS: tuple[str, ...] = ("text", "vision")
QUANTIZATIONS: tuple[str, ...] = ("none", "int8")
OPSET = 17
TOWER_FILES = {"text": "text.onnx", "vision": "vision.onnx"}
ORT_FILES = {"text": "text.ort", "vision": "vision.ort"}
TOWER_OUTPUTS = {"text": "text_embeds", "vision": "image_embeds"}

# Weight-only dynamic int8 (activations quantised per call by ORT). See benchmarks/onnx_levers.py
# for the measurements behind these choices.
INT8_OPTIONS: dict[str, Any] = {
    "weight_type": "QInt8",
    "per_channel": True,
    "reduce_range": True,  # 7-bit weights: u8 x s8 pairs cannot saturate the int16 sums of AVX2 kernels (no VNNI)
    "op_types_to_quantize": ["MatMul", "Gather"],
}

Quantize = Literal["none", "int8"]


class ExportError(RuntimeError):
    """An export failed; the message carries the reason (and the child's stderr tail for subprocess exports)."""


def _source_fingerprint(model: str) -> dict[str, Any]:
    """Identify the source weights without loading them: a local directory's config hash and weight file stats."""
    directory = Path(model)
    if not directory.is_dir():
        return {"hub_id": model}
    config = directory / "config.json"
    weights = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    return {
        "path": str(directory.resolve()),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights],
    }


def _normalise_towers(towers: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(towers, str):
        towers = [t.strip() for t in towers.split(",") if t.strip()]
    unknown = set(towers) - set(TOWERS)
    if unknown or not towers:
        raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {list(towers)}")
    return tuple(t for t in TOWERS if t in towers)


EXPORT_BASE_BYTES = 400 * 2**20
EXPORT_BYTES_PER_WEIGHT_BYTE = 3.0
"""Peak memory of an export, as measured on 2 cores (``/usr/bin/time -v`` on ``python -m consumer.tools.onnx_export``,
ViT-B/32 shapes, 578 MB of fp32 weights, int8): text tower 1,621 MB, vision tower 1,838 MB, both 2,140 MB. The
interpreter with torch and onnx takes about 400 MB; tracing, the fp32 ONNX copy and quantization about 3x the weights."""


def export_memory_need(model: str) -> int | None:
    """Estimated peak bytes of exporting both towers of the local model directory ``model``; None when unknown (a hub id)."""
    folder = Path(model)
    weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin")] if folder.is_dir() else []
    if not weights:
        return None
    return int(EXPORT_BASE_BYTES + EXPORT_BYTES_PER_WEIGHT_BYTE * sum(w.stat().st_size for w in weights))


def is_current(model_dir: str, out_dir: str | os.PathLike[str], towers: Sequence[str] = TOWERS, quantize: Quantize = "int8") -> bool:
    """True iff ``out_dir`` already holds an export of ``model_dir`` with at least ``towers`` at ``quantize``.

    Matches on export format, quantization (and its options), the source fingerprint (local
    directory: config hash + weight file sizes/mtimes; hub id: the id) and the tower files' sizes.
    Never imports torch.
    """
    try:
        manifest = read_manifest(out_dir)
    except (OSError, ValueError):
        return False
    wanted = _normalise_towers(towers)
    expected_options = INT8_OPTIONS if quantize == "int8" else None
    if (
        manifest.get("format") != EXPORT_FORMAT
        or manifest.get("quantization") != quantize
        or manifest.get("quantization_options") != expected_options
        or manifest.get("source_fingerprint") != _source_fingerprint(model_dir)
    ):
        return False
    exported = manifest.get("towers") or {}
    out = Path(out_dir)
    for name in wanted:
        entry = exported.get(name)
        if not entry:
            return False
        for key, size_key in (("file", "bytes"), ("ort_file", "ort_bytes")):
            path = out / entry[key]
            if not path.is_file() or path.stat().st_size != entry[size_key]:
                return False
    return (out / TOKENIZER_FILE).is_file() or "text" not in wanted


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _trace_to_onnx(
    tower: Any, example: tuple[Any, ...], path: Path, inputs: dict[str, dict[int, str]], outputs: dict[str, dict[int, str]]
) -> None:
    """Trace ``tower`` on ``example`` into ``path``; ``inputs``/``outputs`` name the tensors in order, with their dynamic axes."""
    import torch

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tower,
            example,
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=inputs | outputs,
            opset_version=OPSET,
            dynamo=False,
        )


def _export_text(model_dir: str, path: Path) -> dict[str, Any]:
    import torch
    from transformers import CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection.from_pretrained(model_dir, attn_implementation="eager").eval()  # nosec B615  # CLIP_MODEL is operator configuration; pin it with a local snapshot directory (README: Security)

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            embeds: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds
            return embeds

    cfg = model.config
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else 49406
    eos = cfg.eos_token_id if cfg.eos_token_id not in (None, 2) else 49407
    input_ids = torch.tensor([[bos, 320, 1125, 539, 320, 2368, eos], [bos, 320, 1125, eos, eos, eos, eos]])
    attention_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    _trace_to_onnx(
        TextTower(),
        (input_ids, attention_mask),
        path,
        {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
        {"text_embeds": {0: "batch"}},
    )
    return {
        "projection_dim": int(model.config.projection_dim),
        "max_length": int(cfg.max_position_embeddings),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _export_vision(model_dir: str, path: Path) -> dict[str, Any]:
    import torch
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(model_dir, attn_implementation="eager").eval()  # nosec B615  # CLIP_MODEL is operator configuration; pin it with a local snapshot directory (README: Security)

    class VisionTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            embeds: torch.Tensor = self.model(pixel_values=pixel_values).image_embeds
            return embeds

    size = int(model.config.image_size)
    _trace_to_onnx(VisionTower(), (torch.zeros(2, 3, size, size),), path, {"pixel_values": {0: "batch"}}, {"image_embeds": {0: "batch"}})
    return {
        "projection_dim": int(model.config.projection_dim),
        "image_size": size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _quantize_int8(src: Path, dst: Path, options: dict[str, Any]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType[options["weight_type"]],
        per_channel=options["per_channel"],
        reduce_range=options["reduce_range"],
        op_types_to_quantize=options["op_types_to_quantize"],
    )


def _save_ort_format(src: Path, dst: Path) -> None:
    """Write ``src`` as an ORT-format model with extended (hardware-independent) graph optimisations applied."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def _save_tokenizer(model_dir: str, dst: Path) -> dict[str, Any]:
    """Copy (or regenerate) ``tokenizer.json`` and return the special tokens the backend needs."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model_dir)  # nosec B615  # CLIP_MODEL is operator configuration; pin it with a local snapshot directory (README: Security)
    local = Path(model_dir) / TOKENIZER_FILE
    if local.is_file():
        shutil.copyfile(local, dst)
    else:
        tok.backend_tokenizer.save(str(dst))
    return {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": str(OPSET),
    }


def export_onnx(
    model_dir: str,
    out_dir: Path,
    towers: Sequence[str] = TOWERS,
    quantize: Quantize = "int8",
    *,
    force: bool = False,
) -> Path:
    """Export ``towers`` of the CLIP ``model_dir`` (local directory or hub id) to ``out_dir``; return ``out_dir``.

    Idempotent: returns at once if ``is_current`` (unless ``force``). Files are written to a
    sibling staging directory and moved in with the manifest last, so an interrupted export is
    never taken for a complete one. Imports torch in this process.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    wanted = _normalise_towers(towers)
    out = Path(out_dir)
    if not force and is_current(model_dir, out, wanted, quantize):
        return out

    _quiet_transformers()
    fingerprint = _source_fingerprint(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.exporting-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        exported: dict[str, Any] = {}
        info: dict[str, Any] = {}
        for name in wanted:
            started = time.perf_counter()
            target = staging / TOWER_FILES[name]
            fp32 = staging / f"{name}.fp32.onnx" if quantize == "int8" else target
            meta = (_export_text if name == "text" else _export_vision)(model_dir, fp32)
            if quantize == "int8":
                _quantize_int8(fp32, target, INT8_OPTIONS)
                fp32.unlink()
            _save_ort_format(target, staging / ORT_FILES[name])
            info.update({k: v for k, v in meta.items() if k != "parameters"})
            exported[name] = {
                "file": TOWER_FILES[name],
                "bytes": target.stat().st_size,
                "ort_file": ORT_FILES[name],
                "ort_bytes": (staging / ORT_FILES[name]).stat().st_size,
                "output": TOWER_OUTPUTS[name],
                "parameters": meta["parameters"],
                "export_seconds": round(time.perf_counter() - started, 2),
            }
            log.info("exported %s tower of %s (%s) in %.1fs", name, model_dir, quantize, exported[name]["export_seconds"])
        tokenizer = _save_tokenizer(model_dir, staging / TOKENIZER_FILE)
        marker = Path(model_dir) / MARKER_FILE
        random_weights = marker.is_file()
        if random_weights:
            shutil.copyfile(marker, staging / MARKER_FILE)
        manifest = {
            "format": EXPORT_FORMAT,
            "source": model_dir,
            "source_fingerprint": fingerprint,
            "towers": exported,
            "quantization": quantize,
            "quantization_options": INT8_OPTIONS if quantize == "int8" else None,
            "projection_dim": info["projection_dim"],
            "max_length": info.get("max_length", 77),
            "image_size": info.get("image_size", 224),
            "preprocess": source_preprocess(model_dir).to_dict(),
            "tokenizer": tokenizer,
            "random_weights": random_weights,
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        out.mkdir(exist_ok=True)
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        if not random_weights:
            (out / MARKER_FILE).unlink(missing_ok=True)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
        tmp_manifest = out / f".{MANIFEST_FILE}.{uuid.uuid4().hex[:8]}"
        tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_manifest, out / MANIFEST_FILE)
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_in_subprocess(
    model_dir: str,
    out_dir: Path,
    towers: Sequence[str] = TOWERS,
    quantize: Quantize = "int8",
    *,
    timeout: float | None = 1800,
) -> Path:
    """``export_onnx`` in a child Python process, so this process never imports torch; return ``out_dir``.

    Skips the child if ``is_current``. Raises ``ExportError`` (with the child's stderr tail) on failure, and
    before starting a child that could not import torch, transformers or onnx (the ``export`` extra).
    """
    wanted = _normalise_towers(towers)
    out = Path(out_dir)
    if is_current(model_dir, out, wanted, quantize):
        return out
    if missing := missing_extra(f"exporting {model_dir} to ONNX", EXPORT_MODULES):
        raise ExportError(missing)
    cmd = [
        sys.executable,
        "-m",
        "consumer.tools.onnx_export",
        "--model",
        model_dir,
        "--out",
        str(out),
        "--towers",
        ",".join(wanted),
        "--quantize",
        quantize,
    ]
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise ExportError(f"ONNX export of {model_dir} timed out after {timeout}s") from exc
    if proc.returncode != 0 or not is_current(model_dir, out, wanted, quantize):
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise ExportError(f"ONNX export of {model_dir} failed (exit {proc.returncode}):\n{tail}")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the output directory, tower file sizes and the time taken."""
    parser = argparse.ArgumentParser(prog="python -m consumer.tools.onnx_export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model directory or hub id")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--towers", default=",".join(TOWERS), help="comma-separated subset of text,vision")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="int8")
    parser.add_argument("--force", action="store_true", help="export even if the manifest matches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    try:
        towers = _normalise_towers(args.towers)
    except ValueError as exc:
        parser.error(str(exc))
    if (args.force or not is_current(args.model, args.out, towers, args.quantize)) and (
        missing := missing_extra("clip-search-export-onnx", EXPORT_MODULES)
    ):
        parser.exit(1, missing + "\n")

    started = time.perf_counter()
    try:
        out = export_onnx(args.model, args.out, towers, args.quantize, force=args.force)
    except ValueError as exc:
        parser.error(str(exc))
    manifest = read_manifest(out)
    sizes = " ".join(f"{n}={t['bytes'] / 1e6:.1f}MB" for n, t in (manifest.get("towers") or {}).items())
    print(f"{out} quantize={args.quantize} {sizes} {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

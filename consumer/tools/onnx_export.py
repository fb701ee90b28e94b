"""Export CLIP's text and vision towers to ONNX, optionally with weight int8 dynamic quantization.

(One tool, about 580 lines: tracing, quantization with its fidelity check and fallback, the ORT-format
copy, the manifest and the child-process runner are the steps of one export and share its staging
directory; the probe set and its measures live in ``consumer.tools.fidelity``.)

Usage::

    python -m consumer.tools.onnx_export --model DIR_OR_HUB_ID --out DIR [--towers text,vision] [--quantize int8|none]
        [--quantize-text int8|none] [--quantize-vision int8|none] [--min-cosine 0.99]

The output directory holds ``text.onnx`` (inputs ``input_ids``, ``attention_mask``: int64
[batch, sequence]; output ``text_embeds``: float32 [batch, projection_dim]), ``vision.onnx``
(input ``pixel_values``: float32 [batch, 3, S, S]; output ``image_embeds``), ``text.ort`` /
``vision.ort`` (the same graphs in ORT format with extended optimisations applied, for
memory-mapped loading by the same onnxruntime version), the source's ``tokenizer.json``, the
``export.json`` manifest (written last) and, for random-weights sources, a copy of
``random_weights.json``. Embeddings are not normalised.

Every export checks each tower against its source model on a fixed probe set
(``consumer.tools.fidelity``) and records the figures in the manifest's ``fidelity`` section. An int8
tower whose minimum cosine is below ``min_cosine`` falls back: first to int8 with the outlier MatMuls
(``fidelity.outlier_matmuls``) left in fp32, re-checked; if still below, to fp32. One WARNING line says
which tower, the cosine measured and what it fell back to; the manifest says what was finally used.

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from consumer.encoder.extras import EXPORT_MODULES, missing_extra
from consumer.encoder.images import PREPROCESSOR_FILE
from consumer.encoder.manifest import MANIFEST_FILE, TOKENIZER_FILE, read_manifest, source_preprocess
from consumer.tools.fidelity import Fidelity, Probe, compare, outlier_matmuls, run_onnx, run_torch, text_probe, vision_probe

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
TowerQuantize = Quantize | Mapping[str, Quantize]
"""One quantization for every tower, or one per tower name."""
DEFAULT_MIN_COSINE = 0.99
FP32_MIN_COSINE = 0.999
"""An fp32 graph below this against its source is a broken trace, not a precision choice: the export fails."""


class ExportError(RuntimeError):
    """An export failed; the message carries the reason (and the child's stderr tail for subprocess exports)."""


def _source_fingerprint(model: str) -> dict[str, Any]:
    """Identify the source without loading it: a local directory's config hash, weight file stats and, when it
    has one, the hash of the image recipe (``preprocessor_config.json``: the manifest's ``preprocess``)."""
    directory = Path(model)
    if not directory.is_dir():
        return {"hub_id": model}
    config = directory / "config.json"
    weights = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    fingerprint: dict[str, Any] = {
        "path": str(directory.resolve()),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights],
    }
    if (recipe := directory / PREPROCESSOR_FILE).is_file():
        fingerprint["preprocessor_sha256"] = hashlib.sha256(recipe.read_bytes()).hexdigest()
    return fingerprint


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


def per_tower(quantize: TowerQuantize, towers: Sequence[str] = TOWERS) -> dict[str, Quantize]:
    """``quantize`` as one choice per tower of ``towers``; raises ValueError for an unknown choice or a missing tower."""
    chosen: dict[str, Quantize] = dict.fromkeys(towers, quantize) if isinstance(quantize, str) else {t: quantize[t] for t in towers}
    if bad := {t: q for t, q in chosen.items() if q not in QUANTIZATIONS}:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {bad}")
    return chosen


def is_current(
    model_dir: str,
    out_dir: str | os.PathLike[str],
    towers: Sequence[str] = TOWERS,
    quantize: TowerQuantize = "int8",
    min_cosine: float = DEFAULT_MIN_COSINE,
) -> bool:
    """True iff ``out_dir`` already holds an export of ``model_dir`` with at least ``towers``, each requested at
    its ``quantize`` choice and checked against ``min_cosine``.

    Matches on export format, each tower's requested quantization (and the int8 options), the fidelity
    threshold, the source fingerprint (local directory: config hash + weight file sizes/mtimes; hub id:
    the id) and the tower files' sizes. A tower that fell back still matches what was requested, so a
    fallback is not re-tried on every start. Never imports torch.
    """
    try:
        manifest = read_manifest(out_dir)
    except (OSError, ValueError):
        return False
    wanted = _normalise_towers(towers)
    requested = per_tower(quantize, wanted)
    if (
        manifest.get("format") != EXPORT_FORMAT
        or ("int8" in requested.values() and manifest.get("quantization_options") != INT8_OPTIONS)
        or manifest.get("source_fingerprint") != _source_fingerprint(model_dir)
    ):
        return False
    exported = manifest.get("towers") or {}
    fidelity = manifest.get("fidelity") or {}
    out = Path(out_dir)
    for name in wanted:
        entry = exported.get(name)
        if not entry or entry.get("requested") != requested[name] or (fidelity.get(name) or {}).get("threshold") != min_cosine:
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


def _export_text(model_dir: str, path: Path, probe: Probe) -> dict[str, Any]:
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
    tower = TextTower()
    _trace_to_onnx(
        tower,
        (input_ids, attention_mask),
        path,
        {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
        {"text_embeds": {0: "batch"}},
    )
    return {
        "projection_dim": int(model.config.projection_dim),
        "max_length": int(cfg.max_position_embeddings),
        "parameters": sum(p.numel() for p in model.parameters()),
        **_timed_reference(tower, probe),
    }


def _export_vision(model_dir: str, path: Path, probe: Callable[[int], Probe]) -> dict[str, Any]:
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
    tower = VisionTower()
    _trace_to_onnx(tower, (torch.zeros(2, 3, size, size),), path, {"pixel_values": {0: "batch"}}, {"image_embeds": {0: "batch"}})
    images = probe(size)
    return {
        "projection_dim": int(model.config.projection_dim),
        "image_size": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        **_timed_reference(tower, images),
        "probe": images,
    }


def _quantize_int8(src: Path, dst: Path, options: dict[str, Any], exclude: Sequence[str] = ()) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType[options["weight_type"]],
        per_channel=options["per_channel"],
        reduce_range=options["reduce_range"],
        op_types_to_quantize=options["op_types_to_quantize"],
        nodes_to_exclude=list(exclude),
    )


def _timed_reference(tower: Any, probe: Probe) -> dict[str, Any]:
    started = time.perf_counter()
    reference = run_torch(tower, probe)
    return {"reference": reference, "reference_seconds": time.perf_counter() - started}


def _settle_tower(name: str, fp32: Path, target: Path, want: Quantize, reference: Any, probe: Probe, min_cosine: float) -> dict[str, Any]:
    """Write ``name``'s final graph to ``target`` (from the fp32 graph ``fp32``, consumed) and return its fidelity entry.

    ``want`` int8: quantize and check; below ``min_cosine`` (minimum cosine over the probe catalog), retry
    with the outlier MatMuls excluded, then fall back to fp32. The entry names what was finally used.
    """
    attempts: list[dict[str, Any]] = []

    def check(used: str) -> Fidelity:
        started = time.perf_counter()
        fid = compare(reference, run_onnx(target, probe), probe.queries)
        attempts.append({"quantization": used, **fid.to_dict(), "seconds": round(time.perf_counter() - started, 2)})
        return fid

    fallback: dict[str, Any] | None = None
    if want == "int8":
        _quantize_int8(fp32, target, INT8_OPTIONS)
        fid = check("int8")
        if fid.min_cosine >= min_cosine:
            fp32.unlink()
            return {**fid.to_dict(), "quantization": "int8", "fallback": None, "threshold": min_cosine, "attempts": attempts}
        fallback = {"from": "int8", "min_cosine": round(fid.min_cosine, 6), "excluded_nodes": []}
        if excluded := outlier_matmuls(fp32, probe):
            _quantize_int8(fp32, target, INT8_OPTIONS, excluded)
            fid = check("int8-partial")
            fallback["excluded_nodes"] = excluded
            if fid.min_cosine >= min_cosine:
                fp32.unlink()
                log.warning(
                    "%s tower: int8 min cosine %.4f < EXPORT_MIN_COSINE %s against the source model; fell back to int8 with %d "
                    "outlier MatMul(s) in fp32 (min cosine %.4f)",
                    name,
                    fallback["min_cosine"],
                    min_cosine,
                    len(excluded),
                    fid.min_cosine,
                )
                return {
                    **fid.to_dict(),
                    "quantization": "int8-partial",
                    "fallback": fallback | {"to": "int8-partial"},
                    "threshold": min_cosine,
                    "attempts": attempts,
                }
    os.replace(fp32, target)
    fid = check("none")
    if fid.min_cosine < FP32_MIN_COSINE:
        raise ExportError(
            f"{name} tower: the fp32 ONNX graph does not reproduce the source model (min cosine {fid.min_cosine:.6f} on the probe set)"
        )
    if fallback is not None:
        fallback["to"] = "none"
        log.warning(
            "%s tower: int8 min cosine %.4f < EXPORT_MIN_COSINE %s against the source model%s; fell back to fp32 (min cosine %.6f)",
            name,
            fallback["min_cosine"],
            min_cosine,
            f" ({len(fallback['excluded_nodes'])} outlier MatMul(s) excluded: {attempts[1]['min_cosine']:.4f})"
            if len(attempts) == 3
            else "",
            fid.min_cosine,
        )
    elif fid.min_cosine < min_cosine:
        log.warning("%s tower: fp32 min cosine %.6f < EXPORT_MIN_COSINE %s; nothing to fall back to", name, fid.min_cosine, min_cosine)
    return {**fid.to_dict(), "quantization": "none", "fallback": fallback, "threshold": min_cosine, "attempts": attempts}


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
    quantize: TowerQuantize = "int8",
    *,
    min_cosine: float = DEFAULT_MIN_COSINE,
    force: bool = False,
) -> Path:
    """Export ``towers`` of the CLIP ``model_dir`` (local directory or hub id) to ``out_dir``; return ``out_dir``.

    ``quantize``: one choice for all towers or one per tower; each int8 tower is checked against the
    source and falls back below ``min_cosine`` (module docstring). Idempotent: returns at once if
    ``is_current`` (unless ``force``). Files are written to a
    sibling staging directory and moved in with the manifest last, so an interrupted export is
    never taken for a complete one. Imports torch in this process.
    """
    wanted = _normalise_towers(towers)
    requested = per_tower(quantize, wanted)
    if not 0.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in [0, 1], got {min_cosine}")
    out = Path(out_dir)
    if not force and is_current(model_dir, out, wanted, requested, min_cosine):
        return out

    _quiet_transformers()
    fingerprint = _source_fingerprint(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.exporting-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        exported: dict[str, Any] = {}
        fidelity: dict[str, Any] = {}
        info: dict[str, Any] = {}
        for name in wanted:
            started = time.perf_counter()
            target = staging / TOWER_FILES[name]
            fp32 = staging / f"{name}.fp32.onnx"
            if name == "text":
                probe = text_probe(model_dir)
                meta = _export_text(model_dir, fp32, probe)
            else:
                meta = _export_vision(model_dir, fp32, lambda size: vision_probe(model_dir, size))
                probe = meta["probe"]
            fidelity[name] = _settle_tower(name, fp32, target, requested[name], meta["reference"], probe, min_cosine)
            fidelity[name]["reference_seconds"] = round(meta["reference_seconds"], 2)
            _save_ort_format(target, staging / ORT_FILES[name])
            info.update({k: v for k, v in meta.items() if k not in ("parameters", "reference", "reference_seconds", "probe")})
            exported[name] = {
                "file": TOWER_FILES[name],
                "bytes": target.stat().st_size,
                "ort_file": ORT_FILES[name],
                "ort_bytes": (staging / ORT_FILES[name]).stat().st_size,
                "output": TOWER_OUTPUTS[name],
                "parameters": meta["parameters"],
                "requested": requested[name],
                "quantization": fidelity[name]["quantization"],
                "export_seconds": round(time.perf_counter() - started, 2),
            }
            log.info(
                "exported %s tower of %s (%s) in %.1fs; min cosine to the source %.4f",
                name,
                model_dir,
                exported[name]["quantization"],
                exported[name]["export_seconds"],
                fidelity[name]["min_cosine"],
            )
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
            "quantization": next(iter(set(requested.values()))) if len(set(requested.values())) == 1 else "mixed",
            "quantization_options": INT8_OPTIONS if "int8" in requested.values() else None,
            "fidelity": fidelity,
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
    quantize: TowerQuantize = "int8",
    *,
    min_cosine: float = DEFAULT_MIN_COSINE,
    timeout: float | None = 1800,
) -> Path:
    """``export_onnx`` in a child Python process, so this process never imports torch; return ``out_dir``.

    Skips the child if ``is_current``. Raises ``ExportError`` (with the child's stderr tail) on failure, and
    before starting a child that could not import torch, transformers or onnx (the ``export`` extra).
    """
    wanted = _normalise_towers(towers)
    requested = per_tower(quantize, wanted)
    out = Path(out_dir)
    if is_current(model_dir, out, wanted, requested, min_cosine):
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
        "--min-cosine",
        repr(min_cosine),
        *(arg for name in wanted for arg in (f"--quantize-{name}", requested[name])),
    ]
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise ExportError(f"ONNX export of {model_dir} timed out after {timeout}s") from exc
    if proc.returncode != 0 or not is_current(model_dir, out, wanted, requested, min_cosine):
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise ExportError(f"ONNX export of {model_dir} failed (exit {proc.returncode}):\n{tail}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments; quantization and threshold default to the service's own variables, so a one-shot
    export given the replicas' environment writes the export they find current."""
    parser = argparse.ArgumentParser(prog="python -m consumer.tools.onnx_export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model directory or hub id")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--towers", default=",".join(TOWERS), help="comma-separated subset of text,vision")
    env = os.environ
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=env.get("ONNX_QUANTIZE") or "int8",
        help="default of --quantize-text and --quantize-vision (default: $ONNX_QUANTIZE, else int8)",
    )
    for name in TOWERS:
        parser.add_argument(
            f"--quantize-{name}",
            choices=QUANTIZATIONS,
            default=env.get(f"ONNX_QUANTIZE_{name.upper()}") or None,
            help=f"the {name} tower's quantization (default: $ONNX_QUANTIZE_{name.upper()}, else --quantize)",
        )
    parser.add_argument(
        "--min-cosine",
        type=float,
        default=float(env.get("EXPORT_MIN_COSINE") or DEFAULT_MIN_COSINE),
        help="an int8 tower below this minimum cosine to the source falls back (default: $EXPORT_MIN_COSINE, else 0.99)",
    )
    parser.add_argument("--force", action="store_true", help="export even if the manifest matches")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the output directory, tower file sizes and the time taken."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    try:
        towers = _normalise_towers(args.towers)
    except ValueError as exc:
        parser.error(str(exc))
    quantize: dict[str, Quantize] = {name: getattr(args, f"quantize_{name}") or args.quantize for name in towers}
    if (args.force or not is_current(args.model, args.out, towers, quantize, args.min_cosine)) and (
        missing := missing_extra("clip-search-export-onnx", EXPORT_MODULES)
    ):
        parser.exit(1, missing + "\n")

    started = time.perf_counter()
    try:
        out = export_onnx(args.model, args.out, towers, quantize, min_cosine=args.min_cosine, force=args.force)
    except ValueError as exc:
        parser.error(str(exc))
    manifest = read_manifest(out)
    fidelity = manifest.get("fidelity") or {}
    sizes = " ".join(
        f"{n}={t['bytes'] / 1e6:.1f}MB({t.get('quantization')},min_cos={(fidelity.get(n) or {}).get('min_cosine')})"
        for n, t in (manifest.get("towers") or {}).items()
    )
    print(f"{out} {sizes} {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

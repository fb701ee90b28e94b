"""ONNX Runtime backend for ``consumer.encoder.encoder.Encoder``; never imports torch or transformers.

Reads a directory written by ``consumer.tools.onnx_export``. For each tower it loads ``<tower>.ort``
memory-mapped (weights stay in file-backed, shareable pages; no load-time copy) when that file
exists and was written by the running onnxruntime version, else ``<tower>.onnx``. Inputs are run
in chunks of at most ``max_batch`` rows, which bounds the activation memory of one call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from consumer.encoder.images import ImagePreprocess
from consumer.encoder.manifest import TOKENIZER_FILE, manifest_preprocess, read_manifest

log = logging.getLogger(__name__)

DEFAULT_EOS_TOKEN = "<|endoftext|>"


def session_options(threads: int | None, *, arena: bool = True, mmap: bool = False) -> ort.SessionOptions:
    """Session options used by the towers: sequential, one inter-op thread, ``threads`` intra-op threads.

    Idle worker threads sleep instead of spinning: several sessions share the cores (text and
    vision towers, the int8 ranking kernel), and spinning threads of one starve the next.

    ``mmap`` adds the settings that load an ORT-format file memory-mapped with its initializers
    used in place (pre-packing off, since it would copy the weights into anonymous memory).
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = arena
    so.enable_mem_pattern = False
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if mmap:
        so.add_session_config_entry("session.load_model_format", "ORT")
        so.add_session_config_entry("session.use_memory_mapped_ort_model", "1")
        so.add_session_config_entry("session.use_ort_model_bytes_for_initializers", "1")
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


class _OrtTower:
    """One ONNX Runtime session; ``nbytes`` is the size of the model file it was loaded from."""

    def __init__(
        self,
        onnx_dir: Path,
        manifest: dict[str, Any],
        name: str,
        threads: int | None,
        max_batch: int,
        arena: bool,
        arena_shrink: bool,
        mmap: bool,
    ) -> None:
        entry = manifest["towers"].get(name)
        if not entry:
            raise FileNotFoundError(f"{onnx_dir} has no exported {name} tower (towers: {sorted(manifest['towers'])})")
        self.max_batch = max_batch
        self.session, self.path = self._open(onnx_dir, manifest, entry, threads, arena, mmap)
        self.nbytes = self.path.stat().st_size
        self.output = entry.get("output")
        self._run_options = ort.RunOptions()
        if arena and arena_shrink:
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @staticmethod
    def _open(
        onnx_dir: Path, manifest: dict[str, Any], entry: dict[str, Any], threads: int | None, arena: bool, mmap: bool
    ) -> tuple[ort.InferenceSession, Path]:
        ort_file = entry.get("ort_file")
        same_runtime = (manifest.get("versions") or {}).get("onnxruntime") == ort.__version__
        if mmap and ort_file and same_runtime and (onnx_dir / ort_file).is_file():
            path = onnx_dir / ort_file
            try:
                opts = session_options(threads, arena=arena, mmap=True)
                return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), path
            except Exception as exc:  # noqa: BLE001 - any load failure falls back to the portable file
                log.warning("could not load %s (%s); falling back to %s", path, exc, entry["file"])
        path = onnx_dir / entry["file"]
        opts = session_options(threads, arena=arena, mmap=False)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), path

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        out = self.session.run([self.output] if self.output else None, feeds, self._run_options)[0]
        return np.asarray(out, dtype=np.float32)


class OnnxTextTower(_OrtTower):
    """Text tower: ``encode(texts)`` -> float32 [len(texts), dim], not normalised."""

    def __init__(self, onnx_dir: Path, manifest: dict[str, Any], threads: int | None, **kw: Any) -> None:
        super().__init__(onnx_dir, manifest, "text", threads, **kw)
        self.tokenizer = Tokenizer.from_file(str(onnx_dir / TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=int(manifest.get("max_length", 77)))
        special = manifest.get("tokenizer") or {}
        pad_id = special.get("pad_token_id")
        if pad_id is None:
            pad_id = self.tokenizer.token_to_id(special.get("eos_token") or DEFAULT_EOS_TOKEN)
        if pad_id is None:
            raise ValueError(f"{onnx_dir / TOKENIZER_FILE} has no pad or end-of-text token")
        self.pad_id = int(pad_id)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """CLIP token ids (bos ... eos, truncated to the model's context length), one list per text."""
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: np.ndarray | None = None
        for start in range(0, len(order), self.max_batch):
            chunk = order[start : start + self.max_batch]
            width = max(len(ids[i]) for i in chunk)
            input_ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            emb = self._run({"input_ids": input_ids, "attention_mask": mask})
            if out is None:
                out = np.empty((len(ids), emb.shape[1]), dtype=np.float32)
            out[chunk] = emb
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


class OnnxVisionTower(_OrtTower):
    """Vision tower: ``encode(pixels float32 [n, 3, S, S])`` -> float32 [n, dim], not normalised."""

    def __init__(self, onnx_dir: Path, manifest: dict[str, Any], threads: int | None, **kw: Any) -> None:
        super().__init__(onnx_dir, manifest, "vision", threads, **kw)
        self.image_size = manifest_preprocess(manifest).image_size

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels, dtype=np.float32)
        size = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"pixels must be [n, 3, {size}, {size}], got {list(pixels.shape)}")
        parts = [
            self._run({"pixel_values": np.ascontiguousarray(pixels[i : i + self.max_batch])}) for i in range(0, len(pixels), self.max_batch)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


class OnnxBackend:
    """``Backend`` over an ``onnx_export`` directory.

    ``threads``: intra-op threads per session (None: onnxruntime's default, one per core);
    ``vision_threads`` overrides it for the vision tower.
    ``max_batch``: rows per session run (8 bounds a 77-token text batch's activations at ~30 MB
    with no measurable throughput loss). ``arena``: ORT's CPU arena (lower peak than plain
    malloc here, see benchmarks/onnx_levers.py); ``arena_shrink`` returns the arena's free
    chunks after every run so an idle tower holds no activation memory. ``mmap``: prefer the
    memory-mapped ``.ort`` file when present.
    """

    name = "onnx"

    def __init__(
        self,
        onnx_dir: str,
        threads: int | None = None,
        *,
        vision_threads: int | None = None,
        max_batch: int = 8,
        arena: bool = True,
        arena_shrink: bool = True,
        mmap: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.onnx_dir = Path(onnx_dir)
        self.threads = threads
        self.vision_threads = vision_threads or threads
        self.manifest = read_manifest(self.onnx_dir)
        self._tower_kw = {"max_batch": max_batch, "arena": arena, "arena_shrink": arena_shrink, "mmap": mmap}
        self.preprocess: ImagePreprocess = manifest_preprocess(self.manifest)

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest.get("random_weights"))

    def load_text(self) -> OnnxTextTower:
        return OnnxTextTower(self.onnx_dir, self.manifest, self.threads, **self._tower_kw)

    def load_vision(self) -> OnnxVisionTower:
        return OnnxVisionTower(self.onnx_dir, self.manifest, self.vision_threads, **self._tower_kw)

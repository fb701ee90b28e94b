"""A model's metadata, read without torch, transformers or onnxruntime: the source's ``config.json``
and the ONNX export's manifest.

``embedding_dim`` (the feature width an index is sized with) comes from the source model's config;
``read_manifest`` reads the ``export.json`` that ``consumer.tools.onnx_export`` writes last into an
export directory and ``consumer.encoder.onnx_backend`` loads from. Both the serving path and the
exporter import this module, so it must stay free of heavy imports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST_FILE = "export.json"
TOKENIZER_FILE = "tokenizer.json"
"""The tokenizer an export carries next to its manifest (text tower only)."""


def read_manifest(onnx_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The export manifest of ``onnx_dir``; raises OSError (e.g. FileNotFoundError) / ValueError if missing or malformed."""
    path = Path(onnx_dir) / MANIFEST_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "towers" not in data:
        raise ValueError(f"{path} is not an ONNX export manifest")
    return data


def model_config(model: str) -> dict[str, Any]:
    """The model's ``config.json`` without importing torch: a local directory, or one small hub download."""
    local = Path(model) / "config.json"
    config: dict[str, Any]
    if local.is_file():
        config = json.loads(local.read_text())
        return config
    from huggingface_hub import hf_hub_download

    config = json.loads(Path(hf_hub_download(model, "config.json")).read_text())  # nosec B615  # CLIP_MODEL is operator configuration; pin it with a local snapshot directory (README: Security)
    return config


def embedding_dim(model: str) -> int:
    """Projection (embedding) dimension of the CLIP ``model`` (a local directory or a hub id)."""
    return int(model_config(model)["projection_dim"])

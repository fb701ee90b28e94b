"""A model's metadata, read without torch, transformers or onnxruntime: the source's ``config.json``
and the ONNX export's manifest.

``embedding_dim`` (the feature width an index is sized with) comes from the source model's config;
``read_manifest`` reads the ``export.json`` that ``consumer.tools.onnx_export`` writes last into an
export directory and ``consumer.encoder.onnx_backend`` loads from. Both the serving path and the
exporter import this module, so it must stay free of heavy imports.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from consumer.encoder.images import OPENAI_CLIP, PREPROCESSOR_FILE, ImagePreprocess

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


def _model_json(model: str, filename: str) -> dict[str, Any]:
    local = Path(model) / filename
    config: dict[str, Any]
    if local.is_file():
        config = json.loads(local.read_text())
        return config
    from huggingface_hub import hf_hub_download

    config = json.loads(Path(hf_hub_download(model, filename)).read_text())  # nosec B615  # CLIP_MODEL is operator configuration; pin it with a local snapshot directory (README: Security)
    return config


def model_config(model: str) -> dict[str, Any]:
    """The model's ``config.json`` without importing torch: a local directory, or one small hub download."""
    return _model_json(model, "config.json")


def source_preprocess(model: str) -> ImagePreprocess:
    """The image recipe of the CLIP ``model`` (local directory or hub id) from its ``preprocessor_config.json``.

    A local directory without that file gets ``OPENAI_CLIP`` sized to the vision config's ``image_size``;
    raises ValueError for a recipe ``ImagePreprocess`` cannot reproduce or whose crop is not the tower's input size.
    """
    size = int(model_config(model).get("vision_config", {}).get("image_size", OPENAI_CLIP.image_size))
    if Path(model).is_dir() and not (Path(model) / PREPROCESSOR_FILE).is_file():
        return manifest_preprocess({"image_size": size})
    recipe = ImagePreprocess.from_processor_config(_model_json(model, PREPROCESSOR_FILE))
    if recipe.image_size != size:
        raise ValueError(f"{model}: {PREPROCESSOR_FILE} crops {recipe.image_size} px but the vision tower takes {size} px")
    return recipe


def manifest_preprocess(manifest: dict[str, Any]) -> ImagePreprocess:
    """The image recipe an export manifest records; an older manifest without one gets ``OPENAI_CLIP`` at its ``image_size``."""
    if "preprocess" in manifest:
        return ImagePreprocess.from_dict(manifest["preprocess"])
    size = int(manifest.get("image_size", OPENAI_CLIP.image_size))
    return OPENAI_CLIP if size == OPENAI_CLIP.image_size else dataclasses.replace(OPENAI_CLIP, image_size=size, shortest_edge=size)


def embedding_dim(model: str) -> int:
    """Projection (embedding) dimension of the CLIP ``model`` (a local directory or a hub id)."""
    return int(model_config(model)["projection_dim"])

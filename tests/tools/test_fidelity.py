"""Export fidelity: the probe set, the figures in the manifest, the fallback on outlier weights,
per-tower quantization, and the metrics that expose the figures."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import load_file, save_file

from consumer.app import build_encoder, onnx_dir_for
from consumer.config.settings import Settings
from consumer.encoder.encoder import Encoder
from consumer.encoder.manifest import read_manifest
from consumer.encoder.onnx_backend import OnnxBackend
from consumer.ops.metrics import ServiceMetrics
from consumer.tools import fidelity, onnx_export
from consumer.tools.onnx_export import export_onnx, is_current

TOWERS = ("text", "vision")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_probe_assets_are_small_and_complete() -> None:
    texts = fidelity.probe_texts()
    images = fidelity.probe_images()
    assert len(texts) == 64 and len(set(texts)) == 64
    assert len(images) == fidelity.PROBE_IMAGE_COUNT
    assert all(img.shape == (fidelity.PROBE_IMAGE_SIZE, fidelity.PROBE_IMAGE_SIZE, 3) for img in images)
    assert len({img.tobytes() for img in images}) == len(images)
    assert sum(p.stat().st_size for p in fidelity.PROBE_DIR.rglob("*") if p.is_file()) < 200_000


def test_probe_images_are_regenerated_identically(tmp_path: Path) -> None:
    fidelity.write_probe_images(tmp_path)
    regenerated = [np.asarray(fidelity.Image.open(p).convert("RGB")) for p in sorted(tmp_path.glob("*.png"))]
    assert all(np.array_equal(a, b) for a, b in zip(regenerated, fidelity.probe_images(), strict=True))


def test_compare_of_identical_embeddings_is_perfect() -> None:
    ref = np.random.default_rng(0).normal(size=(40, 8))
    fid = fidelity.compare(ref, ref * 3.0, queries=10)
    assert fid.min_cosine == pytest.approx(1.0) and fid.mean_cosine == pytest.approx(1.0) and fid.recall_at_10 == 1.0


def test_compare_counts_lost_neighbours_and_the_worst_row() -> None:
    """Query 0's nearest neighbour (row 1) turned around: query 0 keeps none of its top-1, query 2 keeps its own."""
    ref = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    cand = ref.copy()
    cand[1] = -cand[1]
    fid = fidelity.compare(ref, cand, queries=3, k=1)
    assert fid.min_cosine == pytest.approx(-1.0)
    assert fid.mean_cosine == pytest.approx(0.5)
    # query 0: top-1 was row 1, now row 3 -> 0; query 1: top-1 was row 0, now row 2 (or 3) -> 0; query 2: row 3 both -> 1
    assert fid.recall_at_10 == pytest.approx(1 / 3)


def test_tower_quantization_defaults_to_onnx_quantize() -> None:
    assert Settings(onnx_quantize="none", _env_file=None).tower_quantization == {"text": "none", "vision": "none"}
    both = Settings(onnx_quantize="none", onnx_quantize_vision="int8", _env_file=None)
    assert both.tower_quantization == {"text": "none", "vision": "int8"}
    assert onnx_dir_for(both).name.endswith("-text-none-vision-int8")
    assert onnx_dir_for(Settings(onnx_quantize="int8", _env_file=None)).name.endswith("-int8")


def test_every_export_records_its_fidelity(tiny_model: str, tiny_exports: dict[str, Path]) -> None:
    for quantize, out in tiny_exports.items():
        assert quantize in ("int8", "none")
        manifest = read_manifest(out)
        for tower in TOWERS:
            fid = manifest["fidelity"][tower]
            assert manifest["towers"][tower]["quantization"] == manifest["towers"][tower]["requested"] == quantize
            assert fid["quantization"] == quantize and fid["fallback"] is None and fid["threshold"] == 0.99
            assert 0.99 <= fid["min_cosine"] <= fid["mean_cosine"] <= 1.0 + 1e-6
            assert 0.0 <= fid["recall_at_10"] <= 1.0
            if quantize == "none":
                assert fid["min_cosine"] >= 0.9999 and fid["recall_at_10"] >= 0.9
        assert is_current(tiny_model, out, quantize=quantize, min_cosine=0.99)
        assert not is_current(tiny_model, out, quantize=quantize, min_cosine=0.995)


def _scale_channels(weights: dict[str, np.ndarray], prefix: str, channels: int, factor: float) -> None:
    for name in (f"{prefix}.weight", f"{prefix}.bias"):
        weights[name] = weights[name].copy()
        weights[name][:channels] *= factor


@pytest.fixture(scope="module")
def outlier_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with a few LayerNorm channels scaled up: activation outliers as real CLIP checkpoints have them.

    Vision: one channel of layer 0's first LayerNorm (input of q/k/v) x100. Text: two channels of both layers'
    second LayerNorm (input of fc1) x30, which spreads into the residual stream.
    """
    model = tmp_path_factory.mktemp("outlier") / "model"
    shutil.copytree(tiny_model, model)
    weights = load_file(model / "model.safetensors")
    _scale_channels(weights, "vision_model.encoder.layers.0.layer_norm1", 1, 100.0)
    for layer in (0, 1):
        _scale_channels(weights, f"text_model.encoder.layers.{layer}.layer_norm2", 2, 30.0)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return str(model)


@pytest.fixture(scope="module")
def outlier_export(outlier_model: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An int8 export of ``outlier_model`` and the WARNING lines it logged."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("consumer.tools.onnx_export")
    logger.addHandler(handler)
    try:
        out = export_onnx(outlier_model, tmp_path_factory.mktemp("outlier-onnx") / "onnx", quantize="int8")
    finally:
        logger.removeHandler(handler)
    return out, [r.getMessage() for r in records]


@pytest.mark.slow
def test_outlier_weights_make_the_check_fire_and_fall_back(outlier_model: str, outlier_export: tuple[Path, list[str]]) -> None:
    out, warnings = outlier_export
    manifest = read_manifest(out)
    text, vision = manifest["fidelity"]["text"], manifest["fidelity"]["vision"]

    # Vision: int8 below the threshold; int8 with layer 0's q/k/v (the outlier's readers) in fp32 passes.
    assert vision["quantization"] == manifest["towers"]["vision"]["quantization"] == "int8-partial"
    assert vision["fallback"]["from"] == "int8" and vision["fallback"]["to"] == "int8-partial"
    assert vision["fallback"]["min_cosine"] < 0.99 <= vision["min_cosine"]
    excluded = vision["fallback"]["excluded_nodes"]
    assert {n.rsplit("/", 2)[-2] for n in excluded} == {"q_proj", "k_proj", "v_proj"} and all("layers.0" in n for n in excluded)

    # Text: neither int8 nor int8 without its outlier MatMul is faithful; fp32 is served.
    assert text["quantization"] == manifest["towers"]["text"]["quantization"] == "none"
    assert manifest["towers"]["text"]["requested"] == "int8"
    assert text["fallback"]["from"] == "int8" and text["fallback"]["to"] == "none" and text["fallback"]["min_cosine"] < 0.99
    assert text["attempts"][0]["quantization"] == "int8" and text["attempts"][-1]["quantization"] == "none"
    assert text["min_cosine"] >= 0.9999

    assert len(warnings) == 2
    assert any(w.startswith("text tower: int8 min cosine") and "fell back to fp32" in w for w in warnings)
    assert any(
        w.startswith("vision tower: int8 min cosine") and "fell back to int8 with 3 outlier MatMul(s) in fp32" in w for w in warnings
    )
    assert is_current(outlier_model, out, quantize="int8")

    # The served text tower is the source model's (fp32), on texts inside and outside the probe set.
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    texts = [*fidelity.probe_texts()[:12], "an item that is not in the probe set", "x"]
    served = Encoder(OnnxBackend(str(out)), model_id="outlier").encode_text(texts)
    model = CLIPModel.from_pretrained(outlier_model).eval()
    tokens = CLIPTokenizer.from_pretrained(outlier_model)(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        features: Any = model.get_text_features(**tokens)
    reference = _unit(getattr(features, "pooler_output", features).numpy())
    assert np.min(np.sum(served * reference, axis=1)) >= 0.9999


@pytest.mark.slow
def test_metrics_expose_the_manifest_figures(outlier_export: tuple[Path, list[str]]) -> None:
    out, _ = outlier_export
    manifest = read_manifest(out)
    metrics = ServiceMetrics(search_topic="search", encoder=Encoder(OnnxBackend(str(out)), model_id="outlier"))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    values = {(f, tuple(sorted(s.labels.items()))): s.value for f in families for s in families[f].samples}
    for tower in TOWERS:
        fid = manifest["fidelity"][tower]
        assert values[("clip_search_export_fidelity_cosine", (("stat", "mean"), ("tower", tower)))] == fid["mean_cosine"]
        assert values[("clip_search_export_fidelity_cosine", (("stat", "min"), ("tower", tower)))] == fid["min_cosine"]
        assert values[("clip_search_export_fidelity_recall_at_10", (("tower", tower),))] == fid["recall_at_10"]
    assert values[("clip_search_export_quantized", (("tower", "text"),))] == 0
    assert values[("clip_search_export_quantized", (("tower", "vision"),))] == 1


def test_no_fidelity_metrics_without_an_export() -> None:
    class NoManifest:
        name = "torch"

    metrics = ServiceMetrics(search_topic="search", encoder=Encoder(NoManifest(), model_id="m"))  # type: ignore[arg-type]
    assert b"clip_search_export_" not in generate_latest(metrics.registry)


@pytest.mark.slow
def test_quantization_is_chosen_per_tower(tiny_model: str, tmp_path: Path) -> None:
    settings = Settings(
        clip_model=tiny_model, onnx_quantize="int8", onnx_quantize_text="none", model_cache_dir=str(tmp_path), _env_file=None
    )
    encoder = build_encoder(settings)
    out = onnx_dir_for(settings)
    manifest = read_manifest(out)
    assert {t: manifest["towers"][t]["quantization"] for t in TOWERS} == {"text": "none", "vision": "int8"}
    assert {t: manifest["fidelity"][t]["quantization"] for t in TOWERS} == {"text": "none", "vision": "int8"}
    assert manifest["quantization"] == "mixed"
    assert manifest["fidelity"]["text"]["min_cosine"] >= 0.9999
    assert encoder.model_id == f"{tiny_model}#onnx-int8"
    assert is_current(tiny_model, out, quantize={"text": "none", "vision": "int8"})
    assert not is_current(tiny_model, out, quantize="int8")
    assert not is_current(tiny_model, out, quantize={"text": "none", "vision": "int8"}, min_cosine=0.999)


@pytest.mark.slow
def test_export_min_cosine_setting_reaches_the_export_and_the_model_id(tiny_model: str, tmp_path: Path) -> None:
    """A threshold int8 cannot meet: the vision tower serves fp32, and stored features say so (no ``#onnx-int8``)."""
    settings = Settings(
        clip_model=tiny_model, onnx_quantize_text="none", export_min_cosine=0.99999, model_cache_dir=str(tmp_path), _env_file=None
    )
    encoder = build_encoder(settings)
    manifest = read_manifest(onnx_dir_for(settings))
    vision = manifest["fidelity"]["vision"]
    assert manifest["towers"]["vision"]["requested"] == "int8"
    assert vision["quantization"] == manifest["towers"]["vision"]["quantization"] == "none"
    assert vision["threshold"] == 0.99999
    assert vision["fallback"]["from"] == "int8" and vision["fallback"]["to"] == "none" and vision["fallback"]["min_cosine"] < 0.99999
    assert vision["min_cosine"] >= 0.9999
    assert encoder.model_id == tiny_model
    assert is_current(tiny_model, onnx_dir_for(settings), quantize=settings.tower_quantization, min_cosine=0.99999)


def test_export_cli_defaults_to_the_service_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNX_QUANTIZE", "none")
    monkeypatch.setenv("ONNX_QUANTIZE_VISION", "int8")
    monkeypatch.setenv("EXPORT_MIN_COSINE", "0.995")
    monkeypatch.delenv("ONNX_QUANTIZE_TEXT", raising=False)
    args = onnx_export.build_parser().parse_args(["--model", "m", "--out", "o"])
    assert (args.quantize, args.quantize_text, args.quantize_vision, args.min_cosine) == ("none", None, "int8", 0.995)
    explicit = onnx_export.build_parser().parse_args(["--model", "m", "--out", "o", "--quantize-vision", "none", "--min-cosine", "0.9"])
    assert (explicit.quantize_vision, explicit.min_cosine) == ("none", 0.9)

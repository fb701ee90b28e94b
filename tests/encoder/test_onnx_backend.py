"""Tests for ``consumer.tools.onnx_export`` and ``consumer.encoder.onnx_backend`` on the tiny random CLIP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consumer.encoder.encoder import Encoder
from consumer.encoder.images import clip_pixels
from consumer.encoder.manifest import MANIFEST_FILE, embedding_dim, read_manifest
from consumer.encoder.onnx_backend import OnnxBackend
from consumer.encoder.torch_backend import TorchBackend
from consumer.tools.model_builder import MARKER_FILE, is_random_model
from consumer.tools.onnx_export import INT8_OPTIONS, export_in_subprocess, export_onnx, is_current

REPO = Path(__file__).resolve().parents[2]
CATALOG_IMAGES = sorted((REPO / "producer_examples" / "catalog" / "images").glob("*.png"))

ADJECTIVES = ["red", "waterproof", "vintage", "wireless", "organic", "slim", "heavy-duty", "soft", "Compact", "LARGE"]
ITEMS = ["leather shoes", "desk lamp", "backpack", "smart watch", "coffee mug"]
TEXTS = [
    *[f"{a} {i}" for a in ADJECTIVES for i in ITEMS][:44],
    "",
    "a photo of a cat",
    "naïve café crème brûlée 😀",
    "  Extra   spaces\tand\nnewlines  ",
    "word " * 120,
    "Hello World!",
]


@pytest.fixture(scope="module")
def exports(tiny_exports: dict[str, Path]) -> dict[str, Path]:
    return tiny_exports


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    imgs = [clip_pixels(Image.open(p).convert("RGB")) for p in CATALOG_IMAGES]
    rng = np.random.default_rng(0)
    while len(imgs) < 8:
        imgs.append(clip_pixels(Image.fromarray(rng.integers(0, 256, (180, 260, 3), dtype=np.uint8))))
    return np.stack(imgs[:8])


@pytest.fixture(scope="module")
def torch_reference(tiny_model: str, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    encoder = Encoder(TorchBackend(tiny_model, threads=1), tiny_model)
    return encoder.encode_text(TEXTS), encoder.encode_images(pixels)


def onnx_encoder(onnx_dir: Path, **kw) -> Encoder:
    return Encoder(OnnxBackend(str(onnx_dir), threads=1, **kw), str(onnx_dir))


def test_export_layout_and_manifest(exports: dict[str, Path], tiny_model: str) -> None:
    for quantize, out in exports.items():
        names = {p.name for p in out.iterdir()}
        assert {"text.onnx", "vision.onnx", "text.ort", "vision.ort", "tokenizer.json", MANIFEST_FILE, MARKER_FILE} <= names
        manifest = read_manifest(out)
        assert manifest["quantization"] == quantize
        assert manifest["quantization_options"] == (INT8_OPTIONS if quantize == "int8" else None)
        assert manifest["projection_dim"] == 32 and embedding_dim(tiny_model) == 32
        assert set(manifest["towers"]) == {"text", "vision"}
        assert manifest["source"] == tiny_model and manifest["random_weights"] is True
        assert manifest["tokenizer"]["eos_token_id"] == 49407
        assert {"onnx", "onnxruntime", "torch"} <= set(manifest["versions"])
        assert is_random_model(out)
    int8, fp32 = (read_manifest(exports[q])["towers"]["text"]["bytes"] for q in ("int8", "none"))
    assert int8 < fp32


def test_export_is_idempotent(exports: dict[str, Path], tiny_model: str) -> None:
    out = exports["int8"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert is_current(tiny_model, out, ("text",), "int8")
    assert not is_current(tiny_model, out, ("text",), "none")
    assert export_onnx(tiny_model, out, quantize="int8") == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.slow  # a real ONNX export (the first in a process warms torch.onnx up: ~8 s)
def test_manifest_mismatch_triggers_reexport(exports: dict[str, Path], tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(exports["none"], out)
    manifest = read_manifest(out)
    manifest["source_fingerprint"]["config_sha256"] = "0" * 64
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert not is_current(tiny_model, out, quantize="none")
    export_onnx(tiny_model, out, towers=("text",), quantize="none")
    assert is_current(tiny_model, out, ("text",), "none")
    assert set(read_manifest(out)["towers"]) == {"text"}


def test_an_edited_image_recipe_makes_the_export_stale(exports: dict[str, Path], tiny_model: str, tmp_path: Path) -> None:
    source = tmp_path / "model"
    shutil.copytree(tiny_model, source)
    out = tmp_path / "export"
    shutil.copytree(exports["int8"], out)
    manifest = read_manifest(out)
    manifest["source_fingerprint"]["path"] = str(source.resolve())
    manifest["source_fingerprint"]["weights"] = [
        [name, size, (source / name).stat().st_mtime_ns] for name, size, _ in manifest["source_fingerprint"]["weights"]
    ]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert is_current(str(source), out, ("text", "vision"), "int8")
    recipe = source / "preprocessor_config.json"
    recipe.write_text(recipe.read_text().replace("0.48145466", "0.5"))
    assert not is_current(str(source), out, ("text", "vision"), "int8"), "a changed mean must re-export (the manifest's preprocess)"


def test_tokenization_matches_transformers(exports: dict[str, Path], tiny_model: str) -> None:
    from transformers import CLIPTokenizerFast

    reference = CLIPTokenizerFast.from_pretrained(tiny_model)
    tower = OnnxBackend(str(exports["none"])).load_text()
    expected = [reference(t, truncation=True, max_length=77)["input_ids"] for t in TEXTS]
    assert tower.tokenize(TEXTS) == expected
    assert max(len(ids) for ids in expected) == 77


@pytest.mark.parametrize("mmap", [True, False], ids=["ort-mmap", "onnx"])
def test_fp32_matches_torch(exports: dict[str, Path], torch_reference, pixels: np.ndarray, mmap: bool) -> None:
    text_ref, image_ref = torch_reference
    encoder = onnx_encoder(exports["none"], max_batch=7, mmap=mmap)
    text = encoder.encode_text(TEXTS)
    images = encoder.encode_images(pixels)
    assert text.dtype == np.float32 and text.shape == text_ref.shape
    np.testing.assert_allclose(text, text_ref, atol=1e-4)
    np.testing.assert_allclose(images, image_ref, atol=1e-4)
    expected_file = ".ort" if mmap else ".onnx"
    assert encoder.tower_bytes["text"] == (exports["none"] / f"text{expected_file}").stat().st_size


def test_int8_fidelity(exports: dict[str, Path], torch_reference, pixels: np.ndarray) -> None:
    text_ref, image_ref = torch_reference
    encoder = onnx_encoder(exports["int8"])
    text_cos = np.sum(encoder.encode_text(TEXTS) * text_ref, axis=1)
    image_cos = np.sum(encoder.encode_images(pixels) * image_ref, axis=1)
    assert len(TEXTS) == 50 and len(pixels) == 8
    assert text_cos.mean() >= 0.99, text_cos
    assert image_cos.mean() >= 0.99, image_cos


def test_batches_and_order_do_not_change_embeddings(exports: dict[str, Path]) -> None:
    one_batch = onnx_encoder(exports["none"], max_batch=64).encode_text(TEXTS)
    singles = onnx_encoder(exports["none"], max_batch=1).encode_text(TEXTS)
    reversed_ = onnx_encoder(exports["none"], max_batch=5).encode_text(TEXTS[::-1])[::-1]
    np.testing.assert_allclose(one_batch, singles, atol=1e-5)
    np.testing.assert_allclose(one_batch, reversed_, atol=1e-5)


def test_vision_threads_apply_to_the_vision_tower_only(exports: dict[str, Path]) -> None:
    backend = OnnxBackend(str(exports["int8"]), 2, vision_threads=1)
    assert backend.load_vision().session.get_session_options().intra_op_num_threads == 1
    assert backend.load_text().session.get_session_options().intra_op_num_threads == 2
    assert OnnxBackend(str(exports["int8"]), 2).load_vision().session.get_session_options().intra_op_num_threads == 2


def test_vision_rejects_wrong_shape(exports: dict[str, Path]) -> None:
    tower = OnnxBackend(str(exports["none"])).load_vision()
    with pytest.raises(ValueError, match="pixels must be"):
        tower.encode(np.zeros((1, 3, 64, 64), dtype=np.float32))


@pytest.mark.slow  # a real ONNX export
def test_missing_tower_raises(exports: dict[str, Path], tiny_model: str, tmp_path: Path) -> None:
    out = export_onnx(tiny_model, tmp_path / "text-only", towers=("text",), quantize="int8")
    backend = OnnxBackend(str(out))
    assert backend.load_text().encode(["ok"]).shape == (1, 32)
    with pytest.raises(FileNotFoundError, match="vision"):
        backend.load_vision()


def test_ort_file_from_another_runtime_falls_back_to_onnx(exports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(exports["int8"], out)
    manifest = read_manifest(out)
    manifest["versions"]["onnxruntime"] = "0.0.0"
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    tower = OnnxBackend(str(out)).load_text()
    assert tower.path.name == "text.onnx"


def test_serving_path_never_imports_torch(exports: dict[str, Path]) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from consumer.encoder.encoder import Encoder
        from consumer.encoder.manifest import read_manifest
        from consumer.encoder.onnx_backend import OnnxBackend
        encoder = Encoder(OnnxBackend({str(exports["int8"])!r}, threads=1), "tiny")
        assert encoder.encode_text(["a photo of a cat", "dog"]).shape == (2, read_manifest({str(exports["int8"])!r})["projection_dim"])
        assert encoder.encode_images(np.zeros((2, 3, 224, 224), dtype=np.float32)).shape == (2, 32)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        assert not heavy, heavy
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.slow  # a child process imports torch and exports: ~10 s
def test_export_in_subprocess(tiny_model: str, tmp_path: Path) -> None:
    out = export_in_subprocess(tiny_model, tmp_path / "sub", towers=("text",), quantize="none")
    assert is_current(tiny_model, out, ("text",), "none")
    assert export_in_subprocess(tiny_model, out, towers=("text",), quantize="none") == out


def test_cli_rejects_unknown_tower(tiny_model: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "consumer.tools.onnx_export", "--model", tiny_model, "--out", str(tmp_path / "x"), "--towers", "audio"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 2 and "towers" in proc.stderr

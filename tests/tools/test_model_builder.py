"""Tests for ``consumer.tools.model_builder``: a random-weights CLIP dir that loads like a real checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from consumer.tools.model_builder import (
    MARKER_FILE,
    REQUIRED_FILES,
    VOCAB_SIZE,
    build_random_clip,
    clip_vocab_and_merges,
    is_random_model,
)

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
PROJECTION_DIM = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_clip(tmp_path_factory.mktemp("clip") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def text_tower(tiny_dir: Path):
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def vision_tower(tiny_dir: Path):
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def full_model(tiny_dir: Path):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def pixel_values(tiny_dir: Path) -> torch.Tensor:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(300, 400), (224, 224)]]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir() if p.is_file()}


def test_vocab_rebuilt_like_openai_clip() -> None:
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE
    assert len(merges) == 49152 - 256 - 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["cat</w>"] == 2368


def test_directory_contents_and_marker(tiny_dir: Path) -> None:
    for name in REQUIRED_FILES:
        assert (tiny_dir / name).is_file(), name
    marker = json.loads((tiny_dir / MARKER_FILE).read_text())
    assert marker["random_weights"] is True
    assert marker["size"] == "tiny" and marker["seed"] == 0
    assert "meaningless" in marker["note"]
    preprocessor = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert preprocessor["crop_size"] == {"height": 224, "width": 224}
    assert preprocessor["size"] == {"shortest_edge": 224}
    assert preprocessor["resample"] == 3
    assert preprocessor["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert preprocessor["image_std"] == [0.26862954, 0.26130258, 0.27577711]


def test_is_random_model(tiny_dir: Path, tmp_path: Path) -> None:
    assert is_random_model(str(tiny_dir))
    assert not is_random_model(str(tmp_path))
    assert not is_random_model("openai/clip-vit-base-patch32")
    assert not is_random_model(str(tmp_path / "missing"))


def test_tokenizer_uses_real_clip_ids(tokenizer) -> None:
    assert tokenizer("a photo of a cat")["input_ids"] == CAT_IDS
    assert tokenizer("A PHOTO of  a Cat")["input_ids"] == CAT_IDS
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77
    long_ids = tokenizer("cat " * 200, truncation=True)["input_ids"]
    assert len(long_ids) == 77 and long_ids[0] == 49406 and long_ids[-1] == 49407


def test_tower_embedding_dims(tokenizer, text_tower, vision_tower, pixel_values: torch.Tensor) -> None:
    assert pixel_values.shape == (2, 3, 224, 224)
    inputs = tokenizer(["a photo of a cat", "red running shoes"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        text_embeds = text_tower(**inputs).text_embeds
        image_embeds = vision_tower(pixel_values=pixel_values).image_embeds
    assert text_embeds.shape == (2, PROJECTION_DIM)
    assert image_embeds.shape == (2, PROJECTION_DIM)
    assert torch.isfinite(text_embeds).all() and torch.isfinite(image_embeds).all()


def test_identical_inputs_identical_embeddings(tokenizer, text_tower, vision_tower, pixel_values) -> None:
    """Equal inputs give equal embeddings wherever they sit in a batch, up to float rounding.

    Rows of one batch may take different SIMD paths (AMD and Intel kernels differ), so rows are
    compared with a tolerance (rtol 1e-5, atol 1e-6: float32 rounding of O(1) values), never bitwise.
    """
    inputs = tokenizer(["blue denim jacket", "blue denim jacket"], return_tensors="pt")
    padded = tokenizer(["blue denim jacket", "a much longer product title that forces padding"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        pair = text_tower(**inputs).text_embeds
        again = text_tower(**inputs).text_embeds
        in_padded_batch = text_tower(**padded).text_embeds[0]
        images = torch.cat([pixel_values[:1], pixel_values[:1]])
        image_pair = vision_tower(pixel_values=images).image_embeds
    torch.testing.assert_close(pair[0], pair[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pair, again, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(in_padded_batch, pair[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(image_pair[0], image_pair[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pair[0], image_pair[0], rtol=1e-3, atol=1e-4)


def test_full_model_features_equal_single_towers(tokenizer, full_model, text_tower, vision_tower, pixel_values: torch.Tensor) -> None:
    """transformers 5: ``get_*_features`` return ``BaseModelOutputWithPooling`` whose pooler_output is the projection."""
    inputs = tokenizer(["a photo of a cat", "red running shoes"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        text_features = full_model.get_text_features(**inputs)
        image_features = full_model.get_image_features(pixel_values=pixel_values)
        text_embeds = text_tower(**inputs).text_embeds
        image_embeds = vision_tower(pixel_values=pixel_values).image_embeds
    assert not isinstance(text_features, torch.Tensor)
    assert text_features.pooler_output.shape == (2, PROJECTION_DIM)
    assert image_features.pooler_output.shape == (2, PROJECTION_DIM)
    # Two model objects, same weights and shapes: equal up to float32 rounding, not promised bitwise.
    torch.testing.assert_close(text_features.pooler_output, text_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(image_features.pooler_output, image_embeds, rtol=1e-5, atol=1e-6)


def test_second_build_is_cached(tiny_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}
    assert build_random_clip(tiny_dir, size="tiny", seed=0) == tiny_dir
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == before


def test_incomplete_dir_is_rebuilt_bit_identically(tiny_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    (copy / "model.safetensors").unlink()
    build_random_clip(copy, size="tiny", seed=0)
    assert _hashes(copy) == _hashes(tiny_dir)
    assert not list(tmp_path.glob(".copy.building-*"))


def test_unknown_size_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size"):
        build_random_clip(tmp_path / "x", size="vit-h-14")
    assert not (tmp_path / "x").exists()

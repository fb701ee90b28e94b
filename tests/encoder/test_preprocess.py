"""``ImagePreprocess``: read from a CLIPImageProcessor config, and pixels equal to transformers' own processor."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consumer.encoder.images import OPENAI_CLIP, ImageLimits, ImagePreprocess, clip_pixels, pixels_from_base64
from consumer.encoder.manifest import manifest_preprocess, source_preprocess

transformers = pytest.importorskip("transformers")

LAION_LIKE = {
    "size": {"shortest_edge": 256},
    "crop_size": {"height": 256, "width": 256},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _processor(**kwargs: object) -> object:
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**kwargs)


def test_default_is_openai_clip() -> None:
    assert ImagePreprocess.from_processor_config({}) == OPENAI_CLIP
    assert ImagePreprocess.from_processor_config(_processor().to_dict()) == OPENAI_CLIP
    assert ImagePreprocess.from_dict(OPENAI_CLIP.to_dict()) == OPENAI_CLIP


@pytest.mark.parametrize(
    "config", [{}, LAION_LIKE, {"size": {"shortest_edge": 240}, "crop_size": {"height": 224, "width": 224}, "resample": 2}]
)
@pytest.mark.parametrize("shape", [(320, 200), (150, 260), (224, 224)])
def test_pixels_match_transformers(config: dict[str, object], shape: tuple[int, int]) -> None:
    img = _image(*shape)
    processor = _processor(**config)
    recipe = ImagePreprocess.from_processor_config(processor.to_dict())
    expected = np.asarray(processor(images=img, return_tensors="np")["pixel_values"][0])
    got = clip_pixels(img, recipe)
    assert got.shape == expected.shape == (3, recipe.image_size, recipe.image_size)
    np.testing.assert_allclose(got, expected, atol=2e-2)
    assert np.mean(np.abs(got - expected)) < 1e-3


def test_non_default_recipe_changes_the_pixels() -> None:
    img = _image(300, 200)
    data = base64.b64encode(_png(img)).decode()
    laion = ImagePreprocess.from_processor_config(LAION_LIKE)
    default = pixels_from_base64(data, ImageLimits())
    other = pixels_from_base64(data, ImageLimits(), laion)
    assert default.shape == (3, 224, 224) and other.shape == (3, 256, 256)
    mean_only = ImagePreprocess.from_processor_config({"image_mean": [0.5, 0.5, 0.5]})
    assert not np.allclose(pixels_from_base64(data, ImageLimits(), mean_only), default, atol=1e-2)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "config",
    [
        {"do_center_crop": False},
        {"size": {"height": 224, "width": 224}},
        {"crop_size": {"height": 224, "width": 200}},
        {"rescale_factor": 1.0},
        {"crop_size": 300},
    ],
)
def test_unsupported_recipes_are_refused(config: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ImagePreprocess.from_processor_config(config)


def test_source_and_manifest_recipes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": 256}}))
    assert source_preprocess(str(tmp_path)).image_size == 256
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LAION_LIKE))
    assert source_preprocess(str(tmp_path)) == ImagePreprocess.from_processor_config(LAION_LIKE)
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": 224}}))
    with pytest.raises(ValueError, match="crops 256"):
        source_preprocess(str(tmp_path))
    assert manifest_preprocess({"towers": {}}) == OPENAI_CLIP
    assert manifest_preprocess({"image_size": 256}).image_size == 256
    recipe = ImagePreprocess.from_processor_config(LAION_LIKE)
    assert manifest_preprocess({"preprocess": recipe.to_dict()}) == recipe


def test_encoder_preprocess_comes_from_the_backend(tmp_path: Path) -> None:
    from consumer.encoder.encoder import Encoder
    from consumer.encoder.torch_backend import TorchBackend

    class NoRecipe:
        name = "fake"

    assert Encoder(NoRecipe(), model_id="m").preprocess == OPENAI_CLIP  # type: ignore[arg-type]
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": 256}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LAION_LIKE))
    assert Encoder(TorchBackend(str(tmp_path)), model_id="m").preprocess == ImagePreprocess.from_processor_config(LAION_LIKE)


def test_each_channel_is_scaled_with_its_own_mean_and_std() -> None:
    """Channel-planar [3, S, S]: ((value / 255) - mean[c]) / std[c], to float32 rounding (a crop of exactly S px)."""
    img = _image(224, 224, seed=3)
    recipe = ImagePreprocess(mean=(0.1, 0.5, 0.9), std=(0.2, 0.4, 0.8))
    expected = ((np.asarray(img, dtype=np.float64) / 255.0 - recipe.mean) / recipe.std).transpose(2, 0, 1)
    got = clip_pixels(img, recipe)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)

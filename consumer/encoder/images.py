"""Inline images: base64 -> validated RGB -> CLIP pixel tensor (numpy, no torch).

The pixel recipe (resize, crop, normalisation) is an ``ImagePreprocess``, read from the model's
``preprocessor_config.json`` the way transformers' ``CLIPImageProcessor`` stores it;
``OPENAI_CLIP`` is the OpenAI recipe and the default.

Limits are enforced before any pixel is decoded: encoded bytes, then the pixel
count from the header (Pillow's decompression-bomb guard is set to the same
limit as a second line of defence).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from consumer.domain.errors import ImageTooLarge, InvalidBase64, InvalidImage

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class ImagePreprocess:
    """How an RGB image becomes the vision tower's input, as transformers' ``CLIPImageProcessor`` does it.

    Resize so the short edge is ``shortest_edge`` (long edge truncated to an int, ``resample`` is a
    ``PIL.Image.Resampling`` value), centre-crop ``image_size`` x ``image_size`` (the crop size, which
    is the tower's input size), scale to [0, 1], then ``(x - mean) / std`` per channel.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    shortest_edge: int = 224
    resample: int = int(Image.Resampling.BICUBIC)

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.shortest_edge < self.image_size:
            raise ValueError(f"need 1 <= crop size {self.image_size} <= shortest edge {self.shortest_edge}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 channels with std > 0, got {self.mean} / {self.std}")
        Image.Resampling(self.resample)

    @property
    def crop_size(self) -> int:
        return self.image_size

    def to_dict(self) -> dict[str, Any]:
        """The manifest form (``from_dict`` reads it back)."""
        return {
            "image_size": self.image_size,
            "shortest_edge": self.shortest_edge,
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": self.resample,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImagePreprocess:
        mean, std = (tuple(float(v) for v in data[k]) for k in ("mean", "std"))
        return cls(
            image_size=int(data["image_size"]),
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            shortest_edge=int(data["shortest_edge"]),
            resample=int(data["resample"]),
        )

    @classmethod
    def from_processor_config(cls, config: Mapping[str, Any]) -> ImagePreprocess:
        """From a ``preprocessor_config.json`` dict; raises ValueError for a recipe this module cannot reproduce.

        Supported: ``size`` ``{"shortest_edge": n}`` (or a bare int), ``crop_size`` ``{"height": s, "width": s}``
        (or a bare int), resize, centre crop, rescale by 1/255 and normalise all on, RGB conversion.
        Missing keys take CLIPImageProcessor's defaults (the OpenAI recipe).
        """
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(flag, True) is not True:
                raise ValueError(f"unsupported image preprocessing: {flag}={config[flag]!r}")
        if abs(float(config.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
            raise ValueError(f"unsupported rescale_factor {config['rescale_factor']!r}")
        size = config.get("size", 224)
        if isinstance(size, Mapping):
            if set(size) != {"shortest_edge"}:
                raise ValueError(f"unsupported resize {dict(size)!r}; expected shortest_edge")
            size = size["shortest_edge"]
        crop = config.get("crop_size", 224)
        if isinstance(crop, Mapping):
            if crop.get("height") != crop.get("width"):
                raise ValueError(f"unsupported non-square crop {dict(crop)!r}")
            crop = crop["height"]
        default = OPENAI_CLIP
        return cls.from_dict(
            {
                "image_size": crop,
                "shortest_edge": size,
                "mean": config.get("image_mean") or default.mean,
                "std": config.get("image_std") or default.std,
                "resample": config.get("resample", default.resample),
            }
        )


OPENAI_CLIP = ImagePreprocess()
"""OpenAI CLIP's recipe: bicubic short edge 224, centre crop 224, OpenAI mean/std."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 5 * 1024 * 1024
    max_pixels: int = 40_000_000


def decode_base64(data: str, max_bytes: int) -> bytes:
    """Strict base64 decode; raises InvalidBase64 or ImageTooLarge."""
    if len(data) > (max_bytes * 4) // 3 + 4:
        raise ImageTooLarge(f"encoded image exceeds {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64(f"image is not valid base64: {exc}") from None
    if len(raw) > max_bytes:
        raise ImageTooLarge(f"image is {len(raw)} bytes, limit {max_bytes}")
    if not raw:
        raise InvalidImage("image is empty")
    return raw


def load_image(raw: bytes, limits: ImageLimits) -> Image.Image:
    """Open and fully decode ``raw`` as an RGB image within ``limits``."""
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            width, height = img.size
            if width * height > limits.max_pixels:
                raise ImageTooLarge(f"image is {width}x{height} pixels, limit {limits.max_pixels}")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image rejected by the decompression-bomb guard: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImage("bytes are not a supported image format") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"image could not be decoded: {exc}") from None
    return img.convert("RGB")


def clip_pixels(img: Image.Image, preprocess: ImagePreprocess = OPENAI_CLIP) -> np.ndarray:
    """``preprocess`` applied to an RGB image: float32 [3, S, S] with S = ``preprocess.image_size``."""
    width, height = img.size
    edge, size = preprocess.shortest_edge, preprocess.image_size
    new_size = (edge, int(edge * height / width)) if width <= height else (int(edge * width / height), edge)
    resized = img.resize(new_size, Image.Resampling(preprocess.resample))
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    crop = np.asarray(resized.crop((left, top, left + size, top + size)))
    std = np.asarray(preprocess.std, dtype=np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    offset = (-np.asarray(preprocess.mean, dtype=np.float64) / std).astype(np.float32)
    out = np.empty((3, size, size), dtype=np.float32)
    for channel in range(3):
        np.multiply(crop[:, :, channel], scale[channel], out=out[channel])
        out[channel] += offset[channel]
    return out


def pixels_from_base64(data: str, limits: ImageLimits, preprocess: ImagePreprocess = OPENAI_CLIP) -> np.ndarray:
    """Validated base64 image -> the vision tower's pixel tensor; raises a typed InputError."""
    return clip_pixels(load_image(decode_base64(data, limits.max_bytes), limits), preprocess)

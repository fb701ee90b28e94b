"""Inline images: base64 -> validated RGB -> CLIP pixel tensor (numpy, no torch).

Limits are enforced before any pixel is decoded: encoded bytes, then the pixel
count from the header (Pillow's decompression-bomb guard is set to the same
limit as a second line of defence).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from consumer.domain.errors import ImageTooLarge, InvalidBase64, InvalidImage

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


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


def clip_pixels(img: Image.Image, size: int = 224) -> np.ndarray:
    """CLIP preprocessing: bicubic resize of the short side, centre crop, normalise; float32 [3, size, size]."""
    width, height = img.size
    scale = size / min(width, height)
    resized = img.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BICUBIC)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    arr = np.asarray(crop, dtype=np.float32) / 255.0
    arr = (arr - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def pixels_from_base64(data: str, limits: ImageLimits, size: int = 224) -> np.ndarray:
    """Validated base64 image -> CLIP pixel tensor; raises a typed InputError."""
    return clip_pixels(load_image(decode_base64(data, limits.max_bytes), limits), size)

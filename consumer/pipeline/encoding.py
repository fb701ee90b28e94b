"""Encoder work off the event loop, shared by search and product handling.

``decode_image`` turns an inline base64 image into CLIP pixels in a worker thread and returns
(not raises) the ``InputError`` of a bad one; ``encode_rows`` encodes texts and images with one
batched encoder call per modality. Both keep the event loop free to heartbeat.
"""

from __future__ import annotations

import asyncio

import numpy as np

from consumer.domain.errors import InputError
from consumer.encoder.encoder import Encoder
from consumer.encoder.images import OPENAI_CLIP, ImageLimits, ImagePreprocess, pixels_from_base64


async def decode_image(image_b64: str, limits: ImageLimits, preprocess: ImagePreprocess = OPENAI_CLIP) -> np.ndarray | InputError:
    """The vision tower's pixels (per ``preprocess``) of an inline image, or the client error that makes it unusable."""
    try:
        return await asyncio.to_thread(pixels_from_base64, image_b64, limits, preprocess)
    except InputError as err:
        return err


async def encode_rows(encoder: Encoder, texts: list[tuple[int, str]], images: list[tuple[int, np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    """(row, embedding) for every text and image, in one batched call per modality, off the event loop."""
    out: list[tuple[int, np.ndarray]] = []
    if texts:
        emb = await asyncio.to_thread(encoder.encode_text, [t for _, t in texts])
        out.extend((i, vec) for (i, _), vec in zip(texts, emb, strict=True))
    if images:
        emb = await asyncio.to_thread(encoder.encode_images, np.stack([p for _, p in images]))
        out.extend((i, vec) for (i, _), vec in zip(images, emb, strict=True))
    return out

"""The features-topic vector format, defined once: little-endian float16, base64 (standard alphabet).

``encode_feature`` writes one vector as it travels in ``ProductFeature.feature_b64``;
``decode_features`` reads many back into one float32 matrix, rejecting (not raising on) any value
that is not valid base64 of exactly ``dim`` float16 values. The product store keeps its own on-disk
feature format (``consumer.store.product_store.FEATURE_DTYPE``, raw bytes, no base64).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pybase64

WIRE_DTYPE = np.dtype("<f2")


def encode_feature(vector: np.ndarray) -> tuple[int, str]:
    """(dim, base64 of the vector as little-endian float16) for a 1-D vector, as given (not normalised)."""
    vec = np.asarray(vector, dtype=WIRE_DTYPE)
    return int(vec.shape[0]), pybase64.b64encode(vec.tobytes()).decode()


def decode_features(encoded: Sequence[str], dim: int) -> tuple[np.ndarray, list[int]]:
    """float32 rows [n_valid, dim] of the usable values of ``encoded``, in order, and the positions of the others.

    One copy for the whole batch (no per-row arrays), so a replica catching up on the features topic
    decodes at the speed of base64.
    """
    width = dim * WIRE_DTYPE.itemsize
    rows: list[bytes] = []
    rejected: list[int] = []
    for i, text in enumerate(encoded):
        try:
            raw = pybase64.b64decode(text, validate=True)
        except ValueError:
            raw = b""
        if len(raw) == width:
            rows.append(raw)
        else:
            rejected.append(i)
    matrix = np.frombuffer(b"".join(rows), dtype=WIRE_DTYPE).reshape(len(rows), dim).astype(np.float32)
    return matrix, rejected

"""The synthetic benchmark catalog: clustered, L2-normalised 512-d features and product fields.

Deterministic for a given (n, dim, seed), so the service under test and the seed-style
baseline rank the same products. The features are not CLIP outputs (the model has random
weights anyway); what matters for memory and speed is their count, width and distribution.
"""

from __future__ import annotations

import numpy as np

CATEGORIES = [f"category-{i:02d}" for i in range(20)]


def features(n: int, dim: int = 512, seed: int = 0, clusters: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 10_000):
        stop = min(n, start + 10_000)
        picks = rng.integers(0, clusters, stop - start)
        block = centres[picks] + 0.6 * rng.normal(size=(stop - start, dim)).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def product_id(i: int) -> str:
    return f"p{i:06d}"


def fields(i: int) -> dict:
    return {
        "product_id": product_id(i),
        "version": 1,
        "name": f"Product {i}",
        "description": f"Synthetic product number {i} for benchmarks",
        "category": CATEGORIES[i % len(CATEGORIES)],
        "price": float(5 + (i * 37) % 200),
    }

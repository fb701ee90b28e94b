"""The synthetic benchmark catalog: clustered, L2-normalised 512-d features and product fields.

Deterministic for a given (n, dim, seed), so the service under test and the seed-style
baseline rank the same products. The features are not CLIP outputs (the model has random
weights anyway); what matters for memory and speed is their count, width and distribution.
"""

from __future__ import annotations

import asyncio

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


async def publish_features(bootstrap: str, topic: str, model_id: str, n: int, dim: int = 512) -> None:
    """Publish the catalog's first ``n`` products as features-topic records (acknowledged), keyed by product id."""
    from aiokafka import AIOKafkaProducer

    from consumer.domain.codecs import encode_feature
    from schemas import ProductFeature

    feats = features(n, dim=dim)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        pending = []
        for i in range(n):
            f = fields(i)
            size, feature_b64 = encode_feature(feats[i])
            event = ProductFeature(model_id=model_id, dim=size, feature_b64=feature_b64, **f)
            pending.append(await producer.send(topic, event.model_dump_json().encode(), key=f["product_id"].encode()))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()

"""Each model family served through the real broker: products in, exact text and image matches ranked first.

Small variants (``<family>-small``: the family's activation, patch size, image size and image recipe,
2-layer towers) keep the export under a few seconds; the default int8 export is the one served.
Random weights give meaningful rankings only for exact matches, which is all this asserts.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consumer.encoder.manifest import read_manifest
from consumer.tools.model_builder import FAMILIES, SMALL_SUFFIX, build_random_clip
from producer_examples.client import SearchClient, product_text, publish
from tests.conftest import running, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRODUCTS = [
    {"product_id": f"p-{i}", "version": 1, "name": name, "description": desc, "category": "misc", "price": 10.0 + i}
    for i, (name, desc) in enumerate(
        [
            ("Red cotton t-shirt", "Soft tee"),
            ("Steel kettle", "1.7 litre"),
            ("Oak desk lamp", "Adjustable"),
            ("Purple yoga mat", "Non-slip"),
        ]
    )
]


def _png(seed: int, size: tuple[int, int]) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE_PRODUCTS = [
    {"product_id": f"img-{i}", "version": 1, "name": f"picture {i}", "category": "pictures", "price": 5.0, "image_b64": _png(i, size)}
    for i, size in enumerate([(64, 48), (300, 200), (120, 260), (224, 224)])
]


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_family_serves_exact_matches_first(family: str, service_factory, broker, topics, tmp_path: Path) -> None:
    model = build_random_clip(tmp_path / "model", size=family + SMALL_SUFFIX)
    service = service_factory(clip_model=str(model), model_cache_dir=str(tmp_path / "cache"))
    manifest = read_manifest(service.encoder.backend.onnx_dir)
    assert manifest["quantization"] == "int8" and "preprocess" in manifest
    catalog = PRODUCTS + IMAGE_PRODUCTS
    async with running(service):
        await publish(broker.bootstrap, topics["product_updates_topic"], catalog, key_field="product_id")
        await wait_for(lambda: len(service.index) == len(catalog), what="catalog indexed")
        async with SearchClient(broker.bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
            for product in PRODUCTS:
                reply = await client.search({"query_text": product_text(product), "top_k": 3})
                assert reply["status"] == "ok", reply
                assert reply["items"][0]["product_id"] == product["product_id"], (family, reply)
                assert reply["random_weights"] is True
            for product in IMAGE_PRODUCTS:
                reply = await client.search({"query_image_b64": product["image_b64"], "top_k": 3})
                assert reply["status"] == "ok", reply
                assert reply["items"][0]["product_id"] == product["product_id"], (family, reply)
                assert reply["items"][0]["score"] > 0.99

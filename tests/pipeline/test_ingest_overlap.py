"""Product batches: a chunk's features publish and store writes overlap the next chunk's encode, in batch order."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

from consumer.encoder.encoder import Encoder
from consumer.encoder.images import ImageLimits
from consumer.index.feature_index import ProductMeta
from consumer.pipeline.products import ProductHandler, ProductOutcome
from schemas import ProductUpdated
from tests.pipeline.test_image_batches import DIM, Backend


def png_b64(shade: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class TextTower:
    def encode(self, texts: list[str]) -> np.ndarray:
        return np.ones((len(texts), DIM), dtype=np.float32)


class TextAndVision(Backend):
    def load_text(self) -> TextTower:  # type: ignore[override]
        return TextTower()


class RecordingStore:
    """Writes recorded in order; ``written`` is set (thread-safely) at the first one; can fail one product's write."""

    def __init__(self, fail: str | None = None) -> None:
        self.order: list[tuple[str, int]] = []
        self.written = threading.Event()
        self.fail = fail

    async def upsert_many(self, items: list[tuple[ProductMeta, np.ndarray]], model_id: str, images=None) -> list[bool]:
        if any(meta.product_id == self.fail for meta, _ in items):
            raise ConnectionError("store went away")
        self.order.extend((meta.product_id, meta.version) for meta, _ in items)
        self.written.set()
        return [True] * len(items)

    async def delete(self, product_id: str, version: int) -> bool:
        self.order.append((product_id, -version))
        return True

    async def get_versions(self, ids):
        return {}


def image_update(pid: str, version: int, shade: int = 7) -> ProductUpdated:
    return ProductUpdated(product_id=pid, version=version, name=pid, image_b64=png_b64(shade))


def handler_for(store: RecordingStore, published: list[list[tuple[str, int]]], backend: Backend | None = None) -> ProductHandler:
    async def publish(outcomes: list[ProductOutcome]) -> None:
        published.append([(o.update.product_id, o.update.version) for o in outcomes])

    return ProductHandler(
        Encoder(backend or TextAndVision(), "fake"), None, ImageLimits(), store=store, before_apply=publish, image_chunk=2
    )


async def test_the_first_chunk_is_stored_while_the_second_is_encoded():
    """The second chunk's encode waits until the store has a write: encode-everything-then-store never gets there."""
    store = RecordingStore()
    published: list[list[tuple[str, int]]] = []
    backend = TextAndVision()
    seen: list[bool] = []
    backend.vision.before_encode = lambda batch: seen.append(store.written.wait(10) if backend.vision.batches else True)
    handler = handler_for(store, published, backend)
    outcomes = await handler.handle([image_update(f"p{i}", 1) for i in range(4)])
    assert [o.status for o in outcomes] == ["applied"] * 4
    assert seen == [True, True]
    assert published == [[("p0", 1), ("p1", 1)], [("p2", 1), ("p3", 1)]]


async def test_versions_of_one_product_are_published_and_stored_in_batch_order_across_text_and_images():
    """Texts are encoded before images, yet p's image v1 is published and stored before its text v2."""
    store = RecordingStore()
    published: list[list[tuple[str, int]]] = []
    handler = handler_for(store, published)
    updates = [
        image_update("p", 1),
        ProductUpdated(product_id="q", version=1, name="q"),
        ProductUpdated(product_id="p", version=2, name="p"),
        image_update("r", 1),
        ProductUpdated(product_id="s", version=3, deleted=True),
    ]
    outcomes = await handler.handle(updates)
    assert [o.status for o in outcomes] == ["applied"] * 5
    flat = [item for step in published for item in step]
    assert flat == [("p", 1), ("q", 1), ("p", 2), ("r", 1), ("s", 3)]
    assert [v for pid, v in store.order if pid == "p"] == [1, 2]


async def test_a_bad_image_is_its_own_error_and_does_not_hold_back_the_rest():
    store = RecordingStore()
    published: list[list[tuple[str, int]]] = []
    handler = handler_for(store, published)
    updates = [
        image_update("a", 1),
        ProductUpdated(product_id="b", version=1, name="b", image_b64="bm90IGFuIGltYWdl"),
        image_update("c", 1),
    ]
    outcomes = await handler.handle(updates)
    assert [o.status for o in outcomes] == ["applied", "error", "applied"]
    assert outcomes[1].error is not None and outcomes[1].error.code == "invalid_image"
    assert sorted(pid for pid, _ in store.order) == ["a", "c"]


async def test_a_failed_store_write_stops_the_batch_and_nothing_after_it_is_published():
    store = RecordingStore(fail="p1")
    published: list[list[tuple[str, int]]] = []
    handler = handler_for(store, published)
    with pytest.raises(ConnectionError, match="store went away"):
        await handler.handle([image_update(f"p{i}", 1) for i in range(6)])
    assert published[0] == [("p0", 1), ("p1", 1)]
    assert all(pid in ("p0", "p1") for step in published for pid, _ in step)
    assert ("p2", 1) not in store.order and ("p4", 1) not in store.order

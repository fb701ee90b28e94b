"""Image ingest: parallel decode overlapped with chunked encode, order and per-item errors kept, memory bounded;
bulk store writes per round of a batch, a product's updates in their order; image threads at their nice value."""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from consumer.domain.errors import InvalidImage
from consumer.encoder.encoder import Encoder
from consumer.encoder.images import ImageLimits
from consumer.pipeline.image_batches import encode_images, image_pool
from consumer.pipeline.products import APPLY_CONCURRENCY, ProductHandler
from schemas import ProductUpdated

DIM = 4


class VisionTower:
    """Embeds pixel tensors [n, 3, 2, 2] as their first four values; records every call's batch."""

    nbytes = 0

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.before_encode = lambda batch: None

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        self.before_encode(pixels)
        self.batches.append([float(p[0, 0, 0]) for p in pixels])
        return np.asarray(pixels, dtype=np.float32).reshape(len(pixels), -1)[:, :DIM] + 1.0


class Backend:
    name = "fake"

    def __init__(self) -> None:
        self.vision = VisionTower()

    def load_text(self) -> VisionTower:
        raise AssertionError("no text in these tests")

    def load_vision(self) -> VisionTower:
        return self.vision


def pixels_of(data: str) -> np.ndarray:
    """``"img-7"`` -> a [3, 2, 2] tensor filled with 7.0; ``"bad..."`` raises ``InvalidImage``."""
    if data.startswith("bad"):
        raise InvalidImage(f"{data} is not an image")
    return np.full((3, 2, 2), float(data.split("-")[1]), dtype=np.float32)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


async def test_keeps_order_and_returns_each_bad_image_as_its_error(pool):
    backend = Backend()
    encoder = Encoder(backend, "fake")
    images = [(i, "bad-x" if i in (2, 5, 6) else f"img-{i}") for i in range(9)]
    out = await encode_images(encoder, images, pixels_of, pool, chunk=3)
    assert [row for row, _ in out] == list(range(9))
    for row, result in out:
        if row in (2, 5, 6):
            assert isinstance(result, InvalidImage) and "bad-x" in result.message
        else:
            assert isinstance(result, np.ndarray)
            expected = np.full(DIM, row + 1.0) / np.linalg.norm(np.full(DIM, row + 1.0))
            np.testing.assert_allclose(result, expected, rtol=1e-6)
    assert backend.vision.batches == [[0.0, 1.0], [3.0, 4.0], [7.0, 8.0]]


async def test_a_chunk_of_only_bad_images_encodes_nothing(pool):
    backend = Backend()
    out = await encode_images(Encoder(backend, "fake"), [(0, "bad-a"), (1, "bad-b")], pixels_of, pool, chunk=2)
    assert [type(r) for _, r in out] == [InvalidImage, InvalidImage]
    assert backend.vision.batches == []
    assert await encode_images(Encoder(backend, "fake"), [], pixels_of, pool) == []


async def test_decoded_pixels_alive_at_once_are_bounded_by_two_chunks(pool):
    """A burst of 40 images in chunks of 4 never holds more than 8 decoded tensors (all 40 if decoded up front)."""
    alive = 0
    peak = 0
    lock = threading.Lock()

    def gone() -> None:
        nonlocal alive
        with lock:
            alive -= 1

    def tracked(data: str) -> np.ndarray:
        nonlocal alive, peak
        pixels = pixels_of(data)
        with lock:
            alive += 1
            peak = max(peak, alive)
        weakref.finalize(pixels, gone)
        return pixels

    backend = Backend()
    out = await encode_images(Encoder(backend, "fake"), [(i, f"img-{i}") for i in range(40)], tracked, pool, chunk=4)
    assert len(out) == 40 and len(backend.vision.batches) == 10
    assert 4 <= peak <= 8


async def test_next_chunk_is_decoded_while_the_current_one_is_encoded(pool):
    """The encode of chunk 0 waits until a decode of chunk 1 has begun: serial decode-then-encode would never get there."""
    chunk_one_decoding = threading.Event()

    def decode(data: str) -> np.ndarray:
        if int(data.split("-")[1]) >= 2:
            chunk_one_decoding.set()
        return pixels_of(data)

    backend = Backend()
    seen: list[bool] = []
    backend.vision.before_encode = lambda batch: seen.append(chunk_one_decoding.wait(30))
    out = await encode_images(Encoder(backend, "fake"), [(i, f"img-{i}") for i in range(4)], decode, pool, chunk=2)
    assert len(out) == 4
    assert seen == [True, True]


async def test_image_threads_run_at_the_given_nice_and_encodes_on_their_own_executor():
    decodes, encodes = image_pool(2, nice=7), image_pool(1, nice=7)
    seen: list[tuple[str, int]] = []

    def where() -> tuple[str, int]:
        return str(threading.get_native_id()), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def decode(data: str) -> np.ndarray:
        seen.append(("decode", *where()))
        return pixels_of(data)

    backend = Backend()
    backend.vision.before_encode = lambda batch: seen.append(("encode", *where()))
    try:
        out = await encode_images(Encoder(backend, "fake"), [(i, f"img-{i}") for i in range(4)], decode, decodes, 2, None, encodes)
    finally:
        decodes.shutdown()
        encodes.shutdown()
    assert len(out) == 4
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert {(kind, nice) for kind, _, nice in seen} == {("decode", min(19, base + 7)), ("encode", min(19, base + 7))}
    encode_threads = {name for kind, name, _ in seen if kind == "encode"}
    decode_threads = {name for kind, name, _ in seen if kind == "decode"}
    assert len(encode_threads) == 1 and not encode_threads & decode_threads


def update(pid: str, version: int) -> ProductUpdated:
    return ProductUpdated(product_id=pid, version=version, name=pid)


class BulkStore:
    """Bulk upserts and deletes recorded per call; deletes wait until released; can fail one product's write."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[list[tuple[str, int, bytes | None]]] = []
        self.deletes_in_flight = 0
        self.peak = 0
        self.fail = fail
        self.cancelled = 0
        self.release = asyncio.Event()
        self.full = asyncio.Event()

    async def upsert_many(self, items, model_id: str, images=None) -> list[bool]:
        if any(meta.product_id == self.fail for meta, _ in items):
            raise ConnectionError("store went away")
        self.calls.append(
            [(meta.product_id, meta.version, image) for (meta, _), image in zip(items, images or [None] * len(items), strict=True)]
        )
        return [True] * len(items)

    async def delete(self, product_id: str, version: int) -> bool:
        self.deletes_in_flight += 1
        self.peak = max(self.peak, self.deletes_in_flight)
        if self.deletes_in_flight == APPLY_CONCURRENCY:
            self.full.set()
        try:
            await self.release.wait()
            self.calls.append([(product_id, -version, None)])
            return True
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.deletes_in_flight -= 1

    async def get_versions(self, ids):
        return {}


async def test_each_round_of_upserts_is_one_bulk_write_and_a_product_s_versions_keep_their_order():
    store = BulkStore()
    handler = ProductHandler(Encoder(Backend(), "fake"), None, ImageLimits(), store=store)
    items = [(update(f"p{i % 12}", i), np.ones(DIM, dtype=np.float32)) for i in range(24)]
    items[5] = (ProductUpdated(product_id="p5", version=5, name="p5", image_b64="aW1hZ2U="), items[5][1])
    assert await handler.apply_all(items) == [True] * 24
    assert [len(call) for call in store.calls] == [12, 12]
    assert [(pid, v) for pid, v, _ in store.calls[0]] == [(f"p{i}", i) for i in range(12)]
    assert [(pid, v) for pid, v, _ in store.calls[1]] == [(f"p{i}", i + 12) for i in range(12)]
    assert store.calls[0][5][2] == b"image" and store.calls[0][4][2] is None, "the image bytes go with their upsert"


async def test_deletes_run_concurrently_up_to_the_bound():
    store = BulkStore()
    handler = ProductHandler(Encoder(Backend(), "fake"), None, ImageLimits(), store=store)
    items = [(ProductUpdated(product_id=f"d{i}", version=2, deleted=True), None) for i in range(12)]
    applying = asyncio.ensure_future(handler.apply_all(items))
    await asyncio.wait_for(store.full.wait(), 30)
    store.release.set()
    assert await applying == [True] * 12
    assert store.peak == APPLY_CONCURRENCY


async def test_a_failing_store_write_raises_itself_cancels_the_round_and_starts_no_later_round():
    store = BulkStore(fail="p3")
    handler = ProductHandler(Encoder(Backend(), "fake"), None, ImageLimits(), store=store)
    items = [(update(f"p{i}", 1), np.ones(DIM, dtype=np.float32)) for i in range(6)]
    items += [(ProductUpdated(product_id=f"d{i}", version=2, deleted=True), None) for i in range(3)]
    items += [(update("p0", 2), np.ones(DIM, dtype=np.float32))]
    with pytest.raises(ConnectionError, match="store went away"):
        await handler.apply_all(items)
    assert store.calls == [] and store.deletes_in_flight == 0 and store.cancelled == 3

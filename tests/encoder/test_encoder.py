"""The torch encoder on a tiny random CLIP: lazy, single load under races, normalised output."""

import threading

import numpy as np
import pytest
from PIL import Image

from consumer.app import build_encoder
from consumer.config.settings import Settings
from consumer.encoder.images import clip_pixels
from consumer.encoder.manifest import embedding_dim

# (backend, quantize, least cosine between a text's embedding encoded in a batch and encoded alone).
# fp32: float rounding only. int8: dynamic quantization scales activations per batch, and the tiny random
# model's 32-dim embeddings amplify that (0.988 seen on AMD EPYC; kernels differ by CPU), so 0.95.
BACKENDS = [
    pytest.param("torch", "none", 1 - 1e-6, marks=pytest.mark.slow),  # imports torch (about 6 s): the export extra's backend
    ("onnx", "none", 1 - 1e-6),
    ("onnx", "int8", 0.95),
]


def make_encoder(model: str, backend: str = "onnx", quantize: str = "int8"):
    return build_encoder(Settings(clip_model=model, encoder_backend=backend, onnx_quantize=quantize, _env_file=None))


@pytest.mark.parametrize("backend", [pytest.param("torch", marks=pytest.mark.slow), "onnx"])  # torch: imports torch (about 6 s)
def test_towers_load_lazily_and_once_under_concurrent_first_calls(tiny_model, backend):
    encoder = make_encoder(tiny_model, backend)
    assert encoder.load_counts == {"text": 0, "vision": 0}
    barrier = threading.Barrier(8)
    results = []

    def first_call(n: int) -> None:
        barrier.wait()
        results.append(encoder.encode_text([f"query {n}"]))

    threads = [threading.Thread(target=first_call, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert encoder.load_counts == {"text": 1, "vision": 0}
    assert encoder.tower_bytes["text"] > 0 and encoder.tower_bytes["vision"] == 0


@pytest.mark.parametrize("backend, quantize, min_batch_cosine", BACKENDS)
def test_embeddings_are_normalised_and_deterministic(tiny_model, backend, quantize, min_batch_cosine):
    """int8 dynamic quantization scales activations per batch, so batch mates move an embedding slightly."""
    encoder = make_encoder(tiny_model, backend, quantize)
    texts = ["red shoes", "a much longer description of a blue ceramic mug", "red shoes"]
    emb = encoder.encode_text(texts)
    assert emb.shape == (3, embedding_dim(tiny_model)) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[2], atol=1e-6)
    assert float(emb[0] @ emb[1]) < 0.9999

    batched = encoder.encode_text(texts[:2])
    single = np.vstack([encoder.encode_text([t]) for t in texts[:2]])
    cosines = batched @ single.T
    assert np.diag(cosines).min() >= min_batch_cosine, cosines
    assert (cosines.argmax(axis=1) == np.arange(len(batched))).all(), cosines

    pixels = np.stack([clip_pixels(Image.new("RGB", (64, 48), c)) for c in ("red", "blue")])
    img = encoder.encode_images(pixels)
    assert img.shape == (2, emb.shape[1])
    assert encoder.load_counts == {"text": 1, "vision": 1}
    assert encoder.unload("vision") and encoder.tower_bytes["vision"] == 0


async def test_idle_vision_tower_is_unloaded_after_model_idle_unload_s(tiny_model):
    from consumer.app import build_service

    settings = Settings(clip_model=tiny_model, model_idle_unload_s=0.01, _env_file=None)
    service = build_service(settings)
    pixels = np.stack([clip_pixels(Image.new("RGB", (32, 32), "green"))])
    service.encoder.encode_images(pixels)
    assert service.encoder.load_counts["vision"] == 1 and service.encoder.tower_bytes["vision"] > 0
    service.encoder._slots["vision"].last_used -= 1.0
    service._unload_idle_vision()
    assert service.encoder.tower_bytes["vision"] == 0
    service.encoder.encode_images(pixels)
    assert service.encoder.load_counts["vision"] == 2

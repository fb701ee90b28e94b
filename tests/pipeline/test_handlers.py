"""Decoding and validation of raw events into typed requests or typed errors."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from consumer.domain.errors import InputError
from consumer.encoder.images import ImageLimits, pixels_from_base64
from consumer.index.feature_index import FeatureIndex
from consumer.pipeline.features import apply_feature_events, feature_event
from consumer.pipeline.parsing import parse_product, parse_search, reply_address
from consumer.pipeline.products import product_text
from schemas import ProductFeature, ProductUpdated


def raw(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "value, code",
    [
        (None, "invalid_json"),
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "schema_violation"),
        (raw({"request_id": "r", "query_text": "x", "schema_version": 2}), "unsupported_schema_version"),
        (raw({"request_id": "r", "query_text": "   "}), "empty_query"),
        (raw({"request_id": "r"}), "schema_violation"),
        (raw({"request_id": "r", "query_text": "x", "top_k": 101}), "top_k_out_of_range"),
        (raw({"request_id": "r", "query_text": "x", "filters": {"colour": "red"}}), "unknown_filter"),
        (raw({"request_id": "r", "query_text": "x" * 2000}), "schema_violation"),
        (b"{" + b" " * 5000 + b"}", "message_too_large"),
    ],
)
def test_parse_search_errors_are_typed(value, code):
    with pytest.raises(InputError) as exc:
        parse_search(value, max_bytes=4096, max_top_k=100)
    assert exc.value.code == code
    assert exc.value.message


def test_parse_search_accepts_valid_request():
    req = parse_search(raw({"request_id": "r-1", "query_text": "shoes", "top_k": 100, "filters": {"category": "a"}}), 4096, 100)
    assert req.top_k == 100 and req.filters.category == "a"


def test_reply_address_is_best_effort():
    assert reply_address(raw({"request_id": "r-9", "reply_to": "replies"})) == ("r-9", "replies")
    assert reply_address(raw({"request_id": "r-9", "reply_to": "bad topic!"})) == ("r-9", None)
    assert reply_address(raw({"request_id": 5})) == (None, None)
    assert reply_address(b"garbage") == (None, None)


def test_parse_product_and_text():
    update = parse_product(raw({"product_id": "p1", "version": 3, "name": "Mug", "description": "Green"}), 4096)
    assert isinstance(update, ProductUpdated)
    assert product_text(update) == "Mug. Green"
    with pytest.raises(InputError) as exc:
        parse_product(raw({"product_id": "p1", "version": "three", "name": "Mug"}), 4096)
    assert exc.value.code == "schema_violation"


def png_b64(size=(40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_image_pipeline_shapes_and_errors():
    limits = ImageLimits(max_bytes=100_000, max_pixels=1_000_000)
    pixels = pixels_from_base64(png_b64(), limits)
    assert pixels.shape == (3, 224, 224) and pixels.dtype.name == "float32"
    cases = {
        "invalid_base64": "not base64!!",
        "invalid_image": base64.b64encode(b"plain bytes, not an image").decode(),
        "image_too_large": png_b64((2000, 1000)),
    }
    for code, data in cases.items():
        with pytest.raises(InputError) as exc:
            pixels_from_base64(data, limits)
        assert exc.value.code == code, code
    with pytest.raises(InputError) as exc:
        pixels_from_base64(png_b64(), ImageLimits(max_bytes=10, max_pixels=1_000_000))
    assert exc.value.code == "image_too_large"


def test_feature_events_apply_in_order_and_unusable_vectors_are_reported():
    dim = 8
    rng = np.random.default_rng(0)

    def upsert(pid, version, vector=None, model="m"):
        update = ProductUpdated(product_id=pid, version=version, name=f"{pid} v{version}")
        return feature_event(update, rng.standard_normal(dim) if vector is None else vector, model)

    def delete(pid, version):
        return ProductFeature(product_id=pid, version=version, model_id="m", deleted=True)

    short = upsert("short", 1).model_copy(update={"feature_b64": base64.b64encode(b"\0" * (dim * 2 - 2)).decode()})
    not_base64 = upsert("garbled", 1).model_copy(update={"feature_b64": "###"})
    events = [
        upsert("a", 1),
        upsert("b", 1),
        delete("a", 2),
        upsert("a", 1),
        upsert("b", 3),
        upsert("b", 2),
        upsert("c", 1, model="other"),
        upsert("zero", 1, np.zeros(dim)),
        short,
        not_base64,
        upsert("d", 1),
    ]
    index = FeatureIndex(dim)
    report = apply_feature_events(index, events, "m")

    assert sorted(index.ids()) == ["b", "d"]
    assert index.get("b").name == "b v3"
    assert (report.applied, report.unchanged, report.other_model) == (5, 2, 1)
    assert sorted(report.invalid) == ["garbled", "short", "zero"]

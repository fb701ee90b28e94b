"""Input hardening: arbitrary events and bytes through ``Service.process`` (no Kafka needed).

Contract checked for every generated batch: ``process`` never raises and nothing is
left for a retry (a record that fails the same way every time would be retried
forever); each search record ends as a reply, an error reply or a dead letter; each
product record as applied, stale or a dead letter.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import time

import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from consumer.app import build_service
from consumer.config.settings import Settings
from consumer.kafka.service import Service
from consumer.pipeline.parsing import reply_address

SEARCH_TOPIC = "fuzz-search-requests"
PRODUCT_TOPIC = "fuzz-product-updated"
DEAD_LETTERS = "fuzz-dead-letters"
REPLIES = "fuzz-replies"
MAX_MESSAGE_BYTES = 32 * 1024


def _png_b64(size: tuple[int, int], colour: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


IMAGES = [_png_b64((16, 16), "red"), _png_b64((40, 20), "green"), _png_b64((1100, 1000), "blue")]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
junk = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)
huge_text = st.integers(min_value=900, max_value=40_000).map(lambda n: "ü" * n)


def mostly(valid: st.SearchStrategy, *invalid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` about three times in four, else one of ``invalid`` or junk."""
    return st.sampled_from([valid, valid, valid, st.one_of(*invalid, junk)]).flatmap(lambda chosen: chosen)


identifier = st.from_regex(r"\A[A-Za-z0-9._:\-]{1,24}\Z")
request_id = mostly(st.one_of(identifier, st.sampled_from(["dup-1", "dup-2"])), st.text(max_size=30), st.just("x" * 200))
query_text = mostly(
    st.one_of(st.text(min_size=1, max_size=80), st.sampled_from(["red shoes", "Ünïcödé 靴 👟", "a\x00b"])),
    st.sampled_from(["", "   ", "\ud800 lone surrogate"]),
    huge_text,
)
image = mostly(
    st.sampled_from(IMAGES),
    st.text(max_size=40),
    st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode()),
)
deadline = mostly(
    st.sampled_from(["2000-01-01T00:00:00Z", "2999-01-01T00:00:00+00:00", "2999-01-01T00:00:00"]),
    st.datetimes().map(lambda d: d.isoformat()),
    st.just("tomorrow"),
)
top_k = mostly(st.integers(min_value=1, max_value=120), st.integers(min_value=-5, max_value=10**30), st.floats())
price = mostly(st.floats(min_value=0, max_value=1000), st.floats(), st.text(max_size=5))
category = mostly(st.sampled_from(["shoes", "kitchen"]), st.just(""), huge_text)
filters = mostly(
    st.fixed_dictionaries({}, optional={"category": category, "min_price": price, "max_price": price}),
    st.fixed_dictionaries({"colour": junk}),
)


def _event(required: dict, optional: dict, extra: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    """Schema-shaped dicts, now and then with unknown fields merged in."""
    base = st.fixed_dictionaries(required, optional=optional)
    merged = st.tuples(base, extra).map(lambda pair: pair[0] | pair[1])
    return st.sampled_from([base, base, base, base, merged]).flatmap(lambda chosen: chosen)


search_event = _event(
    {"request_id": request_id, "query_text": query_text},
    {
        "query_image_b64": image,
        "top_k": top_k,
        "filters": filters,
        "similarity_threshold": mostly(st.floats(min_value=-1, max_value=1), st.floats()),
        "reply_to": mostly(st.just(REPLIES), st.text(max_size=20)),
        "deadline": deadline,
        "schema_version": mostly(st.just(1), st.integers()),
    },
    st.dictionaries(st.text(max_size=10), junk, min_size=1, max_size=2),
)
product_event = _event(
    {
        "product_id": mostly(st.sampled_from(["p-1", "p-2", "p-3"]), identifier),
        "version": mostly(st.integers(0, 6), st.integers(), st.floats()),
    },
    {
        "name": query_text,
        "description": query_text,
        "category": category,
        "price": price,
        "image_b64": image,
        "deleted": mostly(st.booleans()),
        "schema_version": mostly(st.just(1), st.integers()),
    },
    st.dictionaries(st.text(max_size=10), junk, min_size=1, max_size=2),
)


def _dumps(event: object) -> bytes:
    return json.dumps(event, allow_nan=True).encode("utf-8", "surrogatepass")


raw_value = st.one_of(st.none(), st.binary(max_size=300), junk.map(_dumps))
search_value = st.sampled_from([search_event.map(_dumps)] * 4 + [raw_value]).flatmap(lambda chosen: chosen)
product_value = st.sampled_from([product_event.map(_dumps)] * 4 + [raw_value]).flatmap(lambda chosen: chosen)
batch = st.lists(
    st.one_of(st.tuples(st.just(SEARCH_TOPIC), search_value), st.tuples(st.just(PRODUCT_TOPIC), product_value)), min_size=1, max_size=12
)

_offsets = itertools.count()


def records_for(values: list[tuple[str, bytes | None]]) -> list[ConsumerRecord]:
    now_ms = int(time.time() * 1000)
    return [ConsumerRecord(topic, 0, next(_offsets), now_ms, 0, None, value, None, -1, len(value or b""), []) for topic, value in values]


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def service(tiny_model, loop) -> Service:
    return build_service(
        Settings(
            kafka_bootstrap_servers="127.0.0.1:9",
            clip_model=tiny_model,
            search_requests_topic=SEARCH_TOPIC,
            product_updates_topic=PRODUCT_TOPIC,
            dead_letter_topic=DEAD_LETTERS,
            reply_topic=REPLIES,
            max_message_bytes=MAX_MESSAGE_BYTES,
            max_image_pixels=1_000_000,
            _env_file=None,
        )
    )


@pytest.mark.slow  # 200 generated batches through the tiny model: ~8 s
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(values=batch)
def test_process_accounts_for_every_record(service: Service, loop: asyncio.AbstractEventLoop, values) -> None:
    records = records_for(values)
    report, out = loop.run_until_complete(service.process(records))

    assert report.rewind == {}, "a record failed in a way a retry cannot fix: it would be retried forever"
    dead = {int(dict(m.headers)["source.offset"]) for m in out if m.topic == DEAD_LETTERS}
    assert len(dead) == report.dead_letters == sum(m.topic == DEAD_LETTERS for m in out), "one dead letter per record at most"
    replies = [m for m in out if m.topic != DEAD_LETTERS]
    for m in out:
        assert isinstance(m.value, bytes) and all(isinstance(v, bytes) for _, v in m.headers)
    bodies = [json.loads(m.value) for m in replies]
    assert all(b["status"] in ("ok", "error") and b["schema_version"] == 1 for b in bodies)
    answered = {b["request_id"] for b in bodies}
    for b in bodies:
        event(f"reply: {b['status']} {b.get('error', {}).get('code', '')}".strip())
    for kind in ("products_applied", "products_stale", "duplicates"):
        if getattr(report, kind):
            event(kind)

    searches = [r for r in records if r.topic == SEARCH_TOPIC]
    expected_replies = 0
    for r in searches:
        rid, _ = reply_address(r.value)
        if r.offset in dead:
            expected_replies += rid is not None
        else:
            assert rid in answered, f"search record {r.value!r:.200} got neither a reply nor a dead letter"
            expected_replies += 1
    assert len(replies) == expected_replies == report.replies + report.error_replies + report.duplicates

    products = [r for r in records if r.topic == PRODUCT_TOPIC]
    dead_products = sum(r.offset in dead for r in products)
    assert report.products_applied + report.products_stale + dead_products == len(products)

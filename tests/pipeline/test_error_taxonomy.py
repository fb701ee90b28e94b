"""Every kind of bad input over the real broker: typed error replies, dead letters with
provenance headers, the dead-letter rate policy, and exactly one answer per request_id."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from aiokafka.structs import ConsumerRecord
from PIL import Image

from consumer.app import build_encoder, build_service
from consumer.config.settings import Settings
from devservices import create_topics
from tests.conftest import running, wait_for
from tests.kafka_tools import Tap, as_json, read_topics, send_raw, wait_committed

MAX_MESSAGE_BYTES = 64 * 1024
MAX_IMAGE_BYTES = 8 * 1024
MAX_IMAGE_PIXELS = 100_000


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def noise_png_b64(side: int = 64) -> str:
    """A PNG that does not compress: ~12 KB for 64x64, over ``MAX_IMAGE_BYTES``."""
    pixels = np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)
    return png_b64(Image.fromarray(pixels))


BOMB_B64 = png_b64(Image.new("1", (8000, 8000)))
"""8 KB of PNG that decodes to 64 Mpixel: rejected by the pixel limit before decoding."""
OVER_PIXELS_B64 = png_b64(Image.new("RGB", (400, 400), "blue"))
SMALL_PNG_B64 = png_b64(Image.new("RGB", (32, 32), "red"))
PAST = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()


def search(rid: str, **fields) -> dict:
    return {"request_id": rid, "query_text": "red shoes"} | fields


# (record key, raw value, expected code, request_id of the expected error reply or None)
SEARCH_CASES: list[tuple[str, bytes, str, str | None]] = [
    ("invalid-json", b'{"request_id": "e-invalid-json", "query_text": ', "invalid_json", None),
    ("not-utf8", b"\xff\xfe\x00garbage", "invalid_json", None),
    ("not-object", b'["e-list"]', "schema_violation", None),
    ("schema", as_json(search("e-schema", top_k="many")), "schema_violation", "e-schema"),
    ("schema-no-id", as_json({"query_text": "no id"}), "schema_violation", None),
    ("schema-extra-field", as_json(search("e-extra", colour="red")), "schema_violation", "e-extra"),
    ("version", as_json(search("e-version", schema_version=2)), "unsupported_schema_version", "e-version"),
    ("base64", as_json(search("e-base64", query_text=None, query_image_b64="%%% not base64 %%%")), "invalid_base64", "e-base64"),
    (
        "not-image",
        as_json(search("e-not-image", query_image_b64=base64.b64encode(b"just some bytes").decode())),
        "invalid_image",
        "e-not-image",
    ),
    ("pixels", as_json(search("e-pixels", query_text=None, query_image_b64=OVER_PIXELS_B64)), "image_too_large", "e-pixels"),
    ("bomb", as_json(search("e-bomb", query_image_b64=BOMB_B64)), "image_too_large", "e-bomb"),
    ("bytes", as_json(search("e-bytes", query_image_b64=noise_png_b64())), "image_too_large", "e-bytes"),
    ("empty", as_json(search("e-empty", query_text="   ")), "empty_query", "e-empty"),
    ("top-k", as_json(search("e-top-k", top_k=101)), "top_k_out_of_range", "e-top-k"),
    ("top-k-zero", as_json(search("e-top-k-zero", top_k=0)), "schema_violation", "e-top-k-zero"),
    ("filter", as_json(search("e-filter", filters={"colour": "red"})), "unknown_filter", "e-filter"),
    ("deadline", as_json(search("e-deadline", deadline=PAST)), "deadline_expired", "e-deadline"),
    ("too-big", as_json(search("e-too-big", query_image_b64="A" * MAX_MESSAGE_BYTES)), "message_too_large", "e-too-big"),
]

PRODUCT_CASES: list[tuple[str, bytes, str]] = [
    ("p-json", b"{not json", "invalid_json"),
    ("p-schema", as_json({"product_id": "bad-1", "version": "three", "name": "Mug"}), "schema_violation"),
    ("p-empty", as_json({"product_id": "bad-2", "version": 1}), "schema_violation"),
    ("p-version", as_json({"product_id": "bad-3", "version": 1, "name": "Mug", "schema_version": 7}), "unsupported_schema_version"),
    ("p-base64", as_json({"product_id": "bad-4", "version": 1, "image_b64": "!!"}), "invalid_base64"),
    ("p-not-image", as_json({"product_id": "bad-5", "version": 1, "image_b64": base64.b64encode(b"text").decode()}), "invalid_image"),
    ("p-bomb", as_json({"product_id": "bad-6", "version": 1, "image_b64": BOMB_B64}), "image_too_large"),
    ("p-too-big", as_json({"product_id": "bad-7", "version": 1, "name": "x" * MAX_MESSAGE_BYTES}), "message_too_large"),
]


def headers(record) -> dict[str, bytes]:
    return dict(record.headers or ())


def replies_by_id(records) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for r in records:
        out[headers(r)["correlation_id"].decode()].append(r)
    return out


@pytest.fixture
async def alt_reply_topic(broker, topics) -> str:
    name = topics["reply_topic"] + "-alt"
    await create_topics(broker.bootstrap, [name], partitions=1)
    return name


async def test_every_bad_input_gets_a_typed_error_reply_and_a_dead_letter(service_factory, topics, broker, alt_reply_topic):
    service = service_factory(max_message_bytes=MAX_MESSAGE_BYTES, max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_IMAGE_PIXELS)
    req, upd = topics["search_requests_topic"], topics["product_updates_topic"]
    messages = [(req, value, name.encode()) for name, value, _, _ in SEARCH_CASES]
    messages += [(upd, value, name.encode()) for name, value, _ in PRODUCT_CASES]
    messages += [
        (req, as_json(search("e-alt", top_k=500, reply_to=alt_reply_topic)), b"alt"),
        (req, as_json(search("e-bad-reply-to", reply_to="not a topic!")), b"bad-reply-to"),
        (req, as_json(search("ok-text")), b"ok-text"),
        (req, as_json(search("ok-image", query_text=None, query_image_b64=SMALL_PNG_B64)), b"ok-image"),
        (upd, as_json({"product_id": "good-1", "version": 1, "name": "Red shoes"}), b"good-1"),
    ]
    expected = {rid: code for _, _, code, rid in SEARCH_CASES if rid} | {"e-bad-reply-to": "schema_violation"}
    async with running(service):
        acks = await send_raw(broker.bootstrap, messages)
        where = {(m[0], a.partition, a.offset): m for m, a in zip(messages, acks, strict=True)}
        bad = len(SEARCH_CASES) + len(PRODUCT_CASES) + 2
        async with Tap(broker.bootstrap, topics["dead_letter_topic"], topics["reply_topic"], alt_reply_topic) as tap:
            await wait_for(
                lambda: (
                    len(tap.records(topics["dead_letter_topic"])) >= bad
                    and len(tap.records(topics["reply_topic"])) >= len(expected) + 2
                    and tap.records(alt_reply_topic)
                ),
                what="dead letters and replies",
            )
        await wait_for(lambda: "good-1" in service.index, what="the valid product indexed")
    got = await read_topics(broker.bootstrap, [topics["dead_letter_topic"], topics["reply_topic"], alt_reply_topic])

    dead = got[topics["dead_letter_topic"]]
    assert len(dead) == bad, [headers(d)["error.code"] for d in dead]
    codes = {}
    for d in dead:
        h = headers(d)
        source = (h["source.topic"].decode(), int(h["source.partition"]), int(h["source.offset"]))
        assert source in where, f"dead letter points at no published record: {source}"
        _topic, value, key = where[source]
        assert d.value == value, "a dead letter must carry the original bytes"
        assert d.key == key
        assert h["error.message"], h
        codes[key.decode()] = h["error.code"].decode()
    assert codes == {name: code for name, _, code, _ in SEARCH_CASES} | {name: code for name, _, code in PRODUCT_CASES} | {
        "alt": "top_k_out_of_range",
        "bad-reply-to": "schema_violation",
    }

    replies = replies_by_id(got[topics["reply_topic"]])
    assert set(replies) == set(expected) | {"ok-text", "ok-image"}
    for rid, code in expected.items():
        [record] = replies[rid]
        body = json.loads(record.value)
        assert body["status"] == "error" and body["request_id"] == rid
        assert body["error"]["code"] == code and body["error"]["message"], body
        assert headers(record)["event-type"] == b"error_reply.v1"
    for rid in ("ok-text", "ok-image"):
        [record] = replies[rid]
        assert json.loads(record.value)["status"] == "ok"
    [alt] = got[alt_reply_topic]
    assert json.loads(alt.value)["request_id"] == "e-alt" and json.loads(alt.value)["error"]["code"] == "top_k_out_of_range"


async def test_mostly_bad_input_never_stops_the_service(service_factory, topics, broker):
    """Client errors are answered and committed whatever their share: 30 garbage records in a row, then a search."""
    service = service_factory(max_batch_size=4)
    req = topics["search_requests_topic"]
    messages = [(req, b"garbage %d" % n, b"g%d" % n) for n in range(30)]
    messages += [(req, as_json(search(f"fine-{n}")), f"fine-{n}".encode()) for n in range(3)]
    await service.start()
    try:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.assigned.wait(), 30)
        acks = await send_raw(broker.bootstrap, messages)
        await wait_committed(broker.bootstrap, topics["consumer_group_id"], acks)
        assert not task.done(), "the service stopped on bad input"
        service.request_stop()
        await asyncio.wait_for(task, 30)
    finally:
        await service.close()
    got = await read_topics(broker.bootstrap, [topics["dead_letter_topic"], topics["reply_topic"]])
    assert len(got[topics["dead_letter_topic"]]) == 30
    assert {json.loads(r.value)["request_id"] for r in got[topics["reply_topic"]]} == {"fine-0", "fine-1", "fine-2"}
    errors = service.metrics.registry.get_sample_value("clip_search_errors_total", {"code": "invalid_json", "owner": "client"})
    assert errors == 30


async def test_duplicate_request_ids_are_answered_from_the_cache_and_deadlines_expire(settings_for, topics, broker):
    settings = settings_for(max_batch_wait_ms=50)
    encoder = build_encoder(settings)
    texts: list[str] = []
    encode_text = encoder.encode_text

    def counting_encode_text(batch: list[str]):
        texts.extend(batch)
        return encode_text(batch)

    encoder.encode_text = counting_encode_text
    service = build_service(settings, encoder)
    req, replies_topic = topics["search_requests_topic"], topics["reply_topic"]
    future = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()

    def msg(event: dict) -> tuple[str, bytes, bytes]:
        return req, as_json(event), event["request_id"].encode()

    async with running(service), Tap(broker.bootstrap, replies_topic) as tap:
        await send_raw(broker.bootstrap, [msg(search("d-1", query_text="first text")), msg(search("d-exp", deadline=PAST))])
        await wait_for(lambda: tap.reply_ids(replies_topic) >= {"d-1", "d-exp"}, what="first replies")
        await send_raw(
            broker.bootstrap,
            [
                msg(search("d-1", query_text="first text")),
                msg(search("d-1", query_text="a different text under the same id")),
                msg(search("d-exp", deadline=future)),
                msg(search("d-2", query_text="second text", deadline=future)),
                msg(search("d-2", query_text="second text", deadline=future)),
            ],
        )
        await wait_for(lambda: len(tap.records(replies_topic)) >= 7, what="all seven replies")
    assert texts.count("first text") == 1 and texts.count("second text") == 1, texts
    assert "a different text under the same id" not in texts
    assert service.search_handler.encoder is encoder

    replies = replies_by_id((await read_topics(broker.bootstrap, [replies_topic]))[replies_topic])
    assert {rid: len(rs) for rid, rs in replies.items()} == {"d-1": 3, "d-exp": 2, "d-2": 2}
    for rid, records in replies.items():
        assert len({r.value for r in records}) == 1, f"{rid} was answered with different bytes"
    assert json.loads(replies["d-1"][0].value)["status"] == "ok"
    assert json.loads(replies["d-2"][0].value)["status"] == "ok"
    expired = json.loads(replies["d-exp"][0].value)
    assert expired["status"] == "error" and expired["error"]["code"] == "deadline_expired"


async def test_records_left_for_a_retry_are_answered_once_by_the_retry(tiny_model):
    """While the store is down a partition is retried from its first failed record; bad records after
    that point get their error reply and dead letter from the retry, not from every attempt."""
    settings = Settings(
        kafka_bootstrap_servers="127.0.0.1:9",
        clip_model=tiny_model,
        search_requests_topic="req",
        product_updates_topic="upd",
        reply_topic="replies",
        dead_letter_topic="dlq",
        _env_file=None,
    )
    service = build_service(settings)

    async def store_down(*args, **kwargs):
        raise ConnectionError("store down")

    def records(topic: str, values: list[bytes]) -> list[ConsumerRecord]:
        return [ConsumerRecord(topic, 0, n, 0, 0, None, v, None, -1, len(v), []) for n, v in enumerate(values)]

    batch = records("upd", [b"{bad", as_json({"product_id": "p", "version": 1, "name": "Mug"}), b"{bad too"]) + records(
        "req", [as_json(search("r-bad", top_k=0)), as_json(search("r-ok")), as_json(search("r-bad-2", top_k=0))]
    )
    handle_products, handle_searches = service.product_handler.handle, service.search_handler.handle
    service.product_handler.handle = service.search_handler.handle = store_down
    report, out = await service.process(batch)
    assert {(tp.topic, offset) for tp, offset in report.rewind.items()} == {("upd", 1), ("req", 1)}
    assert sorted((m.topic, dict(m.headers).get("source.offset")) for m in out) == [("dlq", b"0"), ("dlq", b"0"), ("replies", None)]
    assert report.dead_letters == 2 and report.error_replies == 1

    service.product_handler.handle, service.search_handler.handle = handle_products, handle_searches
    retry = [r for r in batch if r.offset >= 1]
    report, out = await service.process(retry)
    assert report.rewind == {}
    assert sorted((m.topic, dict(m.headers).get("source.offset")) for m in out) == [
        ("dlq", b"2"),
        ("dlq", b"2"),
        ("replies", None),
        ("replies", None),
    ]
    assert report.products_applied == 1 and report.replies == 1 and report.error_replies == 1

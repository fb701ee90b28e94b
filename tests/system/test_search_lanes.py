"""ROLE=all searches first: a product batch in flight (an image encode) never holds a search batch."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from producer_examples.client import SearchClient, publish
from tests.conftest import running, wait_for
from tests.kafka_tools import committed_offsets

pytestmark = pytest.mark.integration  # the real broker

BACKLOG = 30


def png(n: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (n * 8 % 256, 80, 160)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_searches_are_answered_while_an_image_backlog_is_in_flight(service_factory, topics, broker):
    """A backlog of image updates is published first; its first product batch is held in the handler until the
    searches published meanwhile are answered. One loop for both would never answer them (the batch in flight
    holds it); with the lanes every search is answered with none of the backlog applied, and the backlog is then
    applied and committed in full."""
    service = service_factory(role="all", max_images_per_batch=2, max_batch_size=16)
    handle = service.product_handler.handle
    in_flight = asyncio.Event()
    release = asyncio.Event()
    slices: list[int] = []

    async def held_handle(updates):
        slices.append(len(updates))
        in_flight.set()
        await release.wait()
        return await handle(updates)

    service.product_handler.handle = held_handle
    products = [{"product_id": f"img-{n}", "version": 1, "name": f"picture {n}", "image_b64": png(n)} for n in range(BACKLOG)]
    async with running(service), SearchClient(broker.bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
        await publish(broker.bootstrap, topics["product_updates_topic"], products, key_field="product_id")
        await asyncio.wait_for(in_flight.wait(), 60)
        waiters = [await client.send({"request_id": f"first-{n}", "query_text": "picture"}) for n in range(5)]
        try:
            replies = await asyncio.wait_for(asyncio.gather(*waiters), 60)
            applied_when_answered = len(service.index)
        finally:
            release.set()
        await wait_for(lambda: len(service.index) == BACKLOG, timeout=60, what="the whole backlog applied")
    committed = await committed_offsets(broker.bootstrap, topics["consumer_group_id"], topics["product_updates_topic"])
    assert sorted(r["request_id"] for r in replies) == [f"first-{n}" for n in range(5)]
    assert all(r["status"] == "ok" for r in replies)
    assert applied_when_answered == 0, "searches waited for the product batch in flight"
    assert max(slices) <= 2 and sum(committed.values()) == BACKLOG, (slices, committed)

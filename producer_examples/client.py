"""A small async client: publish events, and wait for replies by correlation id.

``SearchClient`` reads its reply topic from the end (no consumer group), so many
clients can share one reply topic; each keeps only the replies it asked for.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.domain.wire import Header

CATALOG = Path(__file__).parent / "catalog" / "products.json"


def load_catalog(path: Path = CATALOG) -> list[dict[str, Any]]:
    """Sample catalog as ``ProductUpdated`` payloads (images inlined as base64)."""
    events = []
    for item in json.loads(path.read_text()):
        item = dict(item)
        image = item.pop("image", None)
        if image:
            item["image_b64"] = base64.b64encode((path.parent / image).read_bytes()).decode()
        events.append(item)
    return events


def product_text(event: dict[str, Any]) -> str:
    """The text the service encodes for a product without an image (name and description joined by '. ')."""
    return ". ".join(p.strip() for p in (event.get("name", ""), event.get("description", "")) if p and p.strip())


async def publish(bootstrap: str, topic: str, events: list[dict[str, Any]], key_field: str | None = None) -> None:
    """Publish JSON events and wait for the broker's acknowledgements."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        futures = []
        for event in events:
            key = str(event[key_field]).encode() if key_field and key_field in event else None
            futures.append(await producer.send(topic, json.dumps(event).encode(), key=key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class SearchClient:
    """Request/reply over Kafka: ``search`` publishes a request and returns the reply with its request_id."""

    def __init__(self, bootstrap: str, request_topic: str, reply_topic: str) -> None:
        self.bootstrap = bootstrap
        self.request_topic = request_topic
        self.reply_topic = reply_topic
        self._waiters: dict[str, asyncio.Future] = {}
        self.unmatched: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []

    async def __aenter__(self) -> SearchClient:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", max_request_size=8 * 1024 * 1024)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
        await self.producer.start()
        await self.consumer.start()
        partitions = await self._partitions()
        self.consumer.assign(partitions)
        await self.consumer.seek_to_end(*partitions)
        for tp in partitions:
            await self.consumer.position(tp)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _partitions(self) -> list[TopicPartition]:
        for _ in range(50):
            parts = self.consumer.partitions_for_topic(self.reply_topic)
            if parts:
                return [TopicPartition(self.reply_topic, p) for p in sorted(parts)]
            await self.consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        raise RuntimeError(f"reply topic {self.reply_topic!r} does not exist")

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.consumer.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        async for record in self.consumer:
            headers = dict(record.headers or ())
            reply = json.loads(record.value)
            reply["_headers"] = {k: v.decode() for k, v in headers.items()}
            self.replies.append(reply)
            waiter = self._waiters.pop(headers.get(Header.CORRELATION_ID, b"").decode(), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(reply)
            else:
                self.unmatched.append(reply)

    async def send(self, request: dict[str, Any]) -> asyncio.Future:
        """Publish ``request`` (request_id and reply_to filled in if absent); the future resolves with the reply."""
        request = {"request_id": uuid.uuid4().hex, "reply_to": self.reply_topic} | request
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[request["request_id"]] = waiter
        await self.producer.send_and_wait(self.request_topic, json.dumps(request).encode(), key=request["request_id"].encode())
        return waiter

    async def search(self, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return await asyncio.wait_for(await self.send(request), timeout)

"""Test-side Kafka helpers: raw publishing, whole-topic reads and a background tap.

These read the broker directly (no consumer group), so what they report is what a
client of the service would see on the reply and dead-letter topics.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, RecordMetadata

Message = tuple[str, bytes | None, bytes | None]
"""(topic, value, key) of one record to publish."""


async def send_raw(bootstrap: str, messages: Sequence[Message]) -> list[RecordMetadata]:
    """Publish ``messages`` in order (values as given, no encoding) and return each broker acknowledgement."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for topic, value, key in messages]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


def as_json(event: dict) -> bytes:
    return json.dumps(event).encode()


async def _partitions(consumer: AIOKafkaConsumer, topic: str, timeout: float = 30.0) -> list[TopicPartition]:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (parts := consumer.partitions_for_topic(topic)):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"topic {topic!r} has no partitions")
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    return [TopicPartition(topic, p) for p in sorted(parts)]


async def read_topics(bootstrap: str, topics: Iterable[str]) -> dict[str, list[ConsumerRecord]]:
    """Every record currently in each of ``topics`` (all partitions), read from offset 0 (the earliest if that is gone).

    Reads up to the high watermark of fetch responses: Tansu's ListOffsets reports the
    base offset of the last record batch + 1, not the log end offset.
    """
    topics = list(topics)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [tp for t in topics for tp in await _partitions(consumer, t)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:  # offset 0, not seek_to_beginning: Tansu's ListOffsets(earliest) was once seen answering a later batch's base offset
            consumer.seek(tp, 0)
        out: dict[str, list[ConsumerRecord]] = {t: [] for t in topics}

        async def done() -> bool:
            for tp in tps:
                high = consumer.highwater(tp)
                if high is None or await consumer.position(tp) < max(high, ends[tp]):
                    return False
            return True

        deadline = asyncio.get_running_loop().time() + 30
        while not await done():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"could not read {topics} to their end")
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                out[tp.topic].extend(records)
        return out
    finally:
        await consumer.stop()


async def read_topic_records(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    """Every record currently in ``topic`` (``read_topics`` for one topic)."""
    return (await read_topics(bootstrap, [topic]))[topic]


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """partition -> committed offset of ``group`` on ``topic`` (0 where nothing was committed)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic)
        consumer.assign(tps)
        return {tp.partition: (await consumer.committed(tp)) or 0 for tp in tps}
    finally:
        await consumer.stop()


class Tap:
    """Reads ``topics`` from offset 0 in the background, keeping the newest record per (partition, offset).

    For progress checks while a test runs; final assertions should use ``read_topics``,
    which reports what the broker holds. Broker outages are ridden out (aiokafka reconnects).
    """

    def __init__(self, bootstrap: str, *topics: str) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self._seen: dict[tuple[str, int, int], ConsumerRecord] = {}
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Tap:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=20
        )
        await self.consumer.start()
        tps = [tp for t in self.topics for tp in await _partitions(self.consumer, t)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()

    async def _read(self) -> None:
        while True:
            try:
                batch = await self.consumer.getmany(timeout_ms=200)
            except KafkaError:
                await asyncio.sleep(0.2)
                continue
            for tp, records in batch.items():
                for r in records:
                    self._seen[(tp.topic, tp.partition, r.offset)] = r

    def records(self, topic: str) -> list[ConsumerRecord]:
        return [r for (t, _, _), r in self._seen.items() if t == topic]

    def reply_ids(self, topic: str) -> set[str]:
        """Distinct request_ids answered on ``topic`` so far."""
        return {dict(r.headers).get("correlation_id", b"").decode() for r in self.records(topic)}


async def wait_committed(bootstrap: str, group: str, acks: Sequence[RecordMetadata], timeout: float = 60.0) -> None:
    """Poll until ``group`` has committed past every acknowledged record in ``acks``."""
    ends: dict[str, dict[int, int]] = {}
    for a in acks:
        per_topic = ends.setdefault(a.topic, {})
        per_topic[a.partition] = max(per_topic.get(a.partition, 0), a.offset + 1)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        behind = {}
        for topic, want in ends.items():
            committed = await committed_offsets(bootstrap, group, topic)
            behind |= {(topic, p): (committed.get(p, 0), end) for p, end in want.items() if committed.get(p, 0) < end}
        if not behind:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{group} did not commit everything: (committed, end) {behind}")
        await asyncio.sleep(0.2)

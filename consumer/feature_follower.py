"""Follows the compacted features topic into a search replica's in-memory index.

Every search replica reads every partition (no consumer group) from the beginning,
so each holds the complete catalog while search requests are shared out by the
consumer group. ``catch_up`` returns once the end offsets seen at start are reached.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import TopicPartition
from pydantic import ValidationError

from consumer.config import Settings
from consumer.feature_index import FeatureIndex
from consumer.handlers import apply_feature_event
from consumer.transport import make_consumer
from schemas import ProductFeature

log = logging.getLogger(__name__)


class FeatureFollower:
    def __init__(self, settings: Settings, index: FeatureIndex, model_id: str, lock: asyncio.Lock) -> None:
        self.settings = settings
        self.lock = lock
        self.index = index
        self.model_id = model_id
        self.applied = 0
        self.invalid = 0
        self._consumer = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        topic = self.settings.features_topic
        self._consumer = make_consumer(self.settings, group_id=None)
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + 30
        while not parts:
            if time.monotonic() > deadline:
                raise RuntimeError(f"features topic {topic!r} not found")
            await self._consumer._client.force_metadata_update()
            parts = self._consumer.partitions_for_topic(topic)
        self._partitions = [TopicPartition(topic, p) for p in sorted(parts)]
        self._consumer.assign(self._partitions)
        await self._consumer.seek_to_beginning(*self._partitions)

    async def catch_up(self, timeout: float = 300.0) -> None:
        """Apply every record up to the end offsets as of now."""
        targets = await self._consumer.end_offsets(self._partitions)
        deadline = time.monotonic() + timeout
        while not await self._reached(targets):
            if time.monotonic() > deadline:
                raise TimeoutError("features topic catch-up timed out")
            await self._poll(500)
        log.info("caught up with %s: %d products indexed", self.settings.features_topic, len(self.index))

    async def _reached(self, targets: dict[TopicPartition, int]) -> bool:
        for tp, end in targets.items():
            if await self._consumer.position(tp) < end:
                return False
        return True

    async def _poll(self, timeout_ms: int) -> None:
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=2048)
        async with self.lock:
            self._apply(batches)

    def _apply(self, batches: dict) -> None:
        for records in batches.values():
            for record in records:
                try:
                    event = ProductFeature.model_validate_json(record.value or b"")
                except ValidationError:
                    self.invalid += 1
                    log.warning("skipping invalid features record at %s:%d", record.partition, record.offset)
                    continue
                if apply_feature_event(self.index, event, self.model_id):
                    self.applied += 1

    def run_in_background(self) -> None:
        async def loop() -> None:
            while True:
                await self._poll(1000)

        self._task = asyncio.create_task(loop(), name="feature-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

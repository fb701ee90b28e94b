"""Follows the compacted features topic into a search replica's in-memory index (and an ingest replica's).

Every search replica reads every partition (no consumer group), so each holds the complete
catalog while search requests are shared out by the consumer group. ``start`` begins at the
offsets of the index snapshot when ``INDEX_SNAPSHOT_DIR`` holds a usable one, else at the
beginning; ``catch_up`` returns once every partition is read up to the high watermark the
broker reports; ``run_in_background`` then keeps following and writes a snapshot every
``INDEX_SNAPSHOT_INTERVAL_S`` while the index changes, as two supervised tasks (see
``consumer.ops.supervisor``); ``stop`` writes a last one.

A snapshot whose offsets the topic no longer has (recreated or truncated) is discarded and
the whole topic is read again: the broker either reports the offset out of range or
reports a high watermark below it.

An ingest replica with ``INGEST_WRITES_SNAPSHOTS`` (and ``INDEX_SNAPSHOT_DIR``) runs the same
follower only to write snapshots, so the first search replica of a deployment starts from one:
``follow_unattended`` does the start, the catch-up (then one snapshot at once) and the following
in supervised background tasks, in polls of ``INGEST_POLL_RECORDS``, so neither the ingest
replica's start nor its product lane waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from consumer.config.settings import Settings
from consumer.domain.errors import StartupError
from consumer.index.feature_index import FeatureIndex
from consumer.index.snapshot import SnapshotError, SnapshotFile
from consumer.kafka.clients import make_consumer, start_kafka_client
from consumer.ops.memory import release_memory
from consumer.ops.metrics import ServiceMetrics
from consumer.ops.supervisor import Policy, Supervisor
from consumer.pipeline.features import apply_feature_events, parse_feature_records

log = logging.getLogger(__name__)

JOIN_AHEAD_RECORDS = 40_000
"""Records left to catch up on when the replica starts joining its consumer group: about a second of
catch-up (40k records/s on 2 cores), as long as a group join takes, so the two end together and the
replica holds no partition it cannot serve yet for long, whatever the catalog size."""

INGEST_POLL_RECORDS = 512
"""Records an ingest replica's follower applies per poll: about 10 ms of the event loop (parsing and int8 index
upserts, median 8 ms here), so a catch-up of the whole topic holds the product lane's publishes and commits back
by about that at a time."""

FOLLOWER_TASK = "feature-follower"
SNAPSHOT_TASK = "index-snapshot-writer"
PARTITIONS_RETRY_S = 0.2


class FeatureFollower:
    def __init__(
        self,
        settings: Settings,
        index: FeatureIndex,
        model_id: str,
        lock: asyncio.Lock,
        metrics: ServiceMetrics | None = None,
        *,
        poll_records: int = 4096,
    ) -> None:
        """``model_id``: the encoder's (features of another model are skipped); it and the index's dtype and dim name the
        snapshot file, so replicas of every role that share them share the file. ``poll_records``: most records per poll."""
        self.settings = settings
        self.metrics = metrics
        self.lock = lock
        self.index = index
        self.model_id = model_id
        self.applied = 0
        self.invalid = 0
        self.snapshot_loaded = False
        self.snapshots_written = 0
        self.caught_up = False
        self.poll_records = poll_records
        self._started = False
        self.snapshot_file = (
            SnapshotFile(settings.index_snapshot_dir, settings.features_topic, model_id, index.dtype, index.dim)
            if settings.index_snapshot_dir
            else None
        )
        self._next: dict[TopicPartition, int] = {}
        self._changes = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._supervisor: Supervisor | None = None

    async def start(self, connect: Callable[[Any], Awaitable[None]] | None = None, partitions_timeout_s: float = 30.0) -> None:
        """Connect, assign every partition of the features topic and seek to the snapshot's offsets (or the beginning).

        ``connect(client)`` starts the consumer (the service passes ``start_kafka_client`` wrapped in
        its reconnect backoff; default: ``start_kafka_client`` once). Raises ``StartupError`` naming
        ``FEATURES_TOPIC`` if the topic has no partitions within ``partitions_timeout_s``.
        """
        self._consumer = make_consumer(self.settings, group_id=None, auto_offset_reset="none")
        await (connect or (lambda client: start_kafka_client(self.settings, client)))(self._consumer)
        self._partitions = await self._find_partitions(partitions_timeout_s)
        self._consumer.assign(self._partitions)
        offsets = await asyncio.to_thread(self._load_snapshot)
        if offsets is None:
            await self._from_beginning()
        else:
            for tp in self._partitions:
                if tp.partition in offsets:
                    self._consumer.seek(tp, offsets[tp.partition])
                else:
                    await self._consumer.seek_to_beginning(tp)
            self._next = {tp: await self._consumer.position(tp) for tp in self._partitions}
        self._started = True

    @property
    def _kafka(self) -> AIOKafkaConsumer:
        """The consumer ``start`` made; every step but ``start`` and ``stop`` runs after it."""
        assert self._consumer is not None, "FeatureFollower.start() has not run"
        return self._consumer

    async def _find_partitions(self, timeout_s: float) -> list[TopicPartition]:
        """The topic's partitions from the consumer's metadata, refreshed every ``PARTITIONS_RETRY_S`` until known.

        aiokafka 0.14 has no public consumer call that refreshes the metadata ``partitions_for_topic``
        reads for a topic that is assigned rather than subscribed (``topics()`` fetches into a
        throwaway ``ClusterMetadata``), hence the private ``force_metadata_update``.
        """
        topic = self.settings.features_topic
        deadline = time.monotonic() + timeout_s
        while not (parts := self._kafka.partitions_for_topic(topic)):
            if time.monotonic() >= deadline:
                raise StartupError(f"the features topic {topic!r} (FEATURES_TOPIC) has no partitions after {timeout_s:g} s: create it")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kafka._client.force_metadata_update(), max(deadline - time.monotonic(), 0.1))
            if not self._kafka.partitions_for_topic(topic):
                await asyncio.sleep(PARTITIONS_RETRY_S)
        return [TopicPartition(topic, p) for p in sorted(parts)]

    def _load_snapshot(self) -> dict[int, int] | None:
        if self.snapshot_file is None:
            return None
        started = time.monotonic()
        try:
            snapshot = self.snapshot_file.load()
            if snapshot is None:
                log.info("no index snapshot at %s yet: reading the whole features topic", self.snapshot_file.path)
                return None
            self.index.restore(snapshot.state)
        except (SnapshotError, ValueError) as exc:
            log.warning("ignoring the index snapshot: %s", exc)
            self.index.clear()
            return None
        self.snapshot_loaded = True
        if self.metrics is not None:
            self.metrics.index_snapshot_timestamp.set(self.snapshot_file.path.stat().st_mtime)
        log.info(
            "loaded the index snapshot of %s: %d products in %.2f s, reading %s from offsets %s",
            snapshot.created,
            len(self.index),
            time.monotonic() - started,
            self.settings.features_topic,
            snapshot.offsets,
        )
        return snapshot.offsets

    async def _from_beginning(self) -> None:
        await self._kafka.seek_to_beginning(*self._partitions)
        self._next = {tp: await self._kafka.position(tp) for tp in self._partitions}

    async def _discard_snapshot(self, why: str) -> None:
        log.warning("discarding the index snapshot (%s): reading the whole features topic", why)
        async with self.lock:
            self.index.clear()
        self.snapshot_loaded = False
        self._changes += 1
        await self._from_beginning()

    @property
    def has_snapshot(self) -> bool:
        """A snapshot file exists (it may still turn out unusable)."""
        return self.snapshot_file is not None and self.snapshot_file.path.exists()

    async def catch_up(
        self, timeout: float = 300.0, nearly_done: Callable[[], Awaitable[None]] | None = None, nearly: int = JOIN_AHEAD_RECORDS
    ) -> None:
        """Apply every record up to the high watermark of every partition.

        ``nearly_done`` is awaited once, as soon as at most ``nearly`` records remain, so the
        caller can start slow work (a consumer group join) that overlaps the rest.
        """
        deadline = time.monotonic() + timeout
        checked_snapshot = not self.snapshot_loaded
        reserved = False
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"features topic catch-up did not finish in {timeout:.0f} s")
            try:
                await self._poll(50)
            except OffsetOutOfRangeError as exc:
                await self._discard_snapshot(f"the broker has no offset {exc}")
                checked_snapshot = True
                continue
            marks = {tp: self._kafka.highwater(tp) for tp in self._partitions}
            if any(mark is None for mark in marks.values()):
                continue
            if not checked_snapshot:
                behind = {tp.partition: (self._next[tp], mark) for tp, mark in marks.items() if mark < self._next[tp]}
                checked_snapshot = True
                if behind:
                    await self._discard_snapshot(f"the topic ends before the snapshot's offsets (offset, end): {behind}")
                    continue
            remaining = sum(max(0, mark - self._next[tp]) for tp, mark in marks.items())
            if not reserved:
                reserved = True
                self.index.reserve(len(self.index) + remaining)
            if nearly_done is not None and remaining <= nearly:
                await nearly_done()
                nearly_done = None
            if remaining == 0:
                break
        self.caught_up = True
        log.info("caught up with %s: %d products indexed", self.settings.features_topic, len(self.index))

    async def _poll(self, timeout_ms: int) -> None:
        batches = await self._kafka.getmany(timeout_ms=timeout_ms, max_records=self.poll_records)
        if not batches:
            return
        fetched = [record for records in batches.values() for record in records]
        events, unparsable = parse_feature_records([record.value for record in fetched])
        for i in unparsable:
            self.invalid += 1
            log.warning("skipping invalid features record at %s:%d", fetched[i].partition, fetched[i].offset)
        async with self.lock:
            report = apply_feature_events(self.index, events, self.model_id)
            for tp, records in batches.items():
                if records:
                    self._next[tp] = records[-1].offset + 1
                    self._changes += len(records)
                    if self.metrics is not None:
                        self.metrics.feature_records.inc(len(records))
        if report.invalid:
            self.invalid += len(report.invalid)
            log.warning("skipping %d features records with unusable vectors, e.g. %r", len(report.invalid), report.invalid[0])
        self.applied += report.applied

    def run_in_background(self, supervisor: Supervisor) -> None:
        """Keep following, and write a snapshot every ``INDEX_SNAPSHOT_INTERVAL_S`` if the index changed,
        as tasks of ``supervisor`` that are restarted when they fail."""
        self._supervisor = supervisor
        supervisor.start(FOLLOWER_TASK, self._follow, Policy.RESTART, reports_recovery=True)
        if self.snapshot_file is not None and self.settings.index_snapshot_interval_s > 0:
            supervisor.start(SNAPSHOT_TASK, self._write_snapshots, Policy.RESTART)

    def follow_unattended(self, supervisor: Supervisor, connect: Callable[[Any], Awaitable[None]] | None = None) -> None:
        """Start, catch up, write a snapshot (if ``INDEX_SNAPSHOT_INTERVAL_S`` > 0) and keep following, all as tasks of
        ``supervisor`` (the ingest role: nothing waits for the index, and a failure is logged, counted and restarted
        like the search role's follower, resuming after the last applied record); snapshots as ``run_in_background``."""
        self._supervisor = supervisor
        supervisor.start(FOLLOWER_TASK, lambda: self._start_and_follow(connect), Policy.RESTART, reports_recovery=True)
        if self.snapshot_file is not None and self.settings.index_snapshot_interval_s > 0:
            supervisor.start(SNAPSHOT_TASK, self._write_snapshots, Policy.RESTART)

    async def _start_and_follow(self, connect: Callable[[Any], Awaitable[None]] | None) -> None:
        supervisor = self._supervisor
        assert supervisor is not None  # follow_unattended sets it before it starts this task
        if not self._started:
            if self._consumer is not None:
                await self._consumer.stop()
                self._consumer = None
            await self.start(connect)
        if not self.caught_up:
            for tp, offset in self._next.items():
                self._kafka.seek(tp, offset)
            supervisor.recovered(FOLLOWER_TASK)
            await self.catch_up(timeout=math.inf)
            if self.settings.index_snapshot_interval_s > 0:
                await self.write_snapshot()
        await self._follow()

    async def _follow(self) -> None:
        """Poll forever from the offsets after the last applied records (re-seeked, so a restart after a
        failure re-reads what the failed poll fetched); every successful poll reports recovery."""
        supervisor = self._supervisor
        assert supervisor is not None  # run_in_background sets it before it starts this task
        for tp, offset in self._next.items():
            self._kafka.seek(tp, offset)
        while True:
            try:
                await self._poll(1000)
            except OffsetOutOfRangeError as exc:
                log.error("features topic offset %s is gone: re-reading the topic from the beginning", exc)
                await self._kafka.seek_to_beginning(*self._partitions)
                continue
            supervisor.recovered(FOLLOWER_TASK)

    async def _write_snapshots(self) -> None:
        while True:
            await asyncio.sleep(self.settings.index_snapshot_interval_s)
            await self.write_snapshot()

    async def write_snapshot(self) -> bool:
        """Write the index and the offsets it reflects if anything changed since the last write; True if written.

        A failed write (disk full, read-only volume) is logged and leaves the previous snapshot in place.
        """
        if self.snapshot_file is None or self._changes == 0:
            return False
        async with self.lock:
            changes = self._changes
            offsets = {tp.partition: offset for tp, offset in self._next.items()}
            started = time.monotonic()
            try:
                size = await asyncio.to_thread(self.snapshot_file.save, self.index, offsets)
            except (OSError, ValueError) as exc:
                log.error("could not write the index snapshot %s: %s", self.snapshot_file.path, exc)
                if self.metrics is not None:
                    self.metrics.index_snapshot_writes.labels("failed").inc()
                return False
        if self.metrics is not None:
            self.metrics.index_snapshot_writes.labels("written").inc()
            self.metrics.index_snapshot_timestamp.set(time.time())
        self._changes -= changes
        self.snapshots_written += 1
        release_memory()
        log.info(
            "wrote the index snapshot %s: %d products, %.1f MB in %.2f s",
            self.snapshot_file.path,
            len(self.index),
            size / 1e6,
            time.monotonic() - started,
        )
        return True

    async def stop(self) -> None:
        """Cancel the background tasks and, if they ran, write a last snapshot; then stop the consumer."""
        if self._supervisor is not None:
            await self._supervisor.cancel(FOLLOWER_TASK, SNAPSHOT_TASK)
            self._supervisor = None
            await self.write_snapshot()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

"""The consumer service: poll a micro-batch, handle it, publish outcomes, then commit.

Contract per batch (at-least-once, nothing lost):
1. ``collect_batch`` gathers up to ``MAX_BATCH_SIZE`` records or waits at most
   ``MAX_BATCH_WAIT_MS`` after the first one (no wait at light load: ``BATCH_WAIT_MIN_RECORDS``).
2. ``BatchProcessor`` turns them into replies, dead letters and one outcome per record
   (product updates first, then searches in one batched encode and ranking pass).
3. All outbound messages are published and acknowledged by the broker; a reply the broker
   refuses is dead-lettered instead.
4. Only then are the batch's offsets committed. A crash anywhere before step 4
   re-delivers the batch to this or another replica.
The one ``Service`` class (about 430 lines) is the replica's lifecycle: start-up per role, the
loop, commits, pauses and close share its clients and events; record handling, retries,
pauses and catalog fills live in ``pipeline/`` and ``kafka/partition_pauses.py``.
A rebalance waits for the batches in flight to finish (the revoke callback blocks);
records count as in flight from the moment ``collect_batch`` receives them, and a
pending rebalance cuts the collection short.

Lanes: ROLE=all runs two such loops on the one consumer, a search lane over the
search-request partitions and a product lane over the product-update partitions
(``getmany(*partitions)``), so a search batch never waits for an image encode (it runs
in a worker thread). While the product lane handles a batch its partitions are paused
and their prefetched records dropped, so the fetcher keeps fetching search records
(aiokafka holds back a broker's next fetch while records of it are left unconsumed).
The other roles run one lane over every assigned partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord

from consumer.config.settings import Role, Settings
from consumer.domain.errors import ReplyUndeliverable
from consumer.domain.messages import Outbound
from consumer.domain.retry import RetryPolicy
from consumer.domain.wire import JSON_CONTENT_TYPE, EventType, Header
from consumer.encoder.encoder import Encoder
from consumer.encoder.images import ImageLimits
from consumer.index.feature_index import FeatureIndex
from consumer.kafka.clients import make_consumer, make_producer, start_kafka_client
from consumer.kafka.feature_follower import INGEST_POLL_RECORDS, FeatureFollower
from consumer.kafka.partition_pauses import PartitionPauses
from consumer.kafka.transport import publish_all, publish_each
from consumer.ops.memory import release_memory
from consumer.ops.metrics import ServiceMetrics
from consumer.ops.supervisor import Supervisor
from consumer.pipeline.backpressure import MemoryGuard
from consumer.pipeline.batching import collect_batch
from consumer.pipeline.catalog import fill_index_from_store, reencode_other_models
from consumer.pipeline.features import feature_event
from consumer.pipeline.messages import dead_letter
from consumer.pipeline.outcomes import BatchReport
from consumer.pipeline.processor import BatchProcessor, CachedReply
from consumer.pipeline.products import ProductHandler, ProductOutcome
from consumer.pipeline.reply_cache import ReplyCache
from consumer.pipeline.search import IndexRanker, SearchHandler, StoreRanker
from consumer.store.client import MongoUnreachable, check_mongo

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Lane:
    """One collect/handle/publish/commit loop over the assigned partitions of ``topics`` (None: all of them)."""

    def __init__(self, name: str, topics: frozenset[str] | None, hold: bool = False) -> None:
        self.name = name
        self.topics = topics
        self.hold = hold
        """Pause the lane's partitions while it handles a batch (dropping what was prefetched for them)."""
        self.held: set[TopicPartition] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        """Clear from the moment records are fetched until their batch is committed (or given up)."""
        self.fetched_at = 0.0
        """Epoch time of the current batch's first non-empty fetch."""

    def partitions(self, assigned: set[TopicPartition]) -> list[TopicPartition]:
        return [tp for tp in assigned if self.topics is None or tp.topic in self.topics]


class _WaitForBatch(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type information, so its base class is Any
    def __init__(self, service: Service) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.service._revoking.set()
        try:
            for lane in self.service.lanes:
                await lane.idle.wait()
        finally:
            self.service._revoking.clear()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.service.assignment = set(assigned)
        self.service.assigned.set()
        self.service._assignment_changed.set()
        self.service._assignment_changed.clear()
        log.info("assigned partitions: %s", sorted((tp.topic, tp.partition) for tp in assigned))


class Service:
    """One replica. ``start`` connects, ``run`` loops until ``request_stop``, ``close`` releases everything."""

    def __init__(self, settings: Settings, encoder: Encoder, index: FeatureIndex | None, store: Any = None) -> None:
        """``index`` is None in on-demand mode (``CACHE_PRODUCTS=false``), where ``store`` ranks instead."""
        self.settings = settings
        self.encoder = encoder
        self.index = index
        self.store = store
        self.retry_policy = RetryPolicy(settings.retry_backoff_s, settings.retry_backoff_max_s)
        self.metrics = ServiceMetrics(
            search_topic=settings.search_requests_topic,
            encoder=encoder,
            index=index,
            memory_limit_bytes=settings.memory_limit_mb * 2**20 if settings.memory_limit_mb else None,
            labels={"role": settings.role.value, "model": encoder.model_id, "random_weights": str(encoder.random_weights).lower()},
        )
        self.index_lock = asyncio.Lock()
        self.search_handler, self.product_handler = self._handlers()
        self.processor = BatchProcessor(settings, self.search_handler, self.product_handler)
        self.metrics.reply_cache = self.processor.reply_cache
        self.follower: FeatureFollower | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.assigned = asyncio.Event()
        self.assignment: set[TopicPartition] = set()
        self._assignment_changed = asyncio.Event()
        self.lanes = (
            [
                _Lane("search", frozenset({settings.search_requests_topic})),
                _Lane("products", frozenset({settings.product_updates_topic}), True),
            ]
            if settings.role is Role.ALL
            else [_Lane(settings.role.value, None)]
        )
        self._stopping = asyncio.Event()
        self._revoking = asyncio.Event()
        self.batches = 0
        self._lag_updated = 0.0
        self.pauses = PartitionPauses(self.retry_policy)
        limit = settings.memory_limit_mb * 1024 * 1024 if settings.memory_limit_mb else None
        self.memory_guard = MemoryGuard(limit, settings.memory_low_water)
        self.exit_code = 0
        """The process exit code ``request_stop`` was last given a non-zero one for (0: a normal stop)."""
        self.supervisor = Supervisor(self.request_stop, self.metrics.background_task_failures, self.retry_policy)

    def _handlers(self) -> tuple[SearchHandler, ProductHandler]:
        s, index = self.settings, self.index
        limits = ImageLimits(s.max_image_bytes, s.max_image_pixels)
        ranker = (
            IndexRanker(index, self.index_lock) if index is not None else StoreRanker(self.store, self.encoder.model_id, s.store_chunk_rows)
        )
        search = SearchHandler(self.encoder, ranker, default_top_k=s.top_k, default_threshold=s.similarity_threshold, image_limits=limits)
        ingest = s.role is Role.INGEST
        products = ProductHandler(
            self.encoder,
            None if ingest else index,
            limits,
            store=self.store,
            before_apply=self._publish_features if ingest else None,
            on_encoded=lambda kind, n: self.metrics.product_encodes.labels(kind).inc(n),
            image_nice=s.image_threads_nice,
        )
        return search, products

    @property
    def reply_cache(self) -> ReplyCache[CachedReply]:
        """The processor's cache of first replies."""
        return self.processor.reply_cache

    @property
    def _group_consumer(self) -> AIOKafkaConsumer:
        """The group consumer ``start`` made; the batch steps only run after it."""
        assert self.consumer is not None, "Service.start() has not run"
        return self.consumer

    @property
    def topics(self) -> list[str]:
        s = self.settings
        return {
            Role.ALL: [s.search_requests_topic, s.product_updates_topic],
            Role.SEARCH: [s.search_requests_topic],
            Role.INGEST: [s.product_updates_topic],
        }[s.role]

    async def start(self) -> None:
        """Connect, bring the catalog up to date for the role, and join the consumer group.

        An ingest replica that writes snapshots (``Settings.ingest_snapshots``) then starts its follower in the
        background (``FeatureFollower.follow_unattended``): nothing here waits for it.
        """
        s = self.settings
        if not s.lazy_load_model:
            towers = ("text",) if s.role is Role.SEARCH else ("text", "vision")
            await asyncio.to_thread(self.encoder.ensure_loaded, *towers)
        self.producer = make_producer(s)
        await self._with_backoff("connect the producer", lambda: start_kafka_client(s, self.producer))
        if self.store is not None:
            await self._start_store()
        if s.role is Role.SEARCH and self.index is not None:
            await self._start_follower()
        await self._join_group()
        if s.ingest_snapshots and self.index is not None and self.follower is None:
            self.follower = FeatureFollower(
                s, self.index, self.encoder.model_id, self.index_lock, self.metrics, poll_records=INGEST_POLL_RECORDS
            )
            self.follower.follow_unattended(self.supervisor)
        group = s.ingest_group_id if s.role is Role.INGEST else s.consumer_group_id
        log.info("consuming %s as group %s (role=%s)", self.topics, group, s.role.value)

    async def _start_store(self) -> None:
        s, model_id = self.settings, self.encoder.model_id
        client = self.store.collection.database.client
        await self._with_backoff("reach the store", lambda: check_mongo(client, s), transient=(MongoUnreachable,))
        await self.store.ensure_indexes()
        if s.role is not Role.SEARCH:
            await reencode_other_models(self.store, self.product_handler, model_id)
        if s.role is Role.ALL and self.index is not None:
            await fill_index_from_store(self.store, self.index, model_id)

    async def _start_follower(self) -> None:
        """Search role: fill the index (snapshot, else store), catch up with the features topic, keep following.

        The group join overlaps the end of the catch-up (``catch_up(nearly_done=...)``).
        """
        s = self.settings
        assert self.index is not None
        self.follower = FeatureFollower(s, self.index, self.encoder.model_id, self.index_lock, self.metrics)
        started = time.monotonic()
        if self.follower.has_snapshot:
            await self._join_group()
        elif self.store is not None:
            await fill_index_from_store(self.store, self.index, self.encoder.model_id)
        await self.follower.start(
            connect=lambda client: self._with_backoff("connect the features consumer", lambda: start_kafka_client(s, client))
        )
        await self.follower.catch_up(nearly_done=self._join_group)
        self.metrics.index_catch_up.set(time.monotonic() - started)
        release_memory()
        self.follower.run_in_background(self.supervisor)

    async def _join_group(self) -> None:
        """Subscribe to the role's topics; aiokafka joins the group in the background (idempotent).

        A search replica calls this while it finishes catching up with the features topic, so
        the group join (about a second) overlaps that work; ``run`` polls only after ``start``.
        """
        if self.consumer is not None:
            return
        s = self.settings
        self.consumer = make_consumer(s, s.ingest_group_id if s.role is Role.INGEST else s.consumer_group_id)
        await self._with_backoff("connect the consumer", lambda: start_kafka_client(s, self.consumer))
        self.consumer.subscribe(self.topics, listener=_WaitForBatch(self))

    async def _publish_features(self, outcomes: list[ProductOutcome]) -> None:
        """Ingest role: features reach the compacted topic (acknowledged) before they are stored."""
        headers = [(Header.CONTENT_TYPE, JSON_CONTENT_TYPE.encode()), (Header.EVENT_TYPE, EventType.PRODUCT_FEATURE.encode())]
        model_id = self.encoder.model_id
        messages = [
            Outbound(
                self.settings.features_topic,
                feature_event(o.update, o.feature, model_id).model_dump_json().encode(),
                o.update.product_id.encode(),
                headers,
            )
            for o in outcomes
        ]
        await self.publish(messages)

    @property
    def stop_requested(self) -> asyncio.Event:
        """Set once ``request_stop`` was called (wait on it; never set it directly)."""
        return self._stopping

    def request_stop(self, exit_code: int = 0) -> None:
        """Finish the batch in flight, commit it, then leave ``run``; a non-zero ``exit_code`` is kept in ``exit_code``."""
        self.exit_code = exit_code or self.exit_code
        self._stopping.set()

    async def _with_backoff(
        self, what: str, attempt: Callable[[], Awaitable[T]], transient: tuple[type[BaseException], ...] = (KafkaError, OSError)
    ) -> T:
        """Retry ``attempt`` on ``transient`` errors, pausing ``retry_policy.delay(n)``, until it succeeds or a stop is requested."""
        failures = 0
        while True:
            try:
                return await attempt()
            except transient as exc:
                failures += 1
                if self._stopping.is_set():
                    raise
                delay = self.retry_policy.delay(failures)
                log.warning("could not %s (attempt %d: %s: %s); retrying in %.1fs", what, failures, type(exc).__name__, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def run(self) -> None:
        """Loop until ``request_stop``: collect, handle, publish (acknowledged), commit; one such loop per lane.

        A lane that raises ends ``run`` with its exception (the other lane is cancelled, its batch left
        uncommitted for redelivery).

        Bad input never ends the loop, whatever its share of the traffic (it is answered and
        committed); a failing dependency pauses the affected partitions and retries them.
        """
        assert self.consumer is not None
        tasks = [asyncio.ensure_future(self._run_lane(lane)) for lane in self.lanes]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_lane(self, lane: _Lane) -> None:
        try:
            while not self._stopping.is_set():
                await self._update_lag()
                records = await self._next_batch(lane)
                if not records:
                    self._unload_idle_vision()
                    continue
                images_before = self.product_handler.encoded_images
                try:
                    await self._handle_batch(lane, records)
                finally:
                    self._release(lane)
                    lane.idle.set()
                if self.product_handler.encoded_images != images_before:
                    await asyncio.to_thread(release_memory)
        finally:
            lane.idle.set()

    async def _update_lag(self) -> None:
        """At most once a second, between batches (no lane waits on it with records in hand) and never while a
        rebalance waits (``position`` would block until the new assignment)."""
        if self._revoking.is_set() or time.monotonic() - self._lag_updated < 1.0:
            return
        self._lag_updated = time.monotonic()
        await self.metrics.update_lag(self.consumer)

    def _hold(self, lane: _Lane, records: list[ConsumerRecord]) -> None:
        """Pause the lane's partitions and drop their prefetched records (read on from after ``records``)."""
        consumer = self._group_consumer
        lane.held = set(lane.partitions(consumer.assignment()))
        consumer.pause(*lane.held)
        after: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            after[tp] = max(after.get(tp, 0), r.offset + 1)
        for tp, offset in after.items():
            if tp in lane.held:
                consumer.seek(tp, offset)

    def _release(self, lane: _Lane) -> None:
        """Resume what ``_hold`` paused, except partitions waiting for a retry or under memory backpressure."""
        held, lane.held = lane.held, set()
        if not held or self.memory_guard.paused or self.consumer is None:
            return
        waiting, assigned = self.pauses.waiting(), self.consumer.assignment()
        self.consumer.resume(*(tp for tp in held if tp in assigned and tp not in waiting))

    async def _next_batch(self, lane: _Lane) -> list[ConsumerRecord]:
        """Apply backpressure and due resumptions, then collect a batch (empty when idle, stopping or revoking)."""
        self._apply_backpressure()
        if not self.memory_guard.paused:
            self.pauses.resume_due(self.consumer)
        try:
            records = await collect_batch(
                lambda timeout_s, max_items: self._fetch(lane, timeout_s, max_items),
                self.settings.max_batch_size,
                self.settings.max_batch_wait_s,
                idle_timeout_s=0.5,
                stop=lambda: self._stopping.is_set() or self._revoking.is_set(),
                busy_threshold=self.settings.batch_wait_min_records,
            )
            self.metrics.fetches.inc()
        except BaseException:
            lane.idle.set()
            raise
        return records

    async def _handle_batch(self, lane: _Lane, records: list[ConsumerRecord]) -> None:
        """Process, publish (retried until acknowledged), commit what was not left for a retry, account."""
        lane.idle.clear()
        closed_at = time.time()
        started = time.monotonic()
        if lane.hold:
            self._hold(lane, records)
        report, outbound = await self.process(records)
        processed_at = time.time()
        await self._with_backoff("publish replies", lambda: self._publish_batch(report, outbound))
        acknowledged_at = time.time()
        offsets = {TopicPartition(*tp): report.defer.get(tp, o) for tp, o in report.offsets.items() if tp not in report.rewind}
        await self._commit(offsets)
        committed_at = time.time()
        consumer = self._group_consumer
        for tp, offset in report.defer.items():
            if tp not in report.rewind and TopicPartition(*tp) in consumer.assignment():
                consumer.seek(TopicPartition(*tp), offset)
        for tp, offset in offsets.items():
            self.pauses.succeeded(tp)
            self.processor.forget_attempts(tp.topic, tp.partition, offset)
        rewind = {TopicPartition(*tp): o for tp, o in report.rewind.items()}
        reasons = {TopicPartition(*tp): r for tp, r in report.retry_reasons.items()}
        self.pauses.retry_later(self.consumer, rewind, reasons)
        self.metrics.partitions_retrying.set(self.pauses.retrying(self._group_consumer.assignment()))
        self.batches += 1
        self.metrics.observe_batch(report, started=started, acknowledged_at=acknowledged_at)
        self.metrics.observe_stages(
            report,
            fetched_at=lane.fetched_at,
            closed_at=closed_at,
            processed_at=processed_at,
            acknowledged_at=acknowledged_at,
            committed_at=committed_at,
        )

    async def process(self, records: list[ConsumerRecord]) -> tuple[BatchReport, list[Outbound]]:
        """``BatchProcessor.process``: outbound messages and one outcome per record; never raises for bad input."""
        return await self.processor.process(records)

    async def _publish_batch(self, report: BatchReport, messages: list[Outbound]) -> None:
        """Publish a batch's messages; a refused reply turns its record's outcome into a ``reply_undeliverable`` dead letter."""
        for message in await self.publish(messages):
            report.dead_letter_instead(message.source, ReplyUndeliverable.code)

    async def publish(self, messages: list[Outbound]) -> list[Outbound]:
        """Publish and wait for every acknowledgement; raising here leaves the batch uncommitted.

        Returns the replies the broker would not take (``Outbound``'s ``reply`` and ``client_topic``
        say which refusals are the client's): each is replaced by a dead letter of its request
        (``reply_undeliverable``), so no single reply stalls a partition. Any other failure raises
        and the caller retries the whole publish.
        """
        failed = await publish_each(self.producer, messages, self.settings.reply_send_timeout_s)
        dead = []
        for message, exc in failed:
            reason = f"reply to {message.topic!r} was not accepted by the broker: {type(exc).__name__}: {exc}"
            log.warning("request %s: %s; dead-lettered", (message.key or b"").decode(errors="replace"), reason)
            dead.append(dead_letter(self.settings, message.source, ReplyUndeliverable(reason)))
        if dead:
            await publish_all(self.producer, dead)
        return [m for m, _ in failed]

    def retry_reason(self) -> str | None:
        """Why some assigned partition is paused for a retry (None when none is): ``/readyz`` reports it."""
        return self.pauses.reason(self.consumer.assignment() if self.consumer is not None else set())

    def _unload_idle_vision(self) -> None:
        """``MODEL_IDLE_UNLOAD_S``: drop the image tower after that long unused (it reloads on the next image)."""
        limit = self.settings.model_idle_unload_s
        idle = self.encoder.idle_seconds("vision")
        if limit and idle is not None and idle >= limit and self.encoder.unload("vision"):
            release_memory()
            log.info("unloaded the vision tower after %.0f s idle", idle)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            await self._group_consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("commit failed after a rebalance (%s); the new owner re-delivers these records", exc)

    def _apply_backpressure(self) -> None:
        """Above MEMORY_LIMIT_MB: stop fetching, drop rebuildable caches, return memory to the OS; resume below low water."""
        action = self.memory_guard.update()
        self.metrics.set_paused(self.memory_guard.paused)
        if self.memory_guard.paused:
            consumer = self._group_consumer
            consumer.pause(*consumer.assignment())
        if action == "pause":
            self.reply_cache.clear()
            if self.settings.role is not Role.INGEST:
                self.encoder.unload("vision")
            release_memory()
            log.warning("memory above MEMORY_LIMIT_MB=%s: fetching paused", self.settings.memory_limit_mb)
        elif action == "resume":
            waiting = self.pauses.waiting()
            consumer = self._group_consumer
            consumer.resume(*(tp for tp in consumer.assignment() if tp not in waiting and not any(tp in lane.held for lane in self.lanes)))
            log.info("memory back under the low-water mark: fetching resumed")

    async def _fetch(self, lane: _Lane, timeout_s: float, max_items: int) -> list[ConsumerRecord]:
        """Records of the lane's partitions for the batch being collected. Handing any out marks the lane busy,
        so a rebalance waits until they are answered and committed rather than re-delivering them to another owner.
        A lane none of whose partitions is assigned waits for an assignment (at most ``timeout_s``).

        While a rebalance waits (a lane with nothing in hand then waits up to 50 ms per call rather than
        spinning the event loop while the other lane finishes its batch) or a stop is requested, nothing more
        is fetched (aiokafka's getmany would block until the new assignment, or hang while the broker is
        gone): the fetch in progress is abandoned and ``collect_batch`` returns the batch in hand.
        """
        if self._stopping.is_set() or self._revoking.is_set():
            if self._revoking.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), min(timeout_s, 0.05))
            return []
        consumer = self._group_consumer
        partitions = lane.partitions(consumer.assignment())
        fetch: asyncio.Future[Any]
        if lane.topics is not None and not partitions:
            fetch = asyncio.ensure_future(asyncio.wait_for(self._assignment_changed.wait(), timeout_s))
        else:
            fetch = asyncio.ensure_future(consumer.getmany(*partitions, timeout_ms=max(1, int(timeout_s * 1000)), max_records=max_items))
        revoking = asyncio.ensure_future(self._revoking.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({fetch, revoking, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            revoking.cancel()
            stopping.cancel()
            if not fetch.done():
                fetch.cancel()
        if fetch not in done or isinstance(fetch.exception(), TimeoutError):
            return []
        result = fetch.result()
        records = [r for batch in result.values() for r in batch] if isinstance(result, dict) else []
        if records:
            if lane.idle.is_set():
                lane.fetched_at = time.time()
            lane.idle.clear()
        return records

    async def close(self, timeout_s: float | None = None) -> list[str]:
        """Stop the follower and the Kafka clients and close the store, concurrently (safe to call twice).

        Returns what did not finish within ``timeout_s`` (None: no limit), e.g. ``["close the
        consumer (leave the group)"]``; those steps are cancelled. A step that fails is logged.
        """
        steps: dict[str, Awaitable[Any]] = {}
        if self.follower is not None:
            steps["stop the feature follower (last snapshot)"] = self.follower.stop()
            self.follower = None
        if self.consumer is not None:
            steps["close the consumer (leave the group)"] = self.consumer.stop()
        if self.producer is not None:
            steps["close the producer (flush pending sends)"] = self.producer.stop()
        self.consumer = self.producer = None
        if self.store is not None:
            steps["close the store"] = self.store.close()
        tasks = {asyncio.ensure_future(step): what for what, step in steps.items()}
        if not tasks:
            return []
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning("could not %s: %r", tasks[task], task.exception())
        return [what for task, what in tasks.items() if task in pending]

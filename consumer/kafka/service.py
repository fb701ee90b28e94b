"""The consumer service: poll a micro-batch, handle it, publish outcomes, then commit.

Contract per batch (at-least-once, nothing lost):
1. ``collect_batch`` gathers up to ``MAX_BATCH_SIZE`` records or waits at most
   ``MAX_BATCH_WAIT_MS`` after the first one.
2. Product updates are applied first, then searches are answered in one batched
   encode and one ranking pass; every bad record becomes an error reply and/or a
   dead letter.
3. All outbound messages are published and acknowledged by the broker.
4. Only then are the batch's offsets committed. A crash anywhere before step 4
   re-delivers the batch to this or another replica.
A rebalance waits for the batch in flight to finish (the revoke callback blocks);
records count as in flight from the moment ``collect_batch`` receives them, and a
pending rebalance cuts the collection short.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord

from consumer.pipeline.batching import collect_batch
from consumer.config.settings import Role, Settings
from consumer.encoder.encoder import Encoder
from consumer.domain.errors import InputError, ReplyTopicNotAllowed, ReplyUndeliverable, ServiceFailure, is_dependency_outage
from consumer.kafka.feature_follower import FeatureFollower
from consumer.index.feature_index import FeatureIndex
from consumer.pipeline.handlers import (
    IndexRanker,
    PendingSearch,
    ProductHandler,
    ProductOutcome,
    SearchHandler,
    StoreRanker,
    error_reply,
    feature_event,
    parse_product,
    parse_search,
    reply_address,
)
from consumer.encoder.images import ImageLimits
from consumer.ops.metrics import ServiceMetrics
from consumer.pipeline.backpressure import MemoryGuard
from consumer.ops.memory import release_memory
from consumer.pipeline.reply_cache import ReplyCache
from consumer.config.security import MongoUnreachable, check_mongo, start_kafka_client
from consumer.ops.supervisor import Supervisor
from consumer.kafka.transport import REFUSED_TOPIC, TOO_LARGE, Outbound, make_consumer, make_producer, publish_all, publish_each
from schemas import ErrorReply, ProductUpdated, SearchResult

log = logging.getLogger(__name__)

JSON = b"application/json"


@dataclass
class BatchReport:
    """What one batch produced; kept for tests and metrics."""

    searches: int = 0
    replies: int = 0
    error_replies: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    products_applied: int = 0
    products_stale: int = 0
    messages: int = 0
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    """Next offset to commit per partition."""
    rewind: dict[TopicPartition, int] = field(default_factory=dict)
    """Partitions whose records could not be handled (e.g. store down): seek back here and retry later."""
    retry_reasons: dict[TopicPartition, str] = field(default_factory=dict)
    """Why each partition in ``rewind`` is retried (reported by ``/readyz`` until it succeeds)."""
    service_failures: int = 0
    """Records dead-lettered as ``internal_error`` after ``POISON_MAX_ATTEMPTS`` failed attempts."""


def retry_delay(failures: int, base_s: float, cap_s: float) -> float:
    """Pause before retry number ``failures`` (1-based): ``base_s`` doubled per earlier failure, at most ``cap_s``."""
    return min(base_s * 2 ** max(failures - 1, 0), max(cap_s, base_s))


class _WaitForBatch(ConsumerRebalanceListener):
    def __init__(self, service: Service) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.service._revoking.set()
        try:
            await self.service._idle.wait()
        finally:
            self.service._revoking.clear()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.service.assignment = set(assigned)
        self.service.assigned.set()
        log.info("assigned partitions: %s", sorted((tp.topic, tp.partition) for tp in assigned))


class Service:
    """One replica. ``start`` connects, ``run`` loops until ``request_stop``, ``close`` releases everything."""

    def __init__(self, settings: Settings, encoder: Encoder, index: FeatureIndex | None, store=None) -> None:
        """``index`` is None in on-demand mode (``CACHE_PRODUCTS=false``), where ``store`` ranks instead."""
        self.settings = settings
        self.encoder = encoder
        self.index = index
        self.store = store
        limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self.index_lock = asyncio.Lock()
        ranker = (
            IndexRanker(index, self.index_lock) if index is not None else StoreRanker(store, encoder.model_id, settings.store_chunk_rows)
        )
        self.search_handler = SearchHandler(
            encoder,
            ranker,
            default_top_k=settings.top_k,
            default_threshold=settings.similarity_threshold,
            image_limits=limits,
        )
        self.product_handler = ProductHandler(
            encoder,
            index if settings.role is not Role.INGEST else None,
            limits,
            store=store,
            before_apply=self._publish_features if settings.role is Role.INGEST else None,
        )
        self.follower: FeatureFollower | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.assigned = asyncio.Event()
        self.assignment: set[TopicPartition] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._revoking = asyncio.Event()
        self.batches = 0
        self.polls = 0
        self._lag_updated = 0.0
        self.replies_sent = 0
        self._attempts: dict[tuple[str, int, int], int] = {}
        self.retrying: dict[TopicPartition, str] = {}
        """Partitions waiting to retry records whose processing failed, with the reason (not-ready while any)."""
        self.reply_cache: ReplyCache[Outbound] = ReplyCache(settings.reply_cache_size, settings.reply_cache_ttl_s)
        self._retry_at: dict[TopicPartition, float] = {}
        self._retry_failures: dict[TopicPartition, int] = {}
        limit = settings.memory_limit_mb * 1024 * 1024 if settings.memory_limit_mb else None
        self.memory_guard = MemoryGuard(limit, settings.memory_low_water)
        self.metrics = ServiceMetrics(
            search_topic=settings.search_requests_topic,
            dead_letter_topic=settings.dead_letter_topic,
            encoder=encoder,
            index=index,
            memory_limit_bytes=settings.memory_limit_mb * 2**20 if settings.memory_limit_mb else None,
            labels={"role": settings.role.value, "model": encoder.model_id, "random_weights": str(encoder.random_weights).lower()},
        )
        self.exit_code = 0
        """The process exit code ``request_stop`` was last given a non-zero one for (0: a normal stop)."""
        self.supervisor = Supervisor(
            self.request_stop, self.metrics.background_task_failures, settings.retry_backoff_s, settings.retry_backoff_max_s
        )

    @property
    def topics(self) -> list[str]:
        s = self.settings
        return {
            Role.ALL: [s.search_requests_topic, s.product_updates_topic],
            Role.SEARCH: [s.search_requests_topic],
            Role.INGEST: [s.product_updates_topic],
        }[s.role]

    async def start(self) -> None:
        s = self.settings
        if not s.lazy_load_model:
            towers = ("text",) if s.role is Role.SEARCH else ("text", "vision")
            await asyncio.to_thread(self.encoder.ensure_loaded, *towers)
        group = s.ingest_group_id if s.role is Role.INGEST else s.consumer_group_id
        self.producer = make_producer(s)
        await self._with_backoff("connect the producer", lambda: start_kafka_client(s, self.producer))
        if self.store is not None:
            client = self.store.collection.database.client
            await self._with_backoff("reach the store", lambda: check_mongo(client, s), transient=(MongoUnreachable,))
            await self.store.ensure_indexes()
            if s.role is not Role.SEARCH:
                await self._reencode_other_models()
            if s.role is Role.ALL and self.index is not None:
                await self._fill_index_from_store()
        if s.role is Role.SEARCH and self.index is not None:
            self.follower = FeatureFollower(s, self.index, self.encoder.model_id, self.index_lock, self.metrics)
            started = time.monotonic()
            if self.follower.has_snapshot:
                await self._join_group()
            elif self.store is not None:
                await self._fill_index_from_store()
            await self.follower.start(
                connect=lambda client: self._with_backoff("connect the features consumer", lambda: start_kafka_client(s, client))
            )
            await self.follower.catch_up(nearly_done=self._join_group)
            self.metrics.index_catch_up.set(time.monotonic() - started)
            release_memory()
            self.follower.run_in_background(self.supervisor)
        await self._join_group()
        log.info("consuming %s as group %s (role=%s)", self.topics, group, s.role.value)

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

    async def _reencode_other_models(self, chunk: int = 64) -> None:
        """Products stored by another model id are re-encoded with this one (same version), never mixed in.

        Streamed in chunks of ``chunk`` products, so memory stays bounded whatever the catalog size.
        """
        pending: list[ProductUpdated] = []
        done = 0

        async def flush() -> None:
            nonlocal done
            failed = [o for o in await self.product_handler.handle(pending) if o.status == "error"]
            if failed:
                log.warning("could not re-encode %d stored products: %s", len(failed), failed[0].error)
            done += len(pending)
            pending.clear()

        async for meta, image in self.store.iter_stale_model_products(self.encoder.model_id):
            pending.append(
                ProductUpdated(
                    product_id=meta.product_id,
                    version=meta.version,
                    name=meta.name,
                    description=meta.description,
                    category=meta.category,
                    price=meta.price,
                    image_b64=base64.b64encode(image).decode() if image else None,
                )
            )
            if len(pending) >= chunk:
                await flush()
        if pending:
            await flush()
        if done:
            log.info("re-encoded %d products stored by another model", done)

    async def _fill_index_from_store(self) -> None:
        """Cached mode start: load every product stored with this model id; nothing is re-encoded."""
        self.index.reserve(len(self.index) + await self.store.count(self.encoder.model_id))
        loaded = 0
        invalid: list[str] = []
        async for metas, features in self.store.iter_product_chunks(self.encoder.model_id):
            report = self.index.upsert_many(metas, features)
            loaded += report.applied
            invalid.extend(report.invalid)
        if invalid:
            log.warning("%d stored features have a zero or non-finite norm and were not indexed, e.g. %r", len(invalid), invalid[0])
        release_memory()
        log.info("filled the feature index from the store: %d products", loaded)

    async def _publish_features(self, outcomes: list[ProductOutcome]) -> None:
        """Ingest role: features reach the compacted topic (acknowledged) before they are stored."""
        topic = self.settings.features_topic
        await self.publish(
            [
                Outbound(
                    topic,
                    feature_event(o.update, o.feature, self.encoder.model_id).model_dump_json().encode(),
                    o.update.product_id.encode(),
                    [("content-type", JSON), ("event-type", b"product_feature.v1")],
                )
                for o in outcomes
            ]
        )

    @property
    def stop_requested(self) -> asyncio.Event:
        """Set once ``request_stop`` was called (wait on it; never set it directly)."""
        return self._stopping

    def request_stop(self, exit_code: int = 0) -> None:
        """Finish the batch in flight, commit it, then leave ``run``; a non-zero ``exit_code`` is kept in ``exit_code``."""
        self.exit_code = exit_code or self.exit_code
        self._stopping.set()

    async def _with_backoff(self, what: str, attempt, transient=(KafkaError, OSError)):
        """Retry ``attempt`` on transient errors with capped exponential backoff until it succeeds or a stop is requested."""
        delay = 0.5
        failures = 0
        while True:
            try:
                return await attempt()
            except transient as exc:
                failures += 1
                if self._stopping.is_set():
                    raise
                log.warning("could not %s (attempt %d: %s: %s); retrying in %.1fs", what, failures, type(exc).__name__, exc, delay)
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, self.settings.retry_backoff_max_s)

    async def run(self) -> None:
        """Loop until ``request_stop``: collect, handle, publish (acknowledged), commit.

        Bad input never ends the loop, whatever its share of the traffic (it is answered and
        committed); a failing dependency pauses the affected partitions and retries them.
        """
        assert self.consumer is not None
        while not self._stopping.is_set():
            self._apply_backpressure()
            self._resume_due_partitions()
            try:
                records = await collect_batch(
                    self._fetch,
                    self.settings.max_batch_size,
                    self.settings.max_batch_wait_s,
                    idle_timeout_s=0.5,
                    stop=lambda: self._stopping.is_set() or self._revoking.is_set(),
                )
                self.polls += 1
                if time.monotonic() - self._lag_updated >= 1.0:
                    self._lag_updated = time.monotonic()
                    await self.metrics.update_lag(self.consumer)
            except BaseException:
                self._idle.set()
                raise
            if not records:
                self._unload_idle_vision()
                continue
            self._idle.clear()
            started = time.monotonic()
            images_before = self.product_handler.encoded_images
            try:
                report, outbound = await self.process(records)
                outbound = await self._with_backoff("publish replies", lambda: self.publish(outbound))
                acknowledged_at = time.time()
                for tp in report.rewind:
                    report.offsets.pop(tp, None)
                await self._commit(report.offsets)
                for tp, offset in report.offsets.items():
                    self._retry_failures.pop(tp, None)
                    self.retrying.pop(tp, None)
                    self._forget_attempts(tp, offset)
                self._rewind(report.rewind, report.retry_reasons)
                self.metrics.partitions_retrying.set(len(self.retrying))
                self.batches += 1
                self.metrics.observe_batch(
                    records,
                    outbound,
                    products_applied=report.products_applied,
                    products_stale=report.products_stale,
                    rewind=report.rewind,
                    started=started,
                    acknowledged_at=acknowledged_at,
                )
                self.replies_sent += report.replies + report.error_replies
            finally:
                self._idle.set()
            if self.product_handler.encoded_images != images_before:
                release_memory()

    def retry_reason(self) -> str | None:
        """Why some assigned partition is paused for a retry (None when none is): ``/readyz`` reports it."""
        assigned = self.consumer.assignment() if self.consumer is not None else set()
        for tp in [tp for tp in self.retrying if tp not in assigned]:
            del self.retrying[tp]
        if not self.retrying:
            return None
        tp, reason = next(iter(self.retrying.items()))
        more = f" (and {len(self.retrying) - 1} more partitions)" if len(self.retrying) > 1 else ""
        return f"retrying {tp.topic}[{tp.partition}] after: {reason}{more}"

    def _forget_attempts(self, tp: TopicPartition, committed: int) -> None:
        """Drop failure counts of records of ``tp`` before the committed offset: they are done."""
        for key in [k for k in self._attempts if k[0] == tp.topic and k[1] == tp.partition and k[2] < committed]:
            del self._attempts[key]

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
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("commit failed after a rebalance (%s); the new owner re-delivers these records", exc)

    def _rewind(self, rewind: dict[TopicPartition, int], reasons: dict[TopicPartition, str] | None = None) -> None:
        """Seek failed partitions back and pause each before trying again.

        The pause is ``RETRY_BACKOFF_S`` after a first failure and doubles with each consecutive
        failure of that partition up to ``RETRY_BACKOFF_MAX_S``, so a long store outage stalls the
        loop (one store timeout per attempt) less and less often; a committed batch resets it.
        """
        if not rewind:
            return
        live = {tp: off for tp, off in rewind.items() if tp in self.consumer.assignment()}
        for tp, offset in live.items():
            self.retrying[tp] = (reasons or {}).get(tp, "processing failed")
            self.consumer.seek(tp, offset)
            failures = self._retry_failures.get(tp, 0) + 1
            self._retry_failures[tp] = failures
            self._retry_at[tp] = time.monotonic() + retry_delay(failures, self.settings.retry_backoff_s, self.settings.retry_backoff_max_s)
        self.consumer.pause(*live)

    def _apply_backpressure(self) -> None:
        """Above MEMORY_LIMIT_MB: stop fetching, drop rebuildable caches, return memory to the OS; resume below low water."""
        action = self.memory_guard.update()
        self.metrics.set_paused(self.memory_guard.paused)
        if self.memory_guard.paused:
            self.consumer.pause(*self.consumer.assignment())
        if action == "pause":
            self.reply_cache.clear()
            if self.settings.role is not Role.INGEST:
                self.encoder.unload("vision")
            release_memory()
            log.warning("memory above MEMORY_LIMIT_MB=%s: fetching paused", self.settings.memory_limit_mb)
        elif action == "resume":
            waiting = set(self._retry_at)
            self.consumer.resume(*(tp for tp in self.consumer.assignment() if tp not in waiting))
            log.info("memory back under the low-water mark: fetching resumed")

    def _resume_due_partitions(self) -> None:
        if self.memory_guard.paused:
            return
        now = time.monotonic()
        due = [tp for tp, at in self._retry_at.items() if at <= now]
        for tp in due:
            del self._retry_at[tp]
        assigned = self.consumer.assignment()
        if due := [tp for tp in due if tp in assigned]:
            self.consumer.resume(*due)

    async def _fetch(self, timeout_s: float, max_items: int) -> list[ConsumerRecord]:
        """Records for the batch being collected. Handing any out marks the service busy, so a rebalance
        waits until they are answered and committed rather than re-delivering them to another owner.

        While a rebalance waits or a stop is requested, nothing more is fetched (aiokafka's getmany would
        block until the new assignment, or hang while the broker is gone): the fetch in progress is
        abandoned and ``collect_batch`` returns the batch in hand.
        """
        if self._stopping.is_set() or self._revoking.is_set():
            return []
        fetch = asyncio.ensure_future(self.consumer.getmany(timeout_ms=max(1, int(timeout_s * 1000)), max_records=max_items))
        revoking = asyncio.ensure_future(self._revoking.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({fetch, revoking, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            revoking.cancel()
            stopping.cancel()
            if not fetch.done():
                fetch.cancel()
        if fetch not in done:
            return []
        records = [r for batch in fetch.result().values() for r in batch]
        if records:
            self._idle.clear()
        return records

    async def publish(self, messages: list[Outbound]) -> list[Outbound]:
        """Publish and wait for every acknowledgement; raising here leaves the batch uncommitted.

        Returns what was published. A reply the broker will not take is replaced by a dead letter of
        its request (``reply_undeliverable``), so no single reply stalls a partition: too large
        anywhere; an unknown, forbidden or refused topic only when the client named it (a broken
        default ``REPLY_TOPIC`` is the service's failure). Any other failure raises and the caller
        retries the whole publish.
        """
        failed = await publish_each(self.producer, messages, self.settings.reply_send_timeout_s)
        if not failed:
            return messages
        given_up = {id(m) for m, _ in failed}
        dead = []
        for message, exc in failed:
            reason = f"reply to {message.topic!r} was not accepted by the broker: {type(exc).__name__}: {exc}"
            log.warning("request %s: %s; dead-lettered", (message.key or b"").decode(errors="replace"), reason)
            dead.append(self._dead_letter(message.source, ReplyUndeliverable(reason)))
        await publish_all(self.producer, dead)
        return [m for m in messages if id(m) not in given_up] + dead

    async def close(self, timeout_s: float | None = None) -> list[str]:
        """Stop the follower and the Kafka clients and close the store, concurrently (safe to call twice).

        Returns what did not finish within ``timeout_s`` (None: no limit), e.g. ``["close the
        consumer (leave the group)"]``; those steps are cancelled. A step that fails is logged.
        """
        steps = {}
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

    def _dead_letter(self, record: ConsumerRecord, err: InputError) -> Outbound:
        headers = [
            ("error.code", err.code.encode()),
            ("error.message", err.message.encode()[:1000]),
            ("source.topic", record.topic.encode()),
            ("source.partition", str(record.partition).encode()),
            ("source.offset", str(record.offset).encode()),
            ("error.owner", err.owner.encode()),
        ]
        return Outbound(self.settings.dead_letter_topic, record.value or b"", record.key, headers)

    def _reply(self, topic: str, reply: SearchResult | ErrorReply, source: ConsumerRecord) -> Outbound:
        rid = (reply.request_id or "").encode()
        kind = b"search_result.v1" if isinstance(reply, SearchResult) else b"error_reply.v1"
        headers = [("correlation_id", rid), ("content-type", JSON), ("event-type", kind)]
        give_up_on = TOO_LARGE if topic == self.settings.reply_topic else TOO_LARGE + REFUSED_TOPIC
        return Outbound(topic, reply.model_dump_json().encode(), rid or None, headers, give_up_on=give_up_on, source=source)

    def _reply_topic(self, requested: str | None) -> str:
        """Where a reply goes: the request's ``reply_to`` when allowed, else the default reply topic."""
        return requested if requested and self.settings.reply_topic_allowed(requested) else self.settings.reply_topic

    async def process(self, records: list[ConsumerRecord]) -> tuple[BatchReport, list[Outbound]]:
        """Turn a batch of records into outbound messages; never raises for bad input.

        Records of a partition left for a retry (``report.rewind``) produce nothing now, not even the
        error replies and dead letters of bad records after the retry point: the retry produces them once.
        """
        s = self.settings
        report = BatchReport(messages=len(records))
        emitted: list[tuple[ConsumerRecord, str, Outbound]] = []

        def emit(record: ConsumerRecord, kind: str, message: Outbound) -> None:
            emitted.append((record, kind, message))

        def reject_search(record: ConsumerRecord, err: InputError) -> None:
            emit(record, "dead_letters", self._dead_letter(record, err))
            rid, reply_to = reply_address(record.value)
            if rid is not None:
                emit(record, "error_replies", self._reply(self._reply_topic(reply_to), error_reply(rid, err), record))

        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            report.offsets[tp] = max(report.offsets.get(tp, 0), r.offset + 1)

        updates, update_records = [], []
        searches, search_records = [], []
        duplicates: list[tuple[ConsumerRecord, str, Outbound | None]] = []
        batch_ids: set[str] = set()
        for r in records:
            if r.topic == s.product_updates_topic:
                try:
                    updates.append(parse_product(r.value, s.max_message_bytes))
                    update_records.append(r)
                except InputError as err:
                    emit(r, "dead_letters", self._dead_letter(r, err))
                continue
            try:
                req = parse_search(r.value, s.max_message_bytes, s.max_top_k)
                if req.reply_to is not None and not s.reply_topic_allowed(req.reply_to):
                    raise ReplyTopicNotAllowed(
                        f"reply_to {req.reply_to!r} is not allowed: it names one of the service's own topics"
                        if req.reply_to in s.own_topics
                        else f"reply_to {req.reply_to!r} does not match REPLY_TOPIC_PATTERN"
                    )
            except InputError as err:
                reject_search(r, err)
                continue
            cached = self.reply_cache.get(req.request_id)
            if cached is not None or req.request_id in batch_ids:
                duplicates.append((r, req.request_id, cached))
                continue
            batch_ids.add(req.request_id)
            searches.append(PendingSearch(req, r.timestamp / 1000.0 if r.timestamp and r.timestamp > 0 else time.time()))
            search_records.append(r)

        if updates:
            outcomes = await self._isolating(self.product_handler.handle, updates, update_records, report, "product update")
            for r, outcome in zip(update_records, outcomes):
                if outcome is None:
                    continue
                if isinstance(outcome, ServiceFailure):
                    emit(r, "dead_letters", self._dead_letter(r, outcome))
                elif outcome.error is not None:
                    emit(r, "dead_letters", self._dead_letter(r, outcome.error))
                elif outcome.status == "applied":
                    report.products_applied += 1
                else:
                    report.products_stale += 1

        if searches:
            report.searches = len(searches)
            replies = await self._isolating(self.search_handler.handle, searches, search_records, report, "search")
            self.metrics.observe_search([r for r in replies if r is not None and not isinstance(r, ServiceFailure)])
            for pending, r, reply in zip(searches, search_records, replies):
                if reply is None:
                    continue
                if isinstance(reply, ServiceFailure):
                    reply = error_reply(pending.request.request_id, reply)
                message = self._reply(self._reply_topic(pending.request.reply_to), reply, r)
                self.reply_cache.put(pending.request.request_id, message)
                if isinstance(reply, SearchResult):
                    emit(r, "replies", message)
                else:
                    emit(r, "error_replies", message)
                    emit(r, "dead_letters", self._dead_letter(r, InputError(reply.error.message, reply.error.code)))
        for r, rid, cached in duplicates:
            first = cached or self.reply_cache.get(rid)
            if first is not None:
                emit(r, "duplicates", first)
        out: list[Outbound] = []
        for r, kind, message in emitted:
            retry_from = report.rewind.get(TopicPartition(r.topic, r.partition))
            if retry_from is None or r.offset < retry_from:
                out.append(message)
                setattr(report, kind, getattr(report, kind) + 1)
        return report, out

    async def _isolating(self, handle, items: list, records: list[ConsumerRecord], report: BatchReport, what: str) -> list:
        """``handle(items)``, one outcome per item; a failure of the service is narrowed down, never raised.

        - A dependency outage (``is_dependency_outage``): every item is left for a retry (None).
        - Any other exception: the batch is bisected until the failing records are alone; each such
          record is retried (None) up to ``POISON_MAX_ATTEMPTS`` attempts in all, then given up on as a
          ``ServiceFailure`` (dead-lettered as ``internal_error``), so the partition moves on.
        Items left for a retry mark their partition in ``report.rewind`` with the reason.
        """
        try:
            return list(await handle(items))
        except Exception as exc:
            reason = f"{what} failed: {type(exc).__name__}: {exc}"
            if is_dependency_outage(exc):
                log.warning("%s (dependency unavailable?); will retry %d records", reason, len(items))
                self._mark_rewind(report, records, reason)
                return [None] * len(items)
            if len(items) > 1:
                mid = len(items) // 2
                first = await self._isolating(handle, items[:mid], records[:mid], report, what)
                return first + await self._isolating(handle, items[mid:], records[mid:], report, what)
            r = records[0]
            key = (r.topic, r.partition, r.offset)
            attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
            if attempts < self.settings.poison_max_attempts:
                log.exception("%s at %s[%d]@%d, attempt %d of %d; will retry", what, *key, attempts, self.settings.poison_max_attempts)
                self._mark_rewind(report, records, reason)
                return [None]
            log.exception("%s at %s[%d]@%d failed %d times: dead-lettered as internal_error", what, *key, attempts)
            del self._attempts[key]
            report.service_failures += 1
            return [ServiceFailure(reason[:1000])]

    @staticmethod
    def _mark_rewind(report: BatchReport, records: list[ConsumerRecord], reason: str) -> None:
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            report.rewind[tp] = min(report.rewind.get(tp, r.offset), r.offset)
            report.retry_reasons.setdefault(tp, reason)

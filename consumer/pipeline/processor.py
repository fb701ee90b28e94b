"""From a batch of consumed records to the messages to publish and one outcome per record.

Nothing here knows about Kafka clients. ``BatchProcessor.process`` never raises for bad input:

- a client error becomes a typed error reply (when a request_id and a reply address can be read)
  and/or a dead letter;
- a dependency outage leaves the record's partition for a retry (``BatchReport.rewind``);
- the service's own failure on some record is narrowed down by bisecting the batch; that record is
  retried up to ``POISON_MAX_ATTEMPTS`` times in all, then dead-lettered as ``internal_error``.

Records of a partition left for a retry produce nothing now, not even the error replies and dead
letters of bad records after the retry point: the retry produces them once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from consumer.config.settings import Role, Settings
from consumer.domain.errors import InputError, ReplyTopicNotAllowed, ServiceFailure, is_dependency_outage
from consumer.domain.messages import Outbound
from consumer.pipeline.messages import dead_letter, reply_message
from consumer.pipeline.outcomes import BatchReport, Outcome, Partition, Record, RecordOutcome
from consumer.pipeline.parsing import error_reply, parse_product, parse_search, reply_address
from consumer.pipeline.products import ProductHandler
from consumer.pipeline.reply_cache import ReplyCache
from consumer.pipeline.search import PendingSearch, SearchHandler
from schemas import ProductUpdated, SearchRequest, SearchResult

log = logging.getLogger(__name__)


_ENTRY_OVERHEAD_BYTES = 800
"""Roughly what a cached reply's Python objects (message, headers, cache entry) hold besides their byte strings."""


@dataclass(frozen=True)
class CachedReply:
    """The first reply to a request_id, and its error code (None for results); ``message`` holds no ``source``."""

    message: Outbound
    code: str | None

    @classmethod
    def of(cls, message: Outbound, code: str | None) -> CachedReply:
        return cls(replace(message, source=None), code)

    @property
    def nbytes(self) -> int:
        """Approximate memory held by this entry (what ``REPLY_CACHE_MAX_BYTES`` counts)."""
        m = self.message
        return _ENTRY_OVERHEAD_BYTES + len(m.value) + len(m.key or b"") + len(m.topic) + sum(len(k) + len(v) for k, v in m.headers)

    def answering(self, record: Record) -> Outbound:
        """The cached reply, as the answer to the redelivered ``record``."""
        return replace(self.message, source=record)


class BatchProcessor:
    """Routes a batch's records to the product and search handlers and collects their outcomes."""

    def __init__(self, settings: Settings, search_handler: SearchHandler, product_handler: ProductHandler) -> None:
        self.settings = settings
        self.search_handler = search_handler
        self.product_handler = product_handler
        self.reply_cache: ReplyCache[CachedReply] = ReplyCache(
            settings.reply_cache_size, settings.reply_cache_ttl_s, settings.reply_cache_max_bytes, lambda reply: reply.nbytes
        )
        self._attempts: dict[tuple[str, int, int], int] = {}

    async def process(self, records: Sequence[Record]) -> tuple[BatchReport, list[Outbound]]:
        """Outbound messages for ``records`` and a report with one outcome per record that is not retried."""
        batch = _Batch(self.settings, records)
        updates, searches, duplicates = self._route(batch)
        updates = self._within_image_budget(batch, updates)
        if updates:
            await self._apply_updates(batch, updates)
        if searches:
            await self._answer_searches(batch, searches)
        for record, rid, cached in duplicates:
            first = cached or self.reply_cache.get(rid)
            if first is not None:
                batch.emit(record, Outcome.DUPLICATE, [first.answering(record)], first.code)
        return batch.finish()

    def _within_image_budget(self, batch: _Batch, updates: list[tuple[Record, ProductUpdated]]) -> list[tuple[Record, ProductUpdated]]:
        """ROLE=all: the updates of the batch up to ``MAX_IMAGES_PER_BATCH`` images; from the first one over it,
        each partition's later updates are deferred to the next batch, so a catalog burst never holds
        searches for more than a few image encodes."""
        if self.settings.role is not Role.ALL:
            return updates
        kept: list[tuple[Record, ProductUpdated]] = []
        deferred: set[Partition] = set()
        images = 0
        for record, update in updates:
            tp = Partition(record.topic, record.partition)
            if tp in deferred:
                continue
            if update.image_b64 and not update.deleted:
                if images >= self.settings.max_images_per_batch:
                    batch.defer(record)
                    deferred.add(tp)
                    continue
                images += 1
            kept.append((record, update))
        return kept

    def forget_attempts(self, topic: str, partition: int, committed: int) -> None:
        """Drop the failure counts of records before ``committed`` in that partition: they are done."""
        for key in [k for k in self._attempts if k[:2] == (topic, partition) and k[2] < committed]:
            del self._attempts[key]

    def _route(
        self, batch: _Batch
    ) -> tuple[list[tuple[Record, ProductUpdated]], list[tuple[Record, PendingSearch]], list[tuple[Record, str, CachedReply | None]]]:
        s = self.settings
        updates: list[tuple[Record, ProductUpdated]] = []
        searches: list[tuple[Record, PendingSearch]] = []
        duplicates: list[tuple[Record, str, CachedReply | None]] = []
        batch_ids: set[str] = set()
        for r in batch.records:
            if r.topic == s.product_updates_topic:
                try:
                    updates.append((r, parse_product(r.value, s.max_message_bytes)))
                except InputError as err:
                    batch.emit(r, Outcome.DEAD_LETTER, [dead_letter(s, r, err)], err.code)
                continue
            try:
                req = self._parse_search(r)
            except InputError as err:
                self._reject_search(batch, r, err)
                continue
            cached = self.reply_cache.get(req.request_id)
            if cached is not None or req.request_id in batch_ids:
                duplicates.append((r, req.request_id, cached))
                continue
            batch_ids.add(req.request_id)
            received = r.timestamp / 1000.0 if r.timestamp and r.timestamp > 0 else time.time()
            searches.append((r, PendingSearch(req, received)))
        return updates, searches, duplicates

    def _parse_search(self, record: Record) -> SearchRequest:
        s = self.settings
        req = parse_search(record.value, s.max_message_bytes, s.max_top_k)
        if req.reply_to is not None and not s.reply_topic_allowed(req.reply_to):
            raise ReplyTopicNotAllowed(
                f"reply_to {req.reply_to!r} is not allowed: it names one of the service's own topics"
                if req.reply_to in s.own_topics
                else f"reply_to {req.reply_to!r} does not match REPLY_TOPIC_PATTERN"
            )
        return req

    def _reject_search(self, batch: _Batch, record: Record, err: InputError) -> None:
        messages = [dead_letter(self.settings, record, err)]
        rid, reply_to = reply_address(record.value)
        if rid is None:
            batch.emit(record, Outcome.DEAD_LETTER, messages, err.code)
            return
        messages.append(reply_message(self.settings, reply_to, error_reply(rid, err), record))
        batch.emit(record, Outcome.ERROR_REPLY, messages, err.code)

    async def _apply_updates(self, batch: _Batch, updates: list[tuple[Record, ProductUpdated]]) -> None:
        records = [r for r, _ in updates]
        outcomes = await self._isolating(self.product_handler.handle, [u for _, u in updates], records, batch, "product update")
        for r, outcome in zip(records, outcomes, strict=True):
            if outcome is None:
                continue
            error = outcome if isinstance(outcome, ServiceFailure) else outcome.error
            if error is not None:
                batch.emit(r, Outcome.DEAD_LETTER, [dead_letter(self.settings, r, error)], error.code)
            else:
                batch.emit(r, Outcome.APPLIED if outcome.status == "applied" else Outcome.STALE, [])

    async def _answer_searches(self, batch: _Batch, searches: list[tuple[Record, PendingSearch]]) -> None:
        records = [r for r, _ in searches]
        replies = await self._isolating(self.search_handler.handle, [p for _, p in searches], records, batch, "search")
        batch.report.search_timings = next((r.timings for r in replies if isinstance(r, SearchResult)), None)
        for (r, pending), reply in zip(searches, replies, strict=True):
            if reply is None:
                continue
            request = pending.request
            if isinstance(reply, ServiceFailure):
                reply = error_reply(request.request_id, reply)
            message = reply_message(self.settings, request.reply_to, reply, r)
            if isinstance(reply, SearchResult):
                self.reply_cache.put(request.request_id, CachedReply.of(message, None))
                batch.emit(r, Outcome.RESULT, [message])
                continue
            err = InputError(reply.error.message, reply.error.code)
            self.reply_cache.put(request.request_id, CachedReply.of(message, err.code))
            batch.emit(r, Outcome.ERROR_REPLY, [dead_letter(self.settings, r, err), message], err.code)

    async def _isolating(
        self, handle: Callable[[list[Any]], Awaitable[Sequence[Any]]], items: list[Any], records: list[Record], batch: _Batch, what: str
    ) -> list[Any]:
        """``handle(items)``, one outcome per item (None: left for a retry); never raises.

        A dependency outage leaves every item for a retry. Any other exception bisects the batch
        until the failing records are alone; each is retried up to ``POISON_MAX_ATTEMPTS`` attempts
        in all, then given up on as a ``ServiceFailure``.
        """
        try:
            return list(await handle(items))
        except Exception as exc:  # noqa: BLE001 - an outage is retried, anything else is isolated by bisecting the batch
            reason = f"{what} failed: {type(exc).__name__}: {exc}"
            if is_dependency_outage(exc):
                log.warning("%s (dependency unavailable?); will retry %d records", reason, len(items))
                batch.retry(records, reason)
                return [None] * len(items)
            if len(items) > 1:
                mid = len(items) // 2
                first = await self._isolating(handle, items[:mid], records[:mid], batch, what)
                return first + await self._isolating(handle, items[mid:], records[mid:], batch, what)
            return [self._failed_alone(records[0], batch, what, reason, exc)]

    def _failed_alone(self, record: Record, batch: _Batch, what: str, reason: str, exc: Exception) -> ServiceFailure | None:
        key = (record.topic, record.partition, record.offset)
        limit = self.settings.poison_max_attempts
        attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
        if attempts < limit:
            log.error("%s at %s[%d]@%d, attempt %d of %d; will retry", what, *key, attempts, limit, exc_info=exc)
            batch.retry([record], reason)
            return None
        log.error("%s at %s[%d]@%d failed %d times: dead-lettered as internal_error", what, *key, attempts, exc_info=exc)
        del self._attempts[key]
        return ServiceFailure(reason[:1000])


class _Batch:
    """Collects the messages and outcomes of one batch, and which partitions are retried from where."""

    def __init__(self, settings: Settings, records: Sequence[Record]) -> None:
        self.settings = settings
        self.records = records
        self.report = BatchReport(messages=len(records))
        self._emitted: list[tuple[Record, RecordOutcome, list[Outbound]]] = []
        for r in records:
            tp = Partition(r.topic, r.partition)
            self.report.offsets[tp] = max(self.report.offsets.get(tp, 0), r.offset + 1)

    def emit(self, record: Record, outcome: Outcome, messages: list[Outbound], code: str | None = None) -> None:
        self._emitted.append((record, RecordOutcome.of(record, outcome, code), messages))

    def defer(self, record: Record) -> None:
        tp = Partition(record.topic, record.partition)
        self.report.defer[tp] = min(self.report.defer.get(tp, record.offset), record.offset)

    def retry(self, records: Sequence[Record], reason: str) -> None:
        for r in records:
            tp = Partition(r.topic, r.partition)
            self.report.rewind[tp] = min(self.report.rewind.get(tp, r.offset), r.offset)
            self.report.retry_reasons.setdefault(tp, reason)

    def finish(self) -> tuple[BatchReport, list[Outbound]]:
        """Drop what a retry will produce again; the offsets of retried partitions are not committed."""
        out: list[Outbound] = []
        for record, outcome, messages in self._emitted:
            retry_from = self.report.rewind.get(Partition(record.topic, record.partition))
            if retry_from is None or record.offset < retry_from:
                out.extend(messages)
                self.report.outcomes.append(outcome)
        return self.report, out

"""A batch of valid search requests to one outcome each: a result or a typed error reply.

``SearchHandler.handle`` never raises for bad input (an expired deadline or an unusable query
image becomes that request's ``ErrorReply``); it encodes all queries with one batched call per
modality and ranks them in one pass of a ``Ranker``: the in-memory index (``IndexRanker``) or the
store (``StoreRanker``). Outcomes come back in input order. Nothing here knows about Kafka.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Protocol, cast

import numpy as np

from consumer.domain.errors import DeadlineExpired, InputError
from consumer.encoder.encoder import Encoder
from consumer.encoder.images import ImageLimits
from consumer.index.feature_index import FeatureIndex, ProductMeta
from consumer.index.ranking import Hit, Query, SearchFilter
from consumer.pipeline.encoding import decode_image, encode_rows
from consumer.pipeline.parsing import error_reply
from schemas import ErrorReply, ResultItem, SearchRequest, SearchResult, Timings

SearchOutcome = SearchResult | ErrorReply


class Ranker(Protocol):
    """Top-k products for a batch of normalised query embeddings."""

    async def search(self, queries: np.ndarray, params: Sequence[Query]) -> list[list[tuple[Hit, ProductMeta]]]: ...


class StoreSearch(Protocol):
    """What ``StoreRanker`` needs of the product store (``consumer.store.product_store.ProductStore``)."""

    async def search(
        self, queries: np.ndarray, params: Sequence[Query], model_id: str, chunk_rows: int = ...
    ) -> list[list[tuple[Hit, ProductMeta]]]: ...


class IndexRanker:
    """Ranks against the in-memory ``FeatureIndex`` (cached mode) in a worker thread.

    ``lock`` serialises searches with writers that run concurrently (the features-topic follower).
    """

    def __init__(self, index: FeatureIndex, lock: asyncio.Lock | None = None) -> None:
        self.index = index
        self.lock = lock or asyncio.Lock()

    async def search(self, queries: np.ndarray, params: Sequence[Query]) -> list[list[tuple[Hit, ProductMeta]]]:
        async with self.lock:
            return await asyncio.to_thread(self.index.search, queries, params)


class StoreRanker:
    """Ranks by streaming stored features in bounded chunks (on-demand mode, no product matrix in memory)."""

    def __init__(self, store: StoreSearch, model_id: str, chunk_rows: int) -> None:
        self.store = store
        self.model_id = model_id
        self.chunk_rows = chunk_rows

    async def search(self, queries: np.ndarray, params: Sequence[Query]) -> list[list[tuple[Hit, ProductMeta]]]:
        return await self.store.search(queries, params, self.model_id, chunk_rows=self.chunk_rows)


@dataclass
class PendingSearch:
    request: SearchRequest
    received_at: float
    """Epoch seconds when the request entered the system (the record timestamp)."""


@dataclass
class _Inputs:
    """A batch's requests sorted out: early outcomes (errors) by row, and the texts and images to encode."""

    outcomes: list[SearchOutcome | None]
    texts: list[tuple[int, str]]
    images: list[tuple[int, np.ndarray]]

    @property
    def live(self) -> list[int]:
        """Rows still to be answered with a result."""
        return [i for i, o in enumerate(self.outcomes) if o is None]


@dataclass(frozen=True)
class _BatchTimes:
    start: float
    encode_s: float
    rank_s: float
    done: float
    size: int


class SearchHandler:
    """Answers a batch of valid requests with one batched encode per modality and one ranking pass."""

    def __init__(
        self,
        encoder: Encoder,
        ranker: Ranker,
        *,
        default_top_k: int,
        default_threshold: float,
        image_limits: ImageLimits,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.encoder = encoder
        self.ranker = ranker
        self.default_top_k = default_top_k
        self.default_threshold = default_threshold
        self.image_limits = image_limits
        self.clock = clock

    def _expired(self, req: SearchRequest, now: float) -> bool:
        if req.deadline is None:
            return False
        deadline = req.deadline if req.deadline.tzinfo else req.deadline.replace(tzinfo=UTC)
        return deadline.timestamp() <= now

    async def handle(self, batch: list[PendingSearch]) -> list[SearchOutcome]:
        """One outcome per input, in input order; input errors become error replies, never exceptions."""
        start = self.clock()
        inputs = await self._prepare(batch, start)
        live = inputs.live
        if not live:
            return cast(list[SearchOutcome], inputs.outcomes)  # every row was answered early
        enc_start = self.clock()
        queries = await self._encode_queries(len(batch), live, inputs)
        encode_s = self.clock() - enc_start
        params = [self._query(batch[i].request) for i in live]
        rank_start = self.clock()
        ranked = await self.ranker.search(queries, params)
        rank_s = self.clock() - rank_start
        times = _BatchTimes(start, encode_s, rank_s, self.clock(), len(live))
        for i, hits in zip(live, ranked, strict=True):
            inputs.outcomes[i] = self._result(batch[i], hits, times)
        return cast(list[SearchOutcome], inputs.outcomes)  # the live rows are answered now, the others were before

    async def _prepare(self, batch: list[PendingSearch], now: float) -> _Inputs:
        """Error replies for expired requests and unusable images; the rest's texts and decoded images by row."""
        inputs = _Inputs([None] * len(batch), [], [])
        for i, pending in enumerate(batch):
            req = pending.request
            if req.deadline is not None and self._expired(req, now):
                inputs.outcomes[i] = error_reply(
                    req.request_id, DeadlineExpired(f"deadline {req.deadline.isoformat()} passed before processing")
                )
                continue
            if req.query_image_b64:
                pixels = await decode_image(req.query_image_b64, self.image_limits, self.encoder.preprocess)
                if isinstance(pixels, InputError):
                    inputs.outcomes[i] = error_reply(req.request_id, pixels)
                    continue
                inputs.images.append((i, pixels))
            if req.query_text and req.query_text.strip():
                inputs.texts.append((i, req.query_text))
        return inputs

    async def _encode_queries(self, rows: int, live: list[int], inputs: _Inputs) -> np.ndarray:
        """Normalised query embeddings [len(live), dim]: text and image embeddings of a request summed."""
        vectors = await encode_rows(self.encoder, inputs.texts, inputs.images)
        queries = np.zeros((rows, vectors[0][1].shape[0]), dtype=np.float32)
        for i, vec in vectors:
            queries[i] += vec
        queries = queries[live]
        queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        return queries

    def _query(self, req: SearchRequest) -> Query:
        """Ranking parameters of a request, service defaults filled in."""
        f = req.filters
        return Query(
            top_k=req.top_k or self.default_top_k,
            threshold=req.similarity_threshold if req.similarity_threshold is not None else self.default_threshold,
            filter=SearchFilter(f.category, f.min_price, f.max_price) if f else None,
        )

    def _result(self, pending: PendingSearch, hits: list[tuple[Hit, ProductMeta]], times: _BatchTimes) -> SearchResult:
        items = [
            ResultItem(
                rank=r,
                product_id=hit.product_id,
                score=round(float(hit.score), 6),
                name=meta.name,
                description=meta.description,
                category=meta.category,
                price=meta.price,
            )
            for r, (hit, meta) in enumerate(hits, start=1)
        ]
        return SearchResult(
            request_id=pending.request.request_id,
            items=items,
            model_id=self.encoder.model_id,
            random_weights=self.encoder.random_weights,
            batch_size=times.size,
            timings=Timings(
                queue_ms=max(0.0, (times.start - pending.received_at) * 1000),
                encode_ms=times.encode_s * 1000,
                rank_ms=times.rank_s * 1000,
                total_ms=max(0.0, (times.done - pending.received_at) * 1000),
            ),
        )

"""From decoded events to outcomes: search batches and product updates.

Nothing here knows about Kafka. Input: raw message values; output: reply or
dead-letter decisions the transport publishes. CPU-heavy work (encoding,
ranking) runs in worker threads so the event loop keeps heartbeating.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import timezone
from typing import Protocol, Sequence

import numpy as np
import pybase64
from pydantic import ValidationError

from consumer.encoder.encoder import Encoder
from consumer.domain.errors import (
    DeadlineExpired,
    InputError,
    InvalidJson,
    MessageTooLarge,
    SchemaViolation,
    UnsupportedSchemaVersion,
)
from consumer.index.feature_index import FeatureIndex, ProductMeta
from consumer.encoder.images import ImageLimits, pixels_from_base64
from consumer.index.ranking import Hit, Query, SearchFilter
from schemas import (
    SCHEMA_VERSION,
    ErrorDetail,
    ErrorReply,
    ProductFeature,
    ProductUpdated,
    ResultItem,
    SearchRequest,
    SearchResult,
    Timings,
)

log = logging.getLogger(__name__)

_FILTER_FIELDS = {"category", "min_price", "max_price"}


def _load_json(raw: bytes | None, max_bytes: int) -> dict:
    if raw is None:
        raise InvalidJson("message has no value")
    if len(raw) > max_bytes:
        raise MessageTooLarge(f"message is {len(raw)} bytes, limit {max_bytes}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJson(f"value is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SchemaViolation("value must be a JSON object")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise UnsupportedSchemaVersion(f"schema_version {version!r} is not supported (supported: {SCHEMA_VERSION})")
    return data


def _schema_error(exc: ValidationError) -> InputError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "event"
    msg = f"{where}: {first['msg']}"
    if exc.error_count() > 1:
        msg += f" (and {exc.error_count() - 1} more)"
    return SchemaViolation(msg)


def parse_search(raw: bytes | None, max_bytes: int, max_top_k: int) -> SearchRequest:
    """Decode and validate a search request; raises a typed ``InputError``."""
    data = _load_json(raw, max_bytes)
    filters = data.get("filters")
    if isinstance(filters, dict) and (unknown := set(filters) - _FILTER_FIELDS):
        raise InputError(f"unknown filters: {sorted(unknown)}; known: {sorted(_FILTER_FIELDS)}", "unknown_filter")
    if isinstance(data.get("query_text"), str) and not data["query_text"].strip() and not data.get("query_image_b64"):
        raise InputError("query_text is empty and no query image was given", "empty_query")
    try:
        request = SearchRequest.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(exc) from None
    if request.top_k is not None and request.top_k > max_top_k:
        raise InputError(f"top_k {request.top_k} exceeds the limit {max_top_k}", "top_k_out_of_range")
    return request


def parse_product(raw: bytes | None, max_bytes: int) -> ProductUpdated:
    """Decode and validate a product update; raises a typed ``InputError``."""
    data = _load_json(raw, max_bytes)
    try:
        return ProductUpdated.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(exc) from None


def reply_address(raw: bytes | None) -> tuple[str | None, str | None]:
    """Best-effort (request_id, reply_to) from an invalid request, for its error reply."""
    try:
        data = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    rid, topic = data.get("request_id"), data.get("reply_to")
    rid = rid if isinstance(rid, str) and 0 < len(rid) <= 128 and rid.isprintable() else None
    ok_topic = isinstance(topic, str) and 0 < len(topic) <= 249 and all(c.isalnum() or c in "._-" for c in topic)
    return rid, topic if ok_topic else None


def error_reply(request_id: str | None, err: InputError) -> ErrorReply:
    return ErrorReply(request_id=request_id, error=ErrorDetail(code=err.code, message=err.message))


def product_text(update: ProductUpdated) -> str:
    """The text a product is encoded from when it has no image: name and description joined by '. '."""
    parts = [p.strip() for p in (update.name, update.description) if p and p.strip()]
    return ". ".join(parts)


async def encode_rows(encoder: Encoder, texts: list[tuple[int, str]], images: list[tuple[int, np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    """(row, embedding) for every text and image, in one batched call per modality, off the event loop."""
    out: list[tuple[int, np.ndarray]] = []
    if texts:
        emb = await asyncio.to_thread(encoder.encode_text, [t for _, t in texts])
        out.extend((i, vec) for (i, _), vec in zip(texts, emb))
    if images:
        emb = await asyncio.to_thread(encoder.encode_images, np.stack([p for _, p in images]))
        out.extend((i, vec) for (i, _), vec in zip(images, emb))
    return out


class Ranker(Protocol):
    """Top-k products for a batch of normalised query embeddings."""

    async def search(self, queries: np.ndarray, params: Sequence[Query]) -> list[list[tuple[Hit, ProductMeta]]]: ...


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

    def __init__(self, store, model_id: str, chunk_rows: int) -> None:
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
        clock=time.time,
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
        deadline = req.deadline if req.deadline.tzinfo else req.deadline.replace(tzinfo=timezone.utc)
        return deadline.timestamp() <= now

    async def handle(self, batch: list[PendingSearch]) -> list[SearchResult | ErrorReply]:
        """One outcome per input, in input order; input errors become error replies, never exceptions."""
        start = self.clock()
        outcomes: list[SearchResult | ErrorReply | None] = [None] * len(batch)
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, np.ndarray]] = []
        for i, pending in enumerate(batch):
            req = pending.request
            if self._expired(req, start):
                outcomes[i] = error_reply(req.request_id, DeadlineExpired(f"deadline {req.deadline.isoformat()} passed before processing"))
                continue
            if req.query_image_b64:
                try:
                    images.append((i, await asyncio.to_thread(pixels_from_base64, req.query_image_b64, self.image_limits)))
                except InputError as err:
                    outcomes[i] = error_reply(req.request_id, err)
                    continue
            if req.query_text and req.query_text.strip():
                texts.append((i, req.query_text))
        live = [i for i, o in enumerate(outcomes) if o is None]
        if not live:
            return outcomes  # type: ignore[return-value]

        enc_start = self.clock()
        vectors = await encode_rows(self.encoder, texts, images)
        queries = np.zeros((len(batch), vectors[0][1].shape[0]), dtype=np.float32)
        for i, vec in vectors:
            queries[i] += vec
        queries = queries[live]
        queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        encode_s = self.clock() - enc_start

        params = []
        for i in live:
            req = batch[i].request
            f = req.filters
            params.append(
                Query(
                    top_k=req.top_k or self.default_top_k,
                    threshold=req.similarity_threshold if req.similarity_threshold is not None else self.default_threshold,
                    filter=SearchFilter(f.category, f.min_price, f.max_price) if f else None,
                )
            )
        rank_start = self.clock()
        ranked = await self.ranker.search(queries, params)
        rank_s = self.clock() - rank_start
        done = self.clock()
        for i, hits in zip(live, ranked):
            pending = batch[i]
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
            outcomes[i] = SearchResult(
                request_id=pending.request.request_id,
                items=items,
                model_id=self.encoder.model_id,
                random_weights=self.encoder.random_weights,
                batch_size=len(live),
                timings=Timings(
                    queue_ms=max(0.0, (start - pending.received_at) * 1000),
                    encode_ms=encode_s * 1000,
                    rank_ms=rank_s * 1000,
                    total_ms=max(0.0, (done - pending.received_at) * 1000),
                ),
            )
        return outcomes  # type: ignore[return-value]


@dataclass(frozen=True)
class ProductOutcome:
    """What became of one update.

    ``status``: ``applied`` (stored and/or indexed), ``stale`` (a same-or-newer version is held),
    or ``error`` (``error`` says why; the update goes to the dead-letter topic).
    """

    update: ProductUpdated
    status: str
    error: InputError | None = None
    feature: np.ndarray | None = None


class ProductStoreLike(Protocol):
    async def upsert(self, meta: ProductMeta, feature: np.ndarray, model_id: str, image: bytes | None = None) -> bool: ...

    async def delete(self, product_id: str, version: int) -> bool: ...

    async def get_versions(self, ids: Sequence[str]) -> dict[str, tuple[int, str | None, bool]]: ...


def product_meta(update: ProductUpdated) -> ProductMeta:
    return ProductMeta(update.product_id, update.version, update.name, update.description, update.category, update.price)


def feature_event(update: ProductUpdated, feature: np.ndarray | None, model_id: str) -> ProductFeature:
    """The features-topic record for an applied update (float16 on the wire)."""
    if update.deleted or feature is None:
        return ProductFeature(product_id=update.product_id, version=update.version, model_id=model_id, deleted=True)
    vec = np.asarray(feature, dtype="<f2")
    return ProductFeature(
        product_id=update.product_id,
        version=update.version,
        model_id=model_id,
        name=update.name,
        description=update.description,
        category=update.category,
        price=update.price,
        dim=int(vec.shape[0]),
        feature_b64=base64.b64encode(vec.tobytes()).decode(),
    )


@dataclass
class FeatureApplyReport:
    """What ``apply_feature_events`` did: rows applied (upserts and deletes), that changed nothing (not newer), of another model, unusable."""

    applied: int = 0
    unchanged: int = 0
    other_model: int = 0
    invalid: list[str] = field(default_factory=list)


def apply_feature_events(index: FeatureIndex, events: Sequence[ProductFeature], model_id: str) -> FeatureApplyReport:
    """Apply features-topic records to ``index`` in order, upserts in vectorised runs.

    Records of another model are skipped; a feature that is not ``index.dim`` float16 values,
    or has a zero or non-finite norm, is reported in ``invalid`` and not applied.
    """
    report = FeatureApplyReport()
    metas: list[ProductMeta] = []
    raw: list[bytes] = []
    width = index.dim * 2

    def flush() -> None:
        if metas:
            matrix = np.frombuffer(b"".join(raw), dtype="<f2").reshape(len(metas), index.dim).astype(np.float32)
            done = index.upsert_many(metas, matrix)
            report.applied += done.applied
            report.unchanged += done.stale
            report.invalid.extend(done.invalid)
            metas.clear()
            raw.clear()

    for event in events:
        if event.model_id != model_id:
            report.other_model += 1
        elif event.deleted or not event.feature_b64:
            flush()
            if index.delete(event.product_id, event.version):
                report.applied += 1
            else:
                report.unchanged += 1
        else:
            try:
                vector = pybase64.b64decode(event.feature_b64, validate=True)
            except ValueError:
                vector = b""
            if len(vector) != width:
                report.invalid.append(event.product_id)
                continue
            metas.append(ProductMeta(event.product_id, event.version, event.name, event.description, event.category, event.price))
            raw.append(vector)
    flush()
    return report


class ProductHandler:
    """Encodes product updates (image if present, else text) and applies them, newest version wins.

    Held versions come from the store when there is one (so restarts and other replicas
    skip re-encoding), else from the index. A stored feature made by another model id
    counts as not held, so the product is re-encoded rather than mixed in. ``before_apply``
    runs after encoding and before anything is stored (the ingest role publishes the
    features there, so a crash in between re-encodes rather than loses an update).
    """

    def __init__(
        self,
        encoder: Encoder,
        index: FeatureIndex | None,
        image_limits: ImageLimits,
        store: ProductStoreLike | None = None,
        before_apply=None,
    ) -> None:
        self.encoder = encoder
        self.index = index
        self.store = store
        self.image_limits = image_limits
        self.before_apply = before_apply
        self.encoded_products = 0
        self.encoded_images = 0

    async def held_versions(self, updates: Sequence[ProductUpdated]) -> dict[str, int]:
        ids = list({u.product_id for u in updates})
        if self.store is not None:
            stored = await self.store.get_versions(ids)
            return {pid: v for pid, (v, model, deleted) in stored.items() if deleted or model == self.encoder.model_id}
        if self.index is None:
            return {}
        return {pid: v for pid in ids if (v := self.index.version_of(pid)) is not None}

    async def encode(self, updates: Sequence[ProductUpdated]) -> list[np.ndarray | InputError | None]:
        """Feature per update (None for deletes); image decode errors are returned, not raised."""
        out: list[np.ndarray | InputError | None] = [None] * len(updates)
        texts, images = [], []
        for i, u in enumerate(updates):
            if u.deleted:
                continue
            if u.image_b64:
                try:
                    images.append((i, await asyncio.to_thread(pixels_from_base64, u.image_b64, self.image_limits)))
                except InputError as err:
                    out[i] = err
            else:
                texts.append((i, product_text(u)))
        for i, vec in await encode_rows(self.encoder, texts, images):
            out[i] = vec
        self.encoded_products += len(texts) + len(images)
        self.encoded_images += len(images)
        return out

    async def handle(self, updates: Sequence[ProductUpdated]) -> list[ProductOutcome]:
        """One outcome per update, in order; stale updates are skipped before any encoding."""
        held = await self.held_versions(updates)
        todo = [i for i, u in enumerate(updates) if u.version > held.get(u.product_id, -1)]
        features = dict(zip(todo, await self.encode([updates[i] for i in todo])))
        outcomes = []
        for i, u in enumerate(updates):
            if i not in features:
                outcomes.append(ProductOutcome(u, "stale"))
            elif isinstance(features[i], InputError):
                outcomes.append(ProductOutcome(u, "error", error=features[i]))
            else:
                outcomes.append(ProductOutcome(u, "encoded", feature=features[i]))
        if self.before_apply is not None:
            await self.before_apply([o for o in outcomes if o.status == "encoded"])
        return [
            ProductOutcome(o.update, "applied" if await self.apply(o.update, o.feature) else "stale", feature=o.feature)
            if o.status == "encoded"
            else o
            for o in outcomes
        ]

    async def apply(self, update: ProductUpdated, feature: np.ndarray | None) -> bool:
        """Store first (the durable copy), then index; False when a same-or-newer version is held."""
        if self.store is not None:
            if update.deleted:
                stored = await self.store.delete(update.product_id, update.version)
            else:
                image = base64.b64decode(update.image_b64) if update.image_b64 else None
                stored = await self.store.upsert(product_meta(update), feature, self.encoder.model_id, image)
            if not stored:
                return False
        if self.index is None:
            return True
        if update.deleted:
            return self.index.delete(update.product_id, update.version)
        return self.index.upsert(product_meta(update), feature)

"""Durable product catalogue on MongoDB, with an exact on-demand search over it.

(About 400 lines: one collection's whole contract, writes, reads and the streamed search share
its document format and version rule, so they stay together.)

One document per product, keyed by product id::

    {_id: product_id, version: int, deleted: False, name, description,
     category: str | null, price: float | null, model_id: str, dim: int,
     feature: BinData(L2-normalised float16 little-endian, dim * 2 bytes),
     updated_at: datetime (UTC)}

A deleted product is a tombstone ``{_id, version, deleted: True, updated_at}``
that keeps its version so that an older upsert arriving later cannot bring it
back; it has no model_id and so never matches a model's queries.

Features are stored as float16: half the bytes of float32, and for unit vectors
the dot product with a unit query moves by at most ~5e-4 (float16 keeps an 11-bit
significand), so on-demand scores stay within 1e-3 of float32 cosine similarity.
Rankings equal FeatureIndex's except where two products' float32 scores lie
within that error of each other.

Only standard MongoDB features are used (versioned upserts detected through
E11000, a journaled write concern, compound indexes, cursors with projections),
so the same code runs against SecantusDB and against MongoDB.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from bson import Binary
from pymongo import AsyncMongoClient, IndexModel, UpdateOne, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError

from consumer.index.feature_index import ProductMeta
from consumer.index.ranking import Hit, Query, RunningTopK, SearchFilter, filter_mask

__all__ = ["FEATURE_DTYPE", "ProductStore"]

FEATURE_DTYPE = np.dtype("<f2")

_DUPLICATE_KEY = 11000
_ID_BATCH = 5000
_LIVE_FIELDS = ("name", "description", "category", "price", "model_id", "dim", "feature", "image")
_META_PROJECTION = {"version": 1, "name": 1, "description": 1, "category": 1, "price": 1}


class ProductStore:
    """Versioned product documents in one collection, plus on-demand exact search.

    Versions are monotonic per product id: an upsert is applied only if its
    version is newer than the stored one (live or tombstone; see `upsert`), which
    holds under concurrent writers in any number of processes because the
    decision is made by the database on the ``_id`` unique index. Writes use a
    journaled write concern unless ``journal=False`` (the client's other write
    concern settings are kept), so an acknowledged write survives a server
    crash. Safe for concurrent use from one event loop.
    """

    __slots__ = ("_client", "_collection")

    def __init__(
        self,
        client: AsyncMongoClient[dict[str, Any]],
        database: str,
        collection: str = "products",
        *,
        journal: bool = True,
    ) -> None:
        coll = client[database][collection]
        concern = coll.write_concern
        if not concern.acknowledged:
            raise ValueError("ProductStore needs acknowledged writes (w != 0)")
        if journal and not concern.document.get("j") and not concern.document.get("fsync"):
            coll = coll.with_options(write_concern=WriteConcern(**{**concern.document, "j": True}))
        self._client = client
        self._collection: AsyncCollection[dict[str, Any]] = coll

    @property
    def collection(self) -> AsyncCollection[dict[str, Any]]:
        return self._collection

    async def ensure_indexes(self) -> None:
        """Create the indexes the queries use (idempotent)."""
        await self._collection.create_indexes(
            [
                IndexModel([("model_id", 1), ("category", 1)]),
                IndexModel([("model_id", 1), ("price", 1)]),
            ]
        )

    async def close(self) -> None:
        """Close the client this store was given."""
        await self._client.close()

    async def upsert(self, meta: ProductMeta, feature: np.ndarray, model_id: str, image: bytes | None = None) -> bool:
        """Store a product; False (and no change) unless meta.version is newer.

        Newer means strictly greater than the stored version (live or tombstone),
        or equal to that of a live product whose feature came from another model:
        re-encoding with the current model replaces it (so with two models writing
        the same version, the last writer wins; run one model per deployment).
        The feature is L2-normalised on a copy and stored as float16; a feature
        that is not 1-D or has zero/non-finite norm raises ValueError. ``image`` (the
        product's encoded image bytes) is kept so another model can re-encode it; it
        is never read on the search path.
        """
        return await self._apply(_upsert_write(meta, feature, model_id, image))

    async def upsert_many(
        self, items: Sequence[tuple[ProductMeta, np.ndarray]], model_id: str, images: Sequence[bytes | None] | None = None
    ) -> list[bool]:
        """Bulk `upsert` in one round trip (plus one per conflict); result i says whether items[i] was applied.

        The newest version of each id wins whatever order the server applies the
        batch in; an item superseded by a newer one in the same batch may still
        report True (it was applied, then replaced). ``images[i]``, when given, is
        item i's image bytes (as ``upsert``'s ``image``).
        """
        if images is not None and len(images) != len(items):
            raise ValueError(f"{len(images)} images for {len(items)} items")
        pictures = images if images is not None else [None] * len(items)
        writes = [_upsert_write(meta, feature, model_id, image) for (meta, feature), image in zip(items, pictures, strict=True)]
        if not writes:
            return []
        applied = [True] * len(writes)
        try:
            await self._collection.bulk_write([UpdateOne(w.older, w.update, upsert=True) for w in writes], ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != _DUPLICATE_KEY for e in errors):
                raise
            for i in sorted(e["index"] for e in errors):
                applied[i] = await self._after_conflict(writes[i])
        return applied

    async def delete(self, product_id: str, version: int) -> bool:
        """Turn the product into a tombstone at `version`; True if the stored state changed.

        Applies when the stored version is older, or equal and still live (as
        FeatureIndex.delete); an absent id gets a tombstone. Later upserts must be
        strictly newer than the tombstone.
        """
        update = {
            "$set": {"version": version, "deleted": True, "updated_at": datetime.now(UTC)},
            "$unset": dict.fromkeys(_LIVE_FIELDS, ""),
        }
        return await self._apply(
            _Write(
                older={"_id": product_id, "version": {"$lt": version}},
                same={"_id": product_id, "version": version, "deleted": False},
                update=update,
            )
        )

    async def get_versions(self, ids: Iterable[str]) -> dict[str, tuple[int, str | None, bool]]:
        """Stored (version, model_id, deleted) per known id; absent ids are left out.

        model_id is None for tombstones.
        """
        out: dict[str, tuple[int, str | None, bool]] = {}
        unique = list(dict.fromkeys(ids))
        projection = {"version": 1, "model_id": 1, "deleted": 1}
        for start in range(0, len(unique), _ID_BATCH):
            selector = {"_id": {"$in": unique[start : start + _ID_BATCH]}}
            async for doc in self._collection.find(selector, projection):
                out[doc["_id"]] = (doc["version"], doc.get("model_id"), bool(doc.get("deleted")))
        return out

    async def count(self, model_id: str) -> int:
        """Live products whose feature was computed by `model_id`."""
        return await self._collection.count_documents({"model_id": model_id, "deleted": False})

    async def iter_products(self, model_id: str, batch_size: int = 2048) -> AsyncIterator[tuple[ProductMeta, np.ndarray]]:
        """Every live product of `model_id` with its float32 feature (unordered).

        Products encoded by another model are not yielded: read them with
        `iter_stale_model_products` and re-encode them.
        """
        projection = {**_META_PROJECTION, "feature": 1}
        cursor = self._collection.find({"model_id": model_id, "deleted": False}, projection, batch_size=batch_size)
        try:
            async for doc in cursor:
                feature = np.frombuffer(doc["feature"], dtype=FEATURE_DTYPE).astype(np.float32)
                yield _meta(doc), feature
        finally:
            await cursor.close()

    async def iter_product_chunks(self, model_id: str, rows: int = 2048) -> AsyncIterator[tuple[list[ProductMeta], np.ndarray]]:
        """``iter_products`` in chunks of up to ``rows``: (metas, float32 features [len(metas), dim])."""
        metas: list[ProductMeta] = []
        features: list[np.ndarray] = []
        async for meta, feature in self.iter_products(model_id, batch_size=rows):
            metas.append(meta)
            features.append(feature)
            if len(metas) == rows:
                yield metas, np.stack(features)
                metas, features = [], []
        if metas:
            yield metas, np.stack(features)

    async def iter_stale_model_products(self, model_id: str) -> AsyncIterator[tuple[ProductMeta, bytes | None]]:
        """Live products stored by another model, with their kept image bytes (None for text-only products)."""
        projection = {**_META_PROJECTION, "image": 1}
        cursor = self._collection.find({"deleted": False, "model_id": {"$ne": model_id}}, projection, batch_size=256)
        try:
            async for doc in cursor:
                yield _meta(doc), (bytes(doc["image"]) if doc.get("image") else None)
        finally:
            await cursor.close()

    async def search(
        self,
        queries: np.ndarray,
        params: Sequence[Query],
        model_id: str,
        chunk_rows: int = 4096,
    ) -> list[list[tuple[Hit, ProductMeta]]]:
        """Exact top-k over the stored features of `model_id`, as FeatureIndex.search.

        queries [q, dim] are assumed L2-normalised. Results per query are ordered
        by score descending then product_id ascending and honour each Query's
        threshold and filter. Memory is bounded by `chunk_rows`: features are
        streamed in chunks, and metadata is fetched only for the final hits. A
        hit whose product is deleted or re-encoded between the scan and that
        fetch is dropped; its metadata is the one current at the fetch.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2:
            raise ValueError(f"queries must have shape (q, dim), got {queries.shape}")
        if queries.shape[0] != len(params):
            raise ValueError(f"{queries.shape[0]} query vectors but {len(params)} params")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if not params:
            return []
        filters = [None if p.filter is None or p.filter.is_empty else p.filter for p in params]
        selector, masked = _scan_selector(model_id, filters)
        projection = {"feature": 1, "category": 1, "price": 1} if masked else {"feature": 1}
        scan = _ChunkScorer(queries, params, filters if masked else None, chunk_rows)
        cursor = self._collection.find(selector, projection, batch_size=chunk_rows)
        try:
            docs = await cursor.to_list(chunk_rows)
            while docs:
                fetch = asyncio.ensure_future(cursor.to_list(chunk_rows))
                try:
                    await asyncio.to_thread(scan.push, docs)
                except BaseException:
                    fetch.cancel()
                    await asyncio.wait([fetch])
                    raise
                docs = await fetch
        finally:
            await cursor.close()
        results = scan.topk.results()
        metas = await self._metas({hit.product_id for hits in results for hit in hits}, model_id)
        return [[(hit, metas[hit.product_id]) for hit in hits if hit.product_id in metas] for hits in results]

    async def _metas(self, ids: set[str], model_id: str) -> dict[str, ProductMeta]:
        if not ids:
            return {}
        selector = {"_id": {"$in": sorted(ids)}, "model_id": model_id, "deleted": False}
        return {doc["_id"]: _meta(doc) async for doc in self._collection.find(selector, _META_PROJECTION)}

    async def _apply(self, write: _Write) -> bool:
        return await self._upsert_if_older(write) or await self._after_conflict(write)

    async def _after_conflict(self, write: _Write) -> bool:
        """Decide a write whose upsert hit E11000 (the document exists from then on).

        Either the stored version is the same and still replaceable, or it is
        newer, or a concurrent first insert of the id won the race, in which case
        a second conditional upsert decides.
        """
        if (await self._collection.update_one(write.same, write.update)).matched_count:
            return True
        return await self._upsert_if_older(write)

    async def _upsert_if_older(self, write: _Write) -> bool:
        try:
            await self._collection.update_one(write.older, write.update, upsert=True)
        except DuplicateKeyError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class _Write:
    """A versioned write as two selectors, kept free of $or so _id lookups stay point reads.

    `older` matches a stored document the write replaces because it is older
    (and is upserted, E11000 meaning "exists and not older"); `same` matches a
    stored document at the same version that the write still replaces.
    """

    older: dict[str, Any]
    same: dict[str, Any]
    update: dict[str, Any]


class _ChunkScorer:
    """Decodes chunks of feature documents into one float32 buffer and ranks them."""

    __slots__ = ("_buffer", "_filters", "_queries", "_scores", "topk")

    def __init__(
        self,
        queries: np.ndarray,
        params: Sequence[Query],
        filters: list[SearchFilter | None] | None,
        chunk_rows: int,
    ) -> None:
        self._queries = queries
        self._filters = filters
        self._buffer = np.empty((chunk_rows, queries.shape[1]), dtype=np.float32)
        self._scores = np.empty(queries.shape[0] * chunk_rows, dtype=np.float32)
        self.topk = RunningTopK(params)

    def push(self, docs: list[dict[str, Any]]) -> None:
        n = len(docs)
        dim = self._buffer.shape[1]
        raw = b"".join(doc["feature"] for doc in docs)
        if len(raw) != n * dim * FEATURE_DTYPE.itemsize:
            bad = next(d["_id"] for d in docs if len(d["feature"]) != dim * FEATURE_DTYPE.itemsize)
            raise ValueError(f"stored feature of {bad!r} does not have the query dim {dim}")
        chunk = self._buffer[:n]
        chunk[...] = np.frombuffer(raw, dtype=FEATURE_DTYPE).reshape(n, dim)
        scores = self._scores[: self._queries.shape[0] * n].reshape(-1, n)
        np.matmul(self._queries, chunk.T, out=scores)
        mask = None
        if self._filters is not None:
            categories = np.array([doc.get("category") for doc in docs], dtype=object)
            prices = np.array([_price(doc.get("price")) for doc in docs], dtype=np.float64)
            mask = filter_mask(self._filters, categories, prices)
        self.topk.push(scores, [doc["_id"] for doc in docs], mask)


def _scan_selector(model_id: str, filters: list[SearchFilter | None]) -> tuple[dict[str, Any], bool]:
    """Mongo selector for the scan and whether rows still need a per-query mask.

    A filter shared by every query is pushed down whole; distinct filters are
    pushed down as their union, unless some query is unfiltered.
    """
    selector: dict[str, Any] = {"model_id": model_id, "deleted": False}
    distinct = list(dict.fromkeys(filters))
    if len(distinct) == 1:
        if distinct[0] is not None:
            selector.update(_filter_selector(distinct[0]))
        return selector, False
    if None not in distinct:
        selector["$or"] = [_filter_selector(f) for f in distinct if f is not None]
    return selector, True


def _filter_selector(f: SearchFilter) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.category is not None:
        out["category"] = f.category
    bounds: dict[str, float] = {}
    if f.min_price is not None:
        bounds["$gte"] = float(f.min_price)
    if f.max_price is not None:
        bounds["$lte"] = float(f.max_price)
    if bounds:
        out["price"] = bounds
    return out


def _upsert_write(meta: ProductMeta, feature: np.ndarray, model_id: str, image: bytes | None = None) -> _Write:
    vector = np.asarray(feature, dtype=np.float32)
    if vector.ndim != 1 or vector.shape[0] == 0:
        raise ValueError(f"feature of {meta.product_id!r} must be a non-empty 1-D array, got {vector.shape}")
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"feature of {meta.product_id!r} has norm {norm}")
    encoded = (vector / np.float32(norm)).astype(FEATURE_DTYPE)
    price = None if meta.price is None or math.isnan(meta.price) else float(meta.price)
    fields = {
        "version": meta.version,
        "deleted": False,
        "name": meta.name,
        "description": meta.description,
        "category": meta.category,
        "price": price,
        "model_id": model_id,
        "dim": int(vector.shape[0]),
        "feature": Binary(encoded.tobytes()),
        "image": Binary(image) if image else None,
        "updated_at": datetime.now(UTC),
    }
    return _Write(
        older={"_id": meta.product_id, "version": {"$lt": meta.version}},
        same={"_id": meta.product_id, "version": meta.version, "deleted": False, "model_id": {"$ne": model_id}},
        update={"$set": fields},
    )


def _price(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _meta(doc: dict[str, Any]) -> ProductMeta:
    price = doc.get("price")
    return ProductMeta(
        product_id=doc["_id"],
        version=doc["version"],
        name=doc.get("name", ""),
        description=doc.get("description", ""),
        category=doc.get("category"),
        price=None if price is None else float(price),
    )

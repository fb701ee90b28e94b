"""In-memory product feature matrix for the cached search mode.

Pure numpy/stdlib. Not thread-safe: callers serialise upserts, deletes and searches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from consumer.int8_kernel import Int8Scorer, to_offset_uint8
from consumer.ranking import Hit, Query, RunningTopK, filter_mask

__all__ = ["FeatureIndex", "ProductMeta", "StorageDType"]

StorageDType = Literal["float32", "float16", "int8"]

_GROWTH = 1.5
_NO_CATEGORY = -1


@dataclass(frozen=True, slots=True)
class ProductMeta:
    """What a search reply renders for one product."""

    product_id: str
    version: int
    name: str
    description: str
    category: str | None
    price: float | None


class FeatureIndex:
    """Slot-per-product feature matrix with versioned upserts and exact chunked search.

    Vectors are stored L2-normalised as float32, float16 (plain cast) or int8
    (symmetric per-vector scale = max|v| / 127, held as uint8 = int8 + 128 and scored
    against per-row int8-quantised queries by ``consumer.int8_kernel``). Scores are dot products of the
    (assumed normalised) queries with the stored vectors, i.e. cosine similarity
    up to quantisation error. Versions are monotonic per product id: an upsert or
    delete whose version is not newer than what the index has seen is ignored.
    """

    __slots__ = (
        "_alive",
        "_buffer",
        "_int8",
        "_categories",
        "_category_codes",
        "_chunk_rows",
        "_dim",
        "_dtype",
        "_free",
        "_high_water",
        "_matrix",
        "_metas",
        "_prices",
        "_scales",
        "_slot_ids",
        "_slots",
        "_tombstones",
    )

    def __init__(
        self,
        dim: int,
        dtype: StorageDType = "float32",
        initial_capacity: int = 1024,
        chunk_rows: int = 8192,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if dtype not in ("float32", "float16", "int8"):
            raise ValueError(f"unsupported storage dtype {dtype!r}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        capacity = max(1, int(initial_capacity))
        self._dim = dim
        self._dtype: StorageDType = dtype
        self._chunk_rows = chunk_rows
        self._matrix = np.full((capacity, dim), 128, dtype=np.uint8) if dtype == "int8" else np.zeros((capacity, dim), dtype=np.dtype(dtype))
        self._scales = np.zeros(capacity, dtype=np.float32) if dtype == "int8" else None
        self._categories = np.full(capacity, _NO_CATEGORY, dtype=np.int32)
        self._prices = np.full(capacity, np.nan, dtype=np.float64)
        self._alive = np.zeros(capacity, dtype=bool)
        self._slot_ids = np.full(capacity, None, dtype=object)
        self._metas: list[ProductMeta | None] = [None] * capacity
        self._slots: dict[str, int] = {}
        self._tombstones: dict[str, int] = {}
        self._free: list[int] = []
        self._high_water = 0
        self._category_codes: dict[str, int] = {}
        self._buffer: np.ndarray | None = None
        self._int8 = Int8Scorer() if dtype == "int8" else None

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> StorageDType:
        return self._dtype

    @property
    def capacity(self) -> int:
        """Allocated slots."""
        return self._matrix.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the matrix, int8 scales and per-slot metadata arrays.

        Excludes Python objects (ProductMeta, id strings, dicts) and the search
        scratch buffer (chunk_rows x dim float32, only for float16/int8).
        """
        total = (
            self._matrix.nbytes
            + self._categories.nbytes
            + self._prices.nbytes
            + self._alive.nbytes
            + self._slot_ids.nbytes
        )
        if self._scales is not None:
            total += self._scales.nbytes
        return total

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._slots

    def ids(self) -> list[str]:
        """Ids of live products."""
        return list(self._slots)

    def get(self, product_id: str) -> ProductMeta | None:
        slot = self._slots.get(product_id)
        return None if slot is None else self._metas[slot]

    def version_of(self, product_id: str) -> int | None:
        """Version of the live product, or None if absent or deleted."""
        meta = self.get(product_id)
        return None if meta is None else meta.version

    def _seen_version(self, product_id: str) -> int | None:
        meta = self.get(product_id)
        return self._tombstones.get(product_id) if meta is None else meta.version

    def upsert(self, meta: ProductMeta, feature: np.ndarray) -> bool:
        """Insert or replace a product; False (and no change) unless meta.version is newer.

        Newer means strictly greater than both the live version and the version of
        a previous delete of the same id. The feature is L2-normalised on a copy;
        a feature of the wrong size or with zero/non-finite norm raises ValueError.
        """
        seen = self._seen_version(meta.product_id)
        if seen is not None and meta.version <= seen:
            return False
        vector = np.asarray(feature, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self._dim:
            raise ValueError(f"feature has {vector.shape[0]} values, index dim is {self._dim}")
        norm = float(np.linalg.norm(vector.astype(np.float64)))
        if not math.isfinite(norm) or norm == 0.0:
            raise ValueError(f"feature of {meta.product_id!r} has norm {norm}")
        vector = vector / np.float32(norm)

        slot = self._slots.get(meta.product_id)
        if slot is None:
            slot = self._allocate_slot()
            self._slots[meta.product_id] = slot
            self._tombstones.pop(meta.product_id, None)
        if self._scales is not None:
            peak = float(np.max(np.abs(vector)))
            scale = peak / 127.0
            self._matrix[slot] = to_offset_uint8(np.clip(np.rint(vector / np.float32(scale)), -127, 127))
            self._scales[slot] = scale
        else:
            self._matrix[slot] = vector
        self._categories[slot] = self._category_code(meta.category)
        self._prices[slot] = np.nan if meta.price is None else meta.price
        self._alive[slot] = True
        self._slot_ids[slot] = meta.product_id
        self._metas[slot] = meta
        return True

    def delete(self, product_id: str, version: int | None = None) -> bool:
        """Remove a live product; True if one was removed.

        A delete with a version older than the live one is ignored. The deleted
        id keeps a tombstone (the delete's version, or the live version when none
        is given) so a later upsert with a version <= it is ignored. A versioned
        delete of an absent id only records/raises its tombstone and returns False.
        """
        slot = self._slots.get(product_id)
        if slot is None:
            if version is not None:
                previous = self._tombstones.get(product_id)
                if previous is None or version > previous:
                    self._tombstones[product_id] = version
            return False
        meta = self._metas[slot]
        assert meta is not None
        if version is not None and version < meta.version:
            return False
        del self._slots[product_id]
        self._tombstones[product_id] = meta.version if version is None else version
        self._alive[slot] = False
        self._slot_ids[slot] = None
        self._metas[slot] = None
        self._categories[slot] = _NO_CATEGORY
        self._prices[slot] = np.nan
        self._free.append(slot)
        return True

    def search(
        self, queries: np.ndarray, params: Sequence[Query]
    ) -> list[list[tuple[Hit, ProductMeta]]]:
        """Top-k live products per query by dot product with queries [q, dim].

        Queries are assumed L2-normalised. Results per query are ordered by score
        descending then product_id ascending, honour each Query's threshold and
        filter, and never include deleted or unused slots.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self._dim:
            raise ValueError(f"queries must have shape (q, {self._dim}), got {queries.shape}")
        if queries.shape[0] != len(params):
            raise ValueError(f"{queries.shape[0]} query vectors but {len(params)} params")
        topk = RunningTopK(params)
        filters = [p.filter for p in params]
        for start in range(0, self._high_water, self._chunk_rows):
            end = min(start + self._chunk_rows, self._high_water)
            alive = self._alive[start:end]
            if not alive.any():
                continue
            mask = filter_mask(
                filters, self._categories[start:end], self._prices[start:end], self._category_codes
            )
            if mask is not None:
                mask &= alive
                if not mask.any():
                    continue
            elif not alive.all():
                mask = alive[None, :]
            topk.push(self._chunk_scores(queries, start, end), self._slot_ids[start:end], mask)
        return [
            [(hit, self._metas[self._slots[hit.product_id]]) for hit in hits]  # type: ignore[misc]
            for hits in topk.results()
        ]

    def _chunk_scores(self, queries: np.ndarray, start: int, end: int) -> np.ndarray:
        chunk = self._matrix[start:end]
        if self._dtype == "float32":
            return queries @ chunk.T
        if self._dtype == "int8":
            return self._int8.scores(chunk, queries) * self._scales[start:end]
        if self._buffer is None:
            self._buffer = np.empty((self._chunk_rows, self._dim), dtype=np.float32)
        buffer = self._buffer[: end - start]
        buffer[...] = chunk
        scores = queries @ buffer.T
        if self._scales is not None:
            scores *= self._scales[start:end]
        return scores

    def reserve(self, products: int) -> None:
        """Room for ``products`` slots in one allocation, so a bulk load of a known size leaves no growth slack."""
        if products > self.capacity:
            self._grow(products)

    def _allocate_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._high_water == self.capacity:
            self._grow(max(self.capacity + 1, int(self.capacity * _GROWTH)))
        slot = self._high_water
        self._high_water += 1
        return slot

    def _grow(self, capacity: int) -> None:
        used = self._high_water

        def grown(old: np.ndarray, fill: object) -> np.ndarray:
            new = np.empty((capacity, *old.shape[1:]), dtype=old.dtype)
            new[:used] = old[:used]
            new[used:] = fill
            return new

        self._matrix = grown(self._matrix, 0)
        if self._scales is not None:
            self._scales = grown(self._scales, 0)
        self._categories = grown(self._categories, _NO_CATEGORY)
        self._prices = grown(self._prices, np.nan)
        self._alive = grown(self._alive, False)
        self._slot_ids = grown(self._slot_ids, None)
        self._metas.extend([None] * (capacity - len(self._metas)))

    def _category_code(self, category: str | None) -> int:
        if category is None:
            return _NO_CATEGORY
        code = self._category_codes.get(category)
        if code is None:
            code = len(self._category_codes)
            self._category_codes[category] = code
        return code

"""In-memory product feature matrix for the cached search mode.

Pure numpy/stdlib. Not thread-safe: callers serialise upserts, deletes and searches.

Longer than most modules (about 450 lines) on purpose: one data structure whose slot arrays
(features, scales, versions, tombstones, fields) must change together in every write, and
whose three storage dtypes share each code path; splitting it would spread that invariant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from consumer.index.int8_kernel import Int8Scorer, to_offset_uint8
from consumer.index.ranking import Hit, Query, RunningTopK, filter_mask

__all__ = ["FeatureIndex", "IndexState", "ProductMeta", "StorageDType", "UpsertReport"]

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


@dataclass(frozen=True, slots=True)
class UpsertReport:
    """Outcome of ``FeatureIndex.upsert_many``: rows applied, rows not newer, ids of rows with an unusable norm."""

    applied: int
    stale: int
    invalid: tuple[str, ...]


@dataclass(frozen=True)
class IndexState:
    """Everything a ``FeatureIndex`` holds, as arrays and lists (the input of ``restore``).

    Arrays cover slots ``[0, high_water)`` and are views of the index when taken with
    ``FeatureIndex.state`` (copy or write them before the index changes). ``live_slots``,
    ``ids``, ``versions``, ``names`` and ``descriptions`` are parallel, one entry per live
    product; category and price come from the per-slot arrays.
    """

    dim: int
    dtype: StorageDType
    matrix: np.ndarray
    scales: np.ndarray | None
    categories: np.ndarray
    prices: np.ndarray
    category_names: list[str]
    live_slots: np.ndarray
    ids: list[str]
    versions: np.ndarray
    names: list[str]
    descriptions: list[str]
    tombstones: dict[str, int]


def _owned(array: np.ndarray) -> np.ndarray:
    flags = array.flags
    return array if flags.owndata and flags.writeable and flags.c_contiguous else array.copy()


class FeatureIndex:
    """Slot-per-product feature matrix with versioned upserts and exact chunked search.

    Vectors are stored L2-normalised as float32, float16 (plain cast) or int8
    (symmetric per-vector scale = max|v| / 127, held as uint8 = int8 + 128 and scored
    against per-row int8-quantised queries by ``consumer.index.int8_kernel``). Scores are dot products of the
    (assumed normalised) queries with the stored vectors, i.e. cosine similarity
    up to quantisation error. Versions are monotonic per product id: an upsert or
    delete whose version is not newer than what the index has seen is ignored.
    """

    __slots__ = (
        "_alive",
        "_buffer",
        "_categories",
        "_category_codes",
        "_chunk_rows",
        "_dim",
        "_dtype",
        "_free",
        "_high_water",
        "_int8",
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
        self._dim = dim
        self._dtype: StorageDType = dtype
        self._chunk_rows = chunk_rows
        self._buffer: np.ndarray | None = None
        self._int8 = Int8Scorer() if dtype == "int8" else None
        self._reset(max(1, int(initial_capacity)))

    def _reset(self, capacity: int, matrix: np.ndarray | None = None, scales: np.ndarray | None = None) -> None:
        """Empty the index, with room for ``capacity`` slots (in ``matrix``/``scales`` when given)."""
        dim, dtype = self._dim, self._dtype
        if matrix is None:
            matrix = np.full((capacity, dim), 128, dtype=np.uint8) if dtype == "int8" else np.zeros((capacity, dim), dtype=np.dtype(dtype))
        if scales is None and dtype == "int8":
            scales = np.zeros(capacity, dtype=np.float32)
        self._matrix = matrix
        self._scales = scales
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

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> StorageDType:
        return self._dtype

    @property
    def capacity(self) -> int:
        """Allocated slots."""
        return len(self._matrix)

    @property
    def nbytes(self) -> int:
        """Bytes of the matrix, int8 scales and per-slot metadata arrays.

        Excludes Python objects (ProductMeta, id strings, dicts) and the search
        scratch buffer (chunk_rows x dim float32, only for float16/int8).
        """
        total = self._matrix.nbytes + self._categories.nbytes + self._prices.nbytes + self._alive.nbytes + self._slot_ids.nbytes
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

    def upsert(self, meta: ProductMeta, feature: np.ndarray) -> bool:
        """Insert or replace a product; False (and no change) unless meta.version is newer.

        Newer means strictly greater than both the live version and the version of
        a previous delete of the same id. The feature is L2-normalised on a copy;
        a feature of the wrong size or with zero/non-finite norm raises ValueError.
        """
        vector = np.asarray(feature, dtype=np.float32).reshape(1, -1)
        if vector.shape[1] != self._dim:
            raise ValueError(f"feature has {vector.shape[1]} values, index dim is {self._dim}")
        report = self.upsert_many([meta], vector)
        if report.invalid:
            raise ValueError(f"feature of {meta.product_id!r} has a zero or non-finite norm")
        return report.applied == 1

    def upsert_many(self, metas: Sequence[ProductMeta], features: np.ndarray) -> UpsertReport:
        """``upsert`` for rows of ``features`` [len(metas), dim] in one vectorised write.

        Same result as upserting the rows in order (a later row of the same id wins if its
        version is newer), except that rows with a zero or non-finite norm are skipped and
        reported instead of raising. A wrong shape raises ValueError before any change.
        Memory: one float64 copy of ``features`` while norms are taken, so callers chunk.
        """
        vectors = np.asarray(features, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(metas), self._dim):
            raise ValueError(f"features must have shape ({len(metas)}, {self._dim}), got {vectors.shape}")
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
        valid = np.isfinite(norms) & (norms > 0)
        row_of_slot: dict[int, int] = {}
        invalid: list[str] = []
        applied = stale = 0
        for row, meta in enumerate(metas):
            product_id = meta.product_id
            if not valid[row]:
                invalid.append(product_id)
                continue
            slot = self._slots.get(product_id)
            if slot is None:
                seen = self._tombstones.get(product_id)
            else:
                live = self._metas[slot]
                assert live is not None  # a slot in _slots always holds its product's meta
                seen = live.version
            if seen is not None and meta.version <= seen:
                stale += 1
                continue
            if slot is None:
                slot = self._allocate_slot()
                self._slots[product_id] = slot
                self._tombstones.pop(product_id, None)
            self._metas[slot] = meta
            row_of_slot[slot] = row
            applied += 1
        if row_of_slot:
            self._write_rows(row_of_slot, metas, vectors, norms)
        return UpsertReport(applied, stale, tuple(invalid))

    def _write_rows(self, row_of_slot: dict[int, int], metas: Sequence[ProductMeta], vectors: np.ndarray, norms: np.ndarray) -> None:
        slots = np.fromiter(row_of_slot.keys(), dtype=np.intp, count=len(row_of_slot))
        rows = np.fromiter(row_of_slot.values(), dtype=np.intp, count=len(row_of_slot))
        unit = vectors[rows] / norms[rows].astype(np.float32)[:, None]
        if self._scales is not None:
            scales = np.max(np.abs(unit), axis=1).astype(np.float64) / 127.0
            quantised = np.clip(np.rint(unit / scales.astype(np.float32)[:, None]), -127, 127)
            self._matrix[slots] = to_offset_uint8(quantised)
            self._scales[slots] = scales
        else:
            self._matrix[slots] = unit
        chosen = [metas[r] for r in rows.tolist()]
        self._categories[slots] = [self._category_code(m.category) for m in chosen]
        self._prices[slots] = [np.nan if m.price is None else m.price for m in chosen]
        self._alive[slots] = True
        self._slot_ids[slots] = [m.product_id for m in chosen]

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

    def search(self, queries: np.ndarray, params: Sequence[Query]) -> list[list[tuple[Hit, ProductMeta]]]:
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
            mask = filter_mask(filters, self._categories[start:end], self._prices[start:end], self._category_codes)
            if mask is not None:
                mask &= alive
                if not mask.any():
                    continue
            elif not alive.all():
                mask = alive[None, :]
            topk.push(self._chunk_scores(queries, start, end), self._slot_ids[start:end], mask)
        return [[(hit, self._live_meta(self._slots[hit.product_id])) for hit in hits] for hits in topk.results()]

    def _live_meta(self, slot: int) -> ProductMeta:
        """The meta of a live slot (a slot in ``_slots``), which always has one."""
        meta = self._metas[slot]
        assert meta is not None, f"live slot {slot} has no meta"
        return meta

    def _chunk_scores(self, queries: np.ndarray, start: int, end: int) -> np.ndarray:
        chunk = self._matrix[start:end]
        scores: np.ndarray
        if self._dtype == "float32":
            scores = queries @ chunk.T
            return scores
        if self._dtype == "int8":
            assert self._int8 is not None and self._scales is not None  # both exist exactly for int8 storage
            scores = self._int8.scores(chunk, queries) * self._scales[start:end]
            return scores
        if self._buffer is None:
            self._buffer = np.empty((self._chunk_rows, self._dim), dtype=np.float32)
        buffer = self._buffer[: end - start]
        buffer[...] = chunk
        scores = queries @ buffer.T
        return scores

    def state(self) -> IndexState:
        """The index's content; arrays are views, valid until the next change."""
        used = self._high_water
        live = np.flatnonzero(self._alive[:used])
        metas = [self._live_meta(slot) for slot in live.tolist()]
        return IndexState(
            dim=self._dim,
            dtype=self._dtype,
            matrix=self._matrix[:used],
            scales=None if self._scales is None else self._scales[:used],
            categories=self._categories[:used],
            prices=self._prices[:used],
            category_names=list(self._category_codes),
            live_slots=live,
            ids=[m.product_id for m in metas],
            versions=np.fromiter((m.version for m in metas), dtype=np.int64, count=len(metas)),
            names=[m.name for m in metas],
            descriptions=[m.description for m in metas],
            tombstones=dict(self._tombstones),
        )

    def restore(self, state: IndexState) -> None:
        """Replace the whole content with ``state`` (of the same dim and dtype); ValueError if inconsistent.

        Takes over the state's matrix and scales without a copy when they own their memory
        (as freshly loaded arrays do), so a restore costs no second matrix.
        """
        used = state.matrix.shape[0]
        live = np.asarray(state.live_slots, dtype=np.intp)
        n = live.shape[0]
        if state.dim != self._dim or state.dtype != self._dtype:
            raise ValueError(f"state is {state.dtype}[{state.dim}], index is {self._dtype}[{self._dim}]")
        if state.matrix.shape != (used, self._dim) or state.matrix.dtype != self._matrix.dtype:
            raise ValueError(f"state matrix is {state.matrix.dtype}{state.matrix.shape}")
        per_slot = [state.categories, state.prices] + ([] if state.scales is None else [state.scales])
        if (state.scales is None) != (self._scales is None) or any(a.shape != (used,) for a in per_slot):
            raise ValueError("state per-slot arrays do not match its matrix")
        if not (len(state.ids) == len(state.names) == len(state.descriptions) == state.versions.shape[0] == n):
            raise ValueError("state per-product lists differ in length")
        if n and (live.min() < 0 or live.max() >= used or np.unique(live).shape[0] != n or len(set(state.ids)) != n):
            raise ValueError("state live slots or ids are not unique and in range")
        codes = np.asarray(state.categories, dtype=np.int32)
        if codes.shape[0] and (codes.min() < _NO_CATEGORY or codes.max() >= len(state.category_names)):
            raise ValueError("state category codes out of range")

        if used:
            self._reset(used, _owned(state.matrix), None if state.scales is None else _owned(state.scales))
        else:
            self._reset(1)
        self._categories[live] = codes[live]
        self._prices[live] = state.prices[live]
        self._alive[live] = True
        self._slot_ids[live] = state.ids
        self._high_water = used
        self._category_codes = {name: code for code, name in enumerate(state.category_names)}
        self._free = np.flatnonzero(~self._alive[:used])[::-1].tolist()
        prices = state.prices[live].tolist()
        for slot, pid, version, name, description, code, price in zip(
            live.tolist(),
            state.ids,
            state.versions.tolist(),
            state.names,
            state.descriptions,
            codes[live].tolist(),
            prices,
            strict=True,
        ):
            category = None if code == _NO_CATEGORY else state.category_names[code]
            self._metas[slot] = ProductMeta(pid, version, name, description, category, None if math.isnan(price) else price)
            self._slots[pid] = slot
        self._tombstones = dict(state.tombstones)

    def clear(self) -> None:
        """Forget every product and tombstone (capacity shrinks back to one slot)."""
        self._reset(1)

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

"""In-memory product feature matrix for the cached search mode.

Pure numpy/stdlib. Not thread-safe: callers serialise upserts, deletes and searches.

Longer than most modules (about 550 lines) on purpose: one data structure whose slot arrays
(features, scales, versions, tombstones, fields) must change together in every write, and
whose three storage dtypes share each code path; splitting it would spread that invariant.

Product fields are held compactly rather than as Python objects: version, category code and
price in per-slot arrays, name and description as UTF-8 in one byte array with per-slot
offsets. A ``ProductMeta`` is made only when asked for (``get``, search hits), so 100k products
cost a few MB of text instead of hundreds of bytes of objects each.
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
_WRITE_BLOCK_ROWS = 256
"""Rows normalised and quantised at a time: temporaries stay small, below glibc's mmap threshold once it has adapted,
so a bulk load leaves no heap fragments of per-call arrays behind."""
_MIN_TEXT_GARBAGE = 1 << 20
"""Bytes of superseded text tolerated before the text array is compacted (also: at most as many as are live)."""


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

    Per-slot arrays (``matrix``, ``scales``, ``categories``, ``prices``, ``versions``,
    ``text_starts``, ``name_bytes``, ``description_bytes``) cover slots ``[0, high_water)``;
    only the entries of ``live_slots`` mean anything. ``live_slots`` and ``ids`` are parallel,
    one entry per live product. A live slot's name is the UTF-8 ``text[start:start + name_bytes]``
    and its description the ``description_bytes`` after it. Arrays are views of the index when
    taken with ``FeatureIndex.state`` (copy or write them before the index changes).
    """

    dim: int
    dtype: StorageDType
    matrix: np.ndarray
    scales: np.ndarray | None
    categories: np.ndarray
    prices: np.ndarray
    versions: np.ndarray
    text_starts: np.ndarray
    name_bytes: np.ndarray
    description_bytes: np.ndarray
    text: np.ndarray
    category_names: list[str]
    live_slots: np.ndarray
    ids: list[str]
    tombstones: dict[str, int]


def _decode(raw: bytes) -> str:
    """Text written by ``FeatureIndex._write_text`` (lone surrogates kept); anything else undecodable is replaced."""
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace")


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
        "_category_names",
        "_chunk_rows",
        "_description_bytes",
        "_dim",
        "_dtype",
        "_free",
        "_high_water",
        "_int8",
        "_matrix",
        "_name_bytes",
        "_prices",
        "_scales",
        "_slot_ids",
        "_slots",
        "_text",
        "_text_live",
        "_text_starts",
        "_text_used",
        "_tombstones",
        "_versions",
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
        self._versions = np.zeros(capacity, dtype=np.int64)
        self._text_starts = np.zeros(capacity, dtype=np.int64)
        self._name_bytes = np.zeros(capacity, dtype=np.int32)
        self._description_bytes = np.zeros(capacity, dtype=np.int32)
        self._text = np.empty(0, dtype=np.uint8)
        self._text_used = 0
        self._text_live = 0
        self._slots: dict[str, int] = {}
        self._tombstones: dict[str, int] = {}
        self._free: list[int] = []
        self._high_water = 0
        self._category_codes: dict[str, int] = {}
        self._category_names: list[str] = []

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
        """Bytes of the matrix, int8 scales, per-slot field arrays and the product text array.

        Excludes Python objects (id strings, dicts) and the search scratch buffer
        (chunk_rows x dim float32, only for float16/int8).
        """
        arrays = (
            self._matrix,
            self._categories,
            self._prices,
            self._alive,
            self._slot_ids,
            self._versions,
            self._text_starts,
            self._name_bytes,
            self._description_bytes,
            self._text,
        )
        total = sum(a.nbytes for a in arrays)
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
        """The live product's fields (a new object on every call), or None if absent or deleted."""
        slot = self._slots.get(product_id)
        return None if slot is None else self._metas([slot])[0]

    def version_of(self, product_id: str) -> int | None:
        """Version of the live product, or None if absent or deleted."""
        slot = self._slots.get(product_id)
        return None if slot is None else int(self._versions[slot])

    def _metas(self, slots: list[int]) -> list[ProductMeta]:
        """The fields of live slots, decoded from the per-slot arrays and the text array."""
        at = np.asarray(slots, dtype=np.intp)
        starts = self._text_starts[at]
        splits = starts + self._name_bytes[at]
        ends = splits + self._description_bytes[at]
        text = self._text.data
        names = self._category_names
        return [
            ProductMeta(
                product_id,
                version,
                _decode(bytes(text[start:split])),
                _decode(bytes(text[split:end])),
                None if code == _NO_CATEGORY else names[code],
                None if math.isnan(price) else price,
            )
            for product_id, version, start, split, end, code, price in zip(
                self._slot_ids[at].tolist(),
                self._versions[at].tolist(),
                starts.tolist(),
                splits.tolist(),
                ends.tolist(),
                self._categories[at].tolist(),
                self._prices[at].tolist(),
                strict=True,
            )
        ]

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
        Memory: temporaries of at most ``_WRITE_BLOCK_ROWS`` rows at a time, whatever the batch size.
        """
        vectors = np.asarray(features, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(metas), self._dim):
            raise ValueError(f"features must have shape ({len(metas)}, {self._dim}), got {vectors.shape}")
        norms = np.empty(len(metas), dtype=np.float64)
        for start in range(0, len(metas), _WRITE_BLOCK_ROWS):
            block = vectors[start : start + _WRITE_BLOCK_ROWS]
            norms[start : start + len(block)] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
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
                pending = row_of_slot.get(slot)
                seen = int(self._versions[slot]) if pending is None else metas[pending].version
            if seen is not None and meta.version <= seen:
                stale += 1
                continue
            if slot is None:
                slot = self._allocate_slot()
                self._slots[product_id] = slot
                self._tombstones.pop(product_id, None)
            row_of_slot[slot] = row
            applied += 1
        if row_of_slot:
            self._write_rows(row_of_slot, metas, vectors, norms)
        return UpsertReport(applied, stale, tuple(invalid))

    def _write_rows(self, row_of_slot: dict[int, int], metas: Sequence[ProductMeta], vectors: np.ndarray, norms: np.ndarray) -> None:
        slots = np.fromiter(row_of_slot.keys(), dtype=np.intp, count=len(row_of_slot))
        rows = np.fromiter(row_of_slot.values(), dtype=np.intp, count=len(row_of_slot))
        for start in range(0, len(rows), _WRITE_BLOCK_ROWS):
            block_rows, block_slots = rows[start : start + _WRITE_BLOCK_ROWS], slots[start : start + _WRITE_BLOCK_ROWS]
            unit = vectors[block_rows] / norms[block_rows].astype(np.float32)[:, None]
            if self._scales is not None:
                scales = np.max(np.abs(unit), axis=1).astype(np.float64) / 127.0
                quantised = np.clip(np.rint(unit / scales.astype(np.float32)[:, None]), -127, 127)
                self._matrix[block_slots] = to_offset_uint8(quantised)
                self._scales[block_slots] = scales
            else:
                self._matrix[block_slots] = unit
        chosen = [metas[r] for r in rows.tolist()]
        self._categories[slots] = [self._category_code(m.category) for m in chosen]
        self._prices[slots] = [np.nan if m.price is None else m.price for m in chosen]
        self._versions[slots] = [m.version for m in chosen]
        self._alive[slots] = True
        self._slot_ids[slots] = [m.product_id for m in chosen]
        self._write_text(slots, chosen)

    def _write_text(self, slots: np.ndarray, chosen: list[ProductMeta]) -> None:
        """Append the names and descriptions of ``chosen`` to the text array for ``slots``; their previous text becomes garbage."""
        names = [m.name.encode("utf-8", "surrogatepass") for m in chosen]
        descriptions = [m.description.encode("utf-8", "surrogatepass") for m in chosen]
        name_bytes = np.fromiter(map(len, names), dtype=np.int64, count=len(names))
        description_bytes = np.fromiter(map(len, descriptions), dtype=np.int64, count=len(descriptions))
        sizes = name_bytes + description_bytes
        blob = b"".join(part for pair in zip(names, descriptions, strict=True) for part in pair)
        self._text_live -= int(self._name_bytes[slots].sum(dtype=np.int64) + self._description_bytes[slots].sum(dtype=np.int64))
        self._reserve_text(len(blob))
        start = self._text_used
        self._text[start : start + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
        self._text_starts[slots] = start + np.cumsum(sizes) - sizes
        self._name_bytes[slots] = name_bytes
        self._description_bytes[slots] = description_bytes
        self._text_used += len(blob)
        self._text_live += len(blob)
        self._compact_text_if_sparse()

    def _reserve_text(self, extra: int) -> None:
        needed = self._text_used + extra
        if needed > self._text.shape[0]:
            grown = np.empty(max(needed, int(self._text.shape[0] * _GROWTH)), dtype=np.uint8)
            grown[: self._text_used] = self._text[: self._text_used]
            self._text = grown

    def _compact_text_if_sparse(self) -> None:
        """Rewrite the text array with live text only once superseded text outweighs it (and ``_MIN_TEXT_GARBAGE``)."""
        if self._text_used - self._text_live <= max(self._text_live, _MIN_TEXT_GARBAGE):
            return
        live = np.flatnonzero(self._alive[: self._high_water])
        starts = self._text_starts[live]
        sizes = self._name_bytes[live].astype(np.int64) + self._description_bytes[live]
        view = self._text.data
        blob = b"".join([view[s : s + n] for s, n in zip(starts.tolist(), sizes.tolist(), strict=True)])
        self._text = np.frombuffer(blob, dtype=np.uint8).copy()
        del blob
        self._text_starts[live] = np.cumsum(sizes) - sizes
        self._text_used = self._text_live = self._text.shape[0]

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
        live_version = int(self._versions[slot])
        if version is not None and version < live_version:
            return False
        del self._slots[product_id]
        self._tombstones[product_id] = live_version if version is None else version
        self._alive[slot] = False
        self._slot_ids[slot] = None
        self._categories[slot] = _NO_CATEGORY
        self._prices[slot] = np.nan
        self._text_live -= int(self._name_bytes[slot]) + int(self._description_bytes[slot])
        self._name_bytes[slot] = self._description_bytes[slot] = 0
        self._free.append(slot)
        self._compact_text_if_sparse()
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
        results = topk.results()
        metas = iter(self._metas([self._slots[hit.product_id] for hits in results for hit in hits]))
        return [[(hit, next(metas)) for hit in hits] for hits in results]

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
        return IndexState(
            dim=self._dim,
            dtype=self._dtype,
            matrix=self._matrix[:used],
            scales=None if self._scales is None else self._scales[:used],
            categories=self._categories[:used],
            prices=self._prices[:used],
            versions=self._versions[:used],
            text_starts=self._text_starts[:used],
            name_bytes=self._name_bytes[:used],
            description_bytes=self._description_bytes[:used],
            text=self._text[: self._text_used],
            category_names=list(self._category_names),
            live_slots=live,
            ids=self._slot_ids[live].tolist(),
            tombstones=dict(self._tombstones),
        )

    def restore(self, state: IndexState) -> None:
        """Replace the whole content with ``state`` (of the same dim and dtype); ValueError if inconsistent.

        Takes over the state's matrix, scales and text without a copy when they own their memory
        (as freshly loaded arrays do), so a restore costs no second matrix. Text is checked to lie
        within ``state.text``; it is decoded (invalid UTF-8 replaced) only when a product is read.
        """
        used = state.matrix.shape[0]
        live = np.asarray(state.live_slots, dtype=np.intp)
        n = live.shape[0]
        if state.dim != self._dim or state.dtype != self._dtype:
            raise ValueError(f"state is {state.dtype}[{state.dim}], index is {self._dtype}[{self._dim}]")
        if state.matrix.shape != (used, self._dim) or state.matrix.dtype != self._matrix.dtype:
            raise ValueError(f"state matrix is {state.matrix.dtype}{state.matrix.shape}")
        per_slot = [state.categories, state.prices, state.versions, state.text_starts, state.name_bytes, state.description_bytes]
        per_slot += [] if state.scales is None else [state.scales]
        if (state.scales is None) != (self._scales is None) or any(a.shape != (used,) for a in per_slot):
            raise ValueError("state per-slot arrays do not match its matrix")
        if len(state.ids) != n:
            raise ValueError("state ids and live slots differ in length")
        if n and (live.min() < 0 or live.max() >= used or np.unique(live).shape[0] != n or len(set(state.ids)) != n):
            raise ValueError("state live slots or ids are not unique and in range")
        codes = np.asarray(state.categories, dtype=np.int32)
        if codes.shape[0] and (codes.min() < _NO_CATEGORY or codes.max() >= len(state.category_names)):
            raise ValueError("state category codes out of range")
        text = np.asarray(state.text)
        starts = np.asarray(state.text_starts, dtype=np.int64)[live]
        name_bytes = np.asarray(state.name_bytes, dtype=np.int64)[live]
        description_bytes = np.asarray(state.description_bytes, dtype=np.int64)[live]
        if text.dtype != np.uint8 or text.ndim != 1:
            raise ValueError(f"state text is {text.dtype}{text.shape}, not bytes")
        if n and (starts.min() < 0 or name_bytes.min() < 0 or description_bytes.min() < 0):
            raise ValueError("state text offsets are negative")
        if n and (starts + name_bytes + description_bytes).max() > text.shape[0]:
            raise ValueError("state text offsets lie beyond its text")

        if used:
            self._reset(used, _owned(state.matrix), None if state.scales is None else _owned(state.scales))
        else:
            self._reset(1)
        self._categories[live] = codes[live]
        self._prices[live] = state.prices[live]
        self._versions[live] = state.versions[live]
        self._text_starts[live] = starts
        self._name_bytes[live] = name_bytes
        self._description_bytes[live] = description_bytes
        self._alive[live] = True
        self._slot_ids[live] = state.ids
        self._high_water = used
        self._category_names = list(state.category_names)
        self._category_codes = {name: code for code, name in enumerate(self._category_names)}
        self._free = np.flatnonzero(~self._alive[:used])[::-1].tolist()
        self._slots = dict(zip(state.ids, live.tolist(), strict=True))
        self._tombstones = dict(state.tombstones)
        self._text = _owned(text)
        self._text_used = text.shape[0]
        self._text_live = int(name_bytes.sum() + description_bytes.sum())
        self._compact_text_if_sparse()

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
        self._versions = grown(self._versions, 0)
        self._text_starts = grown(self._text_starts, 0)
        self._name_bytes = grown(self._name_bytes, 0)
        self._description_bytes = grown(self._description_bytes, 0)

    def _category_code(self, category: str | None) -> int:
        if category is None:
            return _NO_CATEGORY
        code = self._category_codes.get(category)
        if code is None:
            code = len(self._category_names)
            self._category_codes[category] = code
            self._category_names.append(category)
        return code

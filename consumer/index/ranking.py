"""Query parameters, filters and an exact streaming top-k shared by every search mode.

Pure numpy/stdlib. Ranking order everywhere is score descending, then product_id
ascending, so the result of a search is a function of (scores, ids) only and does
not depend on how the products were split into chunks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Hit", "Query", "RunningTopK", "SearchFilter", "filter_mask"]

# Lowest admissible score: excludes NaN and -inf, admits every finite score.
_LOWEST = -np.finfo(np.float64).max


@dataclass(frozen=True, slots=True)
class SearchFilter:
    """Conjunctive product filter; a field left as None imposes no constraint.

    Category matches by exact string equality. Price bounds are inclusive, and a
    product with an unknown price (None or NaN) never satisfies a price bound.
    """

    category: str | None = None
    min_price: float | None = None
    max_price: float | None = None

    @property
    def is_empty(self) -> bool:
        """True when the filter admits every product."""
        return self.category is None and self.min_price is None and self.max_price is None

    def matches(self, category: str | None, price: float | None) -> bool:
        """Whether a product with this category and price passes the filter."""
        if self.category is not None and category != self.category:
            return False
        if self.min_price is None and self.max_price is None:
            return True
        if price is None or math.isnan(price):
            return False
        if self.min_price is not None and not price >= self.min_price:
            return False
        return self.max_price is None or price <= self.max_price


@dataclass(frozen=True, slots=True)
class Query:
    """Per-query search parameters.

    top_k >= 1 results at most; with a threshold only scores >= threshold are
    returned; with a filter only products that match it.
    """

    top_k: int
    threshold: float | None = None
    filter: SearchFilter | None = None

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


@dataclass(frozen=True, slots=True)
class Hit:
    """One ranked result."""

    product_id: str
    score: float


def _sort_key(entry: tuple[float, str]) -> tuple[float, str]:
    return (-entry[0], entry[1])


class RunningTopK:
    """Exact top-k per query over scores pushed in chunks of products.

    After any sequence of pushes, results() equals the top-k (score desc, id asc)
    of the union of all admissible entries pushed so far, whatever the chunking.
    An entry is admissible when its mask value is True, its score is not NaN or
    -inf, and its score is >= the query's threshold (if any). Product ids are
    assumed unique across pushes.
    """

    __slots__ = ("_best", "_k", "_threshold")

    def __init__(self, queries: Sequence[Query]) -> None:
        self._k = [q.top_k for q in queries]
        self._threshold = np.array(
            [_LOWEST if q.threshold is None else max(float(q.threshold), _LOWEST) for q in queries],
            dtype=np.float64,
        )
        self._best: list[list[tuple[float, str]]] = [[] for _ in queries]

    def __len__(self) -> int:
        return len(self._k)

    def _lower_bounds(self) -> np.ndarray:
        """Per-query minimum score that could still enter the current top-k."""
        lower = self._threshold.copy()
        for r, best in enumerate(self._best):
            if len(best) == self._k[r] and best[-1][0] > lower[r]:
                lower[r] = best[-1][0]
        return lower

    def push(self, scores: np.ndarray, ids: Sequence[str] | np.ndarray, mask: np.ndarray | None = None) -> None:
        """Merge a chunk: scores [q, n], ids of the n columns, optional admissible mask.

        mask may be any boolean array broadcastable to [q, n] (e.g. [1, n]).
        The arrays are not retained, so callers may reuse their buffers.
        """
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape[0] != len(self._k):
            raise ValueError(f"scores must have shape ({len(self._k)}, n), got {scores.shape}")
        n = scores.shape[1]
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} ids for {n} score columns")
        if n == 0 or not self._k:
            return
        keep = scores >= self._lower_bounds()[:, None]
        if mask is not None:
            keep &= mask
        counts = np.count_nonzero(keep, axis=1)
        for r in np.flatnonzero(counts).tolist():
            k = self._k[r]
            row = scores[r]
            idx = np.flatnonzero(keep[r]) if counts[r] <= k else _select_topk(np.where(keep[r], row, -np.inf), k, ids)
            values = row[idx].tolist()
            fresh = [(values[j], ids[i]) for j, i in enumerate(idx.tolist())]
            merged = self._best[r] + fresh
            merged.sort(key=_sort_key)
            del merged[k:]
            self._best[r] = merged

    def results(self) -> list[list[Hit]]:
        """Current top-k per query, score descending then product_id ascending."""
        return [[Hit(pid, score) for score, pid in best] for best in self._best]


def _select_topk(row: np.ndarray, k: int, ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Indices of the k best entries of row (ties at the boundary broken by id asc).

    row has excluded entries set to -inf and more than k admissible entries.
    """
    n = row.shape[0]
    part = np.argpartition(row, n - k)
    top = part[n - k :]
    kth = row[part[n - k]]
    greater = top[row[top] > kth]
    need = k - greater.shape[0]
    tied = np.flatnonzero(row == kth)
    if tied.shape[0] > need:
        tied = np.array(sorted(tied.tolist(), key=lambda i: ids[i])[:need], dtype=np.intp)
    return np.concatenate((greater, tied))


def filter_mask(
    filters: Sequence[SearchFilter | None],
    categories: np.ndarray,
    prices: np.ndarray,
    category_codes: Mapping[str, int] | None = None,
) -> np.ndarray | None:
    """Admissible mask [q, n] for q filters over n products; None if no query filters.

    categories holds either category strings/None (object array) or integer codes,
    in which case category_codes maps a filter's category string to its code (a
    category absent from it matches nothing). prices is float with NaN = unknown.
    Row r equals [filters[r].matches(category_j, price_j) for j in range(n)].
    """
    if all(f is None or f.is_empty for f in filters):
        return None
    categories = np.asarray(categories)
    prices = np.asarray(prices)
    n = categories.shape[0]
    if prices.shape != (n,):
        raise ValueError(f"prices shape {prices.shape} does not match {n} categories")
    coded = categories.dtype.kind in "iu"
    if coded and category_codes is None:
        raise ValueError("integer category codes need category_codes")
    codes = category_codes if coded else None
    out = np.ones((len(filters), n), dtype=bool)
    rows: dict[SearchFilter, np.ndarray] = {}
    for r, f in enumerate(filters):
        if f is None or f.is_empty:
            continue
        row = rows.get(f)
        if row is None:
            row = out[r]
            if f.category is not None:
                if codes is not None:
                    code = codes.get(f.category)
                    if code is None:
                        row[:] = False
                    else:
                        row &= categories == code
                else:
                    row &= categories == f.category
            if f.min_price is not None:
                row &= prices >= f.min_price
            if f.max_price is not None:
                row &= prices <= f.max_price
            rows[f] = row
        else:
            out[r] = row
    return out

"""A batch of valid product updates to one ``ProductOutcome`` each: applied, stale or error.

Newest version wins: updates not newer than what is held are skipped before any encoding; the
rest are encoded (image if present, else ``product_text``) and applied store first (the durable
copy), then index. A bad image is that update's ``error`` outcome (it is dead-lettered), never an
exception. Nothing here knows about Kafka.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from consumer.domain.errors import InputError
from consumer.encoder.encoder import Encoder
from consumer.encoder.images import ImageLimits, pixels_from_base64
from consumer.index.feature_index import FeatureIndex, ProductMeta
from consumer.pipeline.encoding import encode_rows
from consumer.pipeline.image_batches import DEFAULT_CHUNK, DEFAULT_DECODE_THREADS, encode_images, image_pool
from schemas import ProductUpdated

APPLY_CONCURRENCY = 8
"""Store deletes in flight at once while a batch is applied (upserts go in one bulk write per round)."""


def product_text(update: ProductUpdated) -> str:
    """The text a product is encoded from when it has no image: name and description joined by '. '."""
    parts = [p.strip() for p in (update.name, update.description) if p and p.strip()]
    return ". ".join(parts)


def _image_bytes(update: ProductUpdated) -> bytes | None:
    return base64.b64decode(update.image_b64) if update.image_b64 else None


def product_meta(update: ProductUpdated) -> ProductMeta:
    """What search replies render for the product, as of this update."""
    return ProductMeta(update.product_id, update.version, update.name, update.description, update.category, update.price)


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


RowsDone = Callable[[list[tuple[int, "np.ndarray | InputError"]]], Awaitable[None]]


class ProductStoreLike(Protocol):
    async def upsert_many(
        self, items: Sequence[tuple[ProductMeta, np.ndarray]], model_id: str, images: Sequence[bytes | None] | None = None
    ) -> list[bool]: ...

    async def delete(self, product_id: str, version: int) -> bool: ...

    async def get_versions(self, ids: Sequence[str]) -> dict[str, tuple[int, str | None, bool]]: ...


class ProductHandler:
    """Encodes product updates (image if present, else text) and applies them, newest version wins.

    Held versions come from the store when there is one (so restarts and other replicas
    skip re-encoding), else from the index. A stored feature made by another model id
    counts as not held, so the product is re-encoded rather than mixed in. ``before_apply``
    gets each run of encoded outcomes before any of them is stored (the ingest role publishes
    the features there, so a crash in between re-encodes rather than loses an update).
    ``on_encoded(input, n)`` is told of every ``n`` products encoded from ``input`` ("text" or "image").
    Images are decoded on ``decode_threads`` threads and encoded on one more, all at nice ``image_nice``.
    """

    def __init__(
        self,
        encoder: Encoder,
        index: FeatureIndex | None,
        image_limits: ImageLimits,
        store: ProductStoreLike | None = None,
        before_apply: Callable[[list[ProductOutcome]], Awaitable[None]] | None = None,
        on_encoded: Callable[[str, int], None] | None = None,
        decode_threads: int = DEFAULT_DECODE_THREADS,
        image_chunk: int = DEFAULT_CHUNK,
        image_nice: int = 0,
    ) -> None:
        self.encoder = encoder
        self.index = index
        self.store = store
        self.image_limits = image_limits
        self.before_apply = before_apply
        self.on_encoded = on_encoded
        self.decode_threads = decode_threads
        self.image_nice = image_nice
        self.image_chunk = image_chunk
        self._decoder: ThreadPoolExecutor | None = None
        self._image_encoder: ThreadPoolExecutor | None = None
        self.encoded_images = 0
        """Images encoded so far: the service returns freed heap to the OS after a batch that had any."""

    async def held_versions(self, updates: Sequence[ProductUpdated]) -> dict[str, int]:
        ids = list({u.product_id for u in updates})
        if self.store is not None:
            stored = await self.store.get_versions(ids)
            return {pid: v for pid, (v, model, deleted) in stored.items() if deleted or model == self.encoder.model_id}
        if self.index is None:
            return {}
        return {pid: v for pid in ids if (v := self.index.version_of(pid)) is not None}

    async def encode(self, updates: Sequence[ProductUpdated], on_rows: RowsDone | None = None) -> list[np.ndarray | InputError | None]:
        """Feature per update (None for deletes); image decode errors are returned, not raised.

        Texts are encoded in one batched call; images go through ``image_batches.encode_images``
        (decoded in parallel on this handler's decode threads, overlapped with encoding, in chunks).
        ``on_rows`` is told the ``(row, feature or InputError)`` of the texts, then of each image
        chunk, as soon as they exist; the next chunk's encode waits for it to return.
        """
        out: list[np.ndarray | InputError | None] = [None] * len(updates)
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, str]] = []
        for i, u in enumerate(updates):
            if u.deleted:
                continue
            if u.image_b64:
                images.append((i, u.image_b64))
            else:
                texts.append((i, product_text(u)))
        text_rows: list[tuple[int, np.ndarray | InputError]] = list(await encode_rows(self.encoder, texts, []))
        for i, vec in text_rows:
            out[i] = vec
        if on_rows is not None and text_rows:
            await on_rows(text_rows)
        encoded_images = 0
        if images:
            limits, preprocess = self.image_limits, self.encoder.preprocess
            decoded = await encode_images(
                self.encoder,
                images,
                lambda data: pixels_from_base64(data, limits, preprocess),
                self._decode_executor(),
                self.image_chunk,
                on_rows,
                self._encode_executor(),
            )
            for i, result in decoded:
                out[i] = result
                encoded_images += not isinstance(result, InputError)
        self.encoded_images += encoded_images
        if self.on_encoded is not None:
            for kind, n in (("text", len(texts)), ("image", encoded_images)):
                if n:
                    self.on_encoded(kind, n)
        return out

    def _decode_executor(self) -> Executor:
        if self._decoder is None:
            self._decoder = image_pool(self.decode_threads, self.image_nice)
        return self._decoder

    def _encode_executor(self) -> Executor:
        if self._image_encoder is None:
            self._image_encoder = image_pool(1, self.image_nice)
        return self._image_encoder

    async def handle(self, updates: Sequence[ProductUpdated]) -> list[ProductOutcome]:
        """One outcome per update, in order; stale updates are skipped before any encoding.

        Encoded updates are applied (``before_apply``, then ``apply_all``) in batch order, one
        unbroken run of settled updates at a time, while later images are still being encoded:
        a chunk's publish and store writes overlap the next chunk's encode. The first failure of
        an apply stops the encoding and is raised; applies still running are cancelled.
        """
        held = await self.held_versions(updates)
        todo = [i for i, u in enumerate(updates) if u.version > held.get(u.product_id, -1)]
        steps = _InOrderApply(self, len(updates))
        queued = set(todo)
        for i, u in enumerate(updates):
            if i not in queued:
                steps.settle(i, ProductOutcome(u, "stale"))
            elif u.deleted:
                steps.settle(i, ProductOutcome(u, "encoded"))

        async def settle(rows: list[tuple[int, np.ndarray | InputError]]) -> None:
            for row, feature in rows:
                u = updates[todo[row]]
                if isinstance(feature, InputError):
                    steps.settle(todo[row], ProductOutcome(u, "error", error=feature))
                else:
                    steps.settle(todo[row], ProductOutcome(u, "encoded", feature=feature))
            steps.advance()

        try:
            steps.advance()
            await self.encode([updates[i] for i in todo], settle)
            return await steps.finish()
        finally:
            await steps.abort()

    async def apply_all(self, items: Sequence[tuple[ProductUpdated, np.ndarray | None]]) -> list[bool]:
        """Whether each item was applied, store first (the durable copy), then index; False when a same-or-newer
        version is held.

        Items go in rounds: round r holds the r-th item of every product, so one product's
        items are applied in their order. A round's upserts are one bulk store write (one
        round trip carrying their images) and its deletes run concurrently (at most
        ``APPLY_CONCURRENCY``); the index follows for what the store applied. The first
        failure cancels the round's other writes and is raised; later rounds do not start.
        """
        results = [False] * len(items)
        rounds: list[list[int]] = []
        seen: dict[str, int] = {}
        for i, (update, _) in enumerate(items):
            r = seen.get(update.product_id, 0)
            seen[update.product_id] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)
        for rows in rounds:
            stored = await self._store_round([items[i] for i in rows])
            for i, ok in zip(rows, stored, strict=True):
                results[i] = ok and self._apply_to_index(*items[i])
        return results

    async def _store_round(self, items: Sequence[tuple[ProductUpdated, np.ndarray | None]]) -> list[bool]:
        """Store writes of items of distinct products; all True without a store."""
        if self.store is None:
            return [True] * len(items)
        store = self.store
        results = [False] * len(items)
        upserts = [i for i, (u, _) in enumerate(items) if not u.deleted]
        deletes = [i for i, (u, _) in enumerate(items) if u.deleted]
        slots = asyncio.Semaphore(APPLY_CONCURRENCY)

        async def delete(i: int) -> None:
            async with slots:
                results[i] = await store.delete(items[i][0].product_id, items[i][0].version)

        async def upsert_all() -> None:
            rows = []
            for i in upserts:
                update, feature = items[i]
                assert feature is not None  # only deletes have no feature (``encode``)
                rows.append((product_meta(update), feature))
            images = [_image_bytes(items[i][0]) for i in upserts]
            for i, ok in zip(upserts, await store.upsert_many(rows, self.encoder.model_id, images), strict=True):
                results[i] = ok

        tasks = [asyncio.ensure_future(delete(i)) for i in deletes]
        if upserts:
            tasks.append(asyncio.ensure_future(upsert_all()))
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return results

    def _apply_to_index(self, update: ProductUpdated, feature: np.ndarray | None) -> bool:
        if self.index is None:
            return True
        if update.deleted:
            return self.index.delete(update.product_id, update.version)
        assert feature is not None  # only deletes have no feature (``encode``)
        return self.index.upsert(product_meta(update), feature)


class _InOrderApply:
    """A batch's apply steps, in batch order, started while later rows are still being encoded.

    ``settle`` records a row's outcome; ``advance`` hands the rows settled since the last step,
    up to the first unsettled one, to a new step (``before_apply`` then ``apply_all`` of its
    encoded outcomes) that runs after the previous step. So features are published and stored
    in batch order, product by product, whatever the chunking.
    """

    def __init__(self, handler: ProductHandler, size: int) -> None:
        self.handler = handler
        self.outcomes: list[ProductOutcome | None] = [None] * size
        self.applied: dict[int, bool] = {}
        self._next = 0
        self._last: asyncio.Future[None] | None = None

    def settle(self, row: int, outcome: ProductOutcome) -> None:
        self.outcomes[row] = outcome

    def advance(self) -> None:
        """Start a step for the newly settled prefix; raises the error of a step that already failed."""
        if self._last is not None and self._last.done() and not self._last.cancelled() and (exc := self._last.exception()):
            raise exc
        start = self._next
        while self._next < len(self.outcomes) and self.outcomes[self._next] is not None:
            self._next += 1
        rows = [i for i in range(start, self._next) if self._outcome(i).status == "encoded"]
        if rows:
            self._last = asyncio.ensure_future(self._step(self._last, rows))

    def _outcome(self, row: int) -> ProductOutcome:
        outcome = self.outcomes[row]
        assert outcome is not None  # rows before ``_next`` are settled
        return outcome

    async def _step(self, previous: asyncio.Future[None] | None, rows: list[int]) -> None:
        if previous is not None:
            await previous
        encoded = [self._outcome(i) for i in rows]
        if self.handler.before_apply is not None:
            await self.handler.before_apply(encoded)
        applied = await self.handler.apply_all([(o.update, o.feature) for o in encoded])
        self.applied.update(zip(rows, applied, strict=True))

    async def finish(self) -> list[ProductOutcome]:
        """Wait for every step; the final outcome per row (``applied`` or ``stale`` for the encoded ones)."""
        if self._last is not None:
            await self._last
        out = []
        for row in range(len(self.outcomes)):
            o = self._outcome(row)
            out.append(
                ProductOutcome(o.update, "applied" if self.applied[row] else "stale", feature=o.feature) if o.status == "encoded" else o
            )
        return out

    async def abort(self) -> None:
        """Cancel a step still running (and, through it, the ones it waits for); no-op once finished."""
        if self._last is not None and not self._last.done():
            self._last.cancel()
            await asyncio.gather(self._last, return_exceptions=True)

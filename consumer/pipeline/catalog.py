"""Bringing a replica's catalog up to date at start, from the store (no Kafka)."""

from __future__ import annotations

import base64
import logging

from consumer.index.feature_index import FeatureIndex
from consumer.ops.memory import release_memory
from consumer.pipeline.products import ProductHandler
from consumer.store.product_store import ProductStore
from schemas import ProductUpdated

log = logging.getLogger(__name__)


async def reencode_other_models(store: ProductStore, products: ProductHandler, model_id: str, chunk: int = 64) -> int:
    """Re-encode, with ``model_id``, the products stored by another model id (same version); returns how many.

    Features of different models are never mixed. Streamed in chunks of ``chunk`` products, so memory
    stays bounded whatever the catalog size.
    """
    pending: list[ProductUpdated] = []
    done = 0

    async def flush() -> None:
        nonlocal done
        failed = [o for o in await products.handle(pending) if o.status == "error"]
        if failed:
            log.warning("could not re-encode %d stored products: %s", len(failed), failed[0].error)
        done += len(pending)
        pending.clear()

    async for meta, image in store.iter_stale_model_products(model_id):
        image_b64 = base64.b64encode(image).decode() if image else None
        pending.append(
            ProductUpdated(
                product_id=meta.product_id,
                version=meta.version,
                name=meta.name,
                description=meta.description,
                category=meta.category,
                price=meta.price,
                image_b64=image_b64,
            )
        )
        if len(pending) >= chunk:
            await flush()
    if pending:
        await flush()
    if done:
        log.info("re-encoded %d products stored by another model", done)
    return done


async def fill_index_from_store(store: ProductStore, index: FeatureIndex, model_id: str) -> int:
    """Cached mode start: load every product stored with ``model_id`` into ``index``; nothing is re-encoded."""
    index.reserve(len(index) + await store.count(model_id))
    loaded = 0
    invalid: list[str] = []
    async for metas, features in store.iter_product_chunks(model_id):
        report = index.upsert_many(metas, features)
        loaded += report.applied
        invalid.extend(report.invalid)
    if invalid:
        log.warning("%d stored features have a zero or non-finite norm and were not indexed, e.g. %r", len(invalid), invalid[0])
    release_memory()
    log.info("filled the feature index from the store: %d products", loaded)
    return loaded

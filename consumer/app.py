"""Wiring: settings -> encoder, feature index, service; signal handling; ``main``."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

from consumer.config import Role, Settings, load_settings
from consumer.encoder import Encoder, TorchBackend
from consumer.feature_index import FeatureIndex
from consumer.model_builder import is_random_model
from consumer.service import Service

log = logging.getLogger("consumer")


def model_config(model: str) -> dict:
    """The model's ``config.json`` without importing torch: a local directory, or one small hub download."""
    local = Path(model) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(model, "config.json")).read_text())


def embedding_dim(model: str) -> int:
    return int(model_config(model)["projection_dim"])


def build_encoder(settings: Settings) -> Encoder:
    return Encoder(
        TorchBackend(settings.clip_model, settings.torch_num_threads),
        model_id=settings.clip_model,
        random_weights=is_random_model(settings.clip_model),
    )


def build_store(settings: Settings):
    """The product store when ``MONGODB_URI`` is set, else None (pymongo is imported only then)."""
    if not settings.mongodb_uri:
        return None
    from pymongo import AsyncMongoClient

    from consumer.store import ProductStore

    client = AsyncMongoClient(settings.mongodb_uri, appname=settings.kafka_client_id)
    return ProductStore(client, settings.mongodb_database, settings.mongodb_collection)


def build_service(settings: Settings, encoder: Encoder | None = None) -> Service:
    """A service for ``settings``; tests pass their own ``encoder`` to observe loads."""
    encoder = encoder or build_encoder(settings)
    index = None
    if settings.cache_products and settings.role is not Role.INGEST:
        index = FeatureIndex(dim=embedding_dim(settings.clip_model), dtype=settings.feature_dtype)
    return Service(settings, encoder, index, store=build_store(settings))


async def serve(settings: Settings) -> None:
    """Run one replica until SIGTERM/SIGINT, then finish the batch in flight, commit and close."""
    service = build_service(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    await service.start()
    try:
        await service.run()
    finally:
        await service.close()
        if service.store is not None:
            await service.store.close()
        log.info("stopped after %d batches", service.batches)


def main() -> None:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(settings))

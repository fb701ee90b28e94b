"""Wiring: settings -> encoder, feature index, service; signal handling; ``main``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import signal
from pathlib import Path

from consumer.config import Role, Settings, load_settings
from consumer.encoder import Encoder, TorchBackend
from consumer.feature_index import FeatureIndex
from consumer.health import HealthServer
from consumer.model_builder import is_random_model
from consumer.security import StartupError, log_effective_config, mongo_client
from consumer.service import Service

log = logging.getLogger("consumer")


def model_config(model: str) -> dict:
    """The model's ``config.json`` without importing torch: a local directory, or one small hub download."""
    local = Path(model) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(model, "config.json")).read_text())  # nosec B615  # CLIP_MODEL is operator configuration; pin it with a local snapshot directory (README: Security)


def embedding_dim(model: str) -> int:
    return int(model_config(model)["projection_dim"])


def onnx_dir_for(settings: Settings) -> Path:
    """Where the ONNX export of ``CLIP_MODEL`` lives: ``ONNX_DIR``, else a per-model folder in ``MODEL_CACHE_DIR``."""
    if settings.onnx_dir:
        return Path(settings.onnx_dir)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.clip_model.strip("/"))[-60:]
    digest = hashlib.sha256(settings.clip_model.encode()).hexdigest()[:8]
    return Path(settings.model_cache_dir).expanduser() / "onnx" / f"{slug}-{digest}-{settings.onnx_quantize}"


def build_encoder(settings: Settings) -> Encoder:
    """The encoder for ``ENCODER_BACKEND``; for onnx, exports ``CLIP_MODEL`` once in a child process if needed.

    The model id recorded with every stored feature names the backend's precision, so features
    of different precisions are never mixed (switching re-encodes the catalog).
    """
    if settings.encoder_backend == "torch":
        return Encoder(
            TorchBackend(settings.clip_model, settings.torch_num_threads),
            model_id=settings.clip_model,
            random_weights=is_random_model(settings.clip_model),
        )
    from consumer.onnx_backend import OnnxBackend
    from consumer.onnx_export import export_in_subprocess, is_current

    out = onnx_dir_for(settings)
    if not is_current(settings.clip_model, out, quantize=settings.onnx_quantize):
        log.info("exporting %s to ONNX (%s) in %s; one-time, in a child process", settings.clip_model, settings.onnx_quantize, out)
        export_in_subprocess(settings.clip_model, out, quantize=settings.onnx_quantize)
    backend = OnnxBackend(str(out), settings.torch_num_threads)
    suffix = "" if settings.onnx_quantize == "none" else f"#onnx-{settings.onnx_quantize}"
    return Encoder(backend, model_id=settings.clip_model + suffix, random_weights=backend.random_weights)


def build_store(settings: Settings):
    """The product store when ``MONGODB_URI`` is set, else None (pymongo is imported only then)."""
    if not settings.mongodb_uri:
        return None
    from consumer.store import ProductStore

    return ProductStore(mongo_client(settings), settings.mongodb_database, settings.mongodb_collection)


def build_service(settings: Settings, encoder: Encoder | None = None) -> Service:
    """A service for ``settings``; tests pass their own ``encoder`` to observe loads."""
    encoder = encoder or build_encoder(settings)
    index = None
    if settings.cache_products and settings.role is not Role.INGEST:
        index = FeatureIndex(dim=embedding_dim(settings.clip_model), dtype=settings.feature_dtype)
    return Service(settings, encoder, index, store=build_store(settings))


async def readiness(service: Service, timeout_s: float = 2.0) -> str | None:
    """None when ``service`` can serve, else why not: broker unreachable, store unreachable, no partitions assigned."""
    consumer = service.consumer
    if consumer is None:
        return "not connected to Kafka yet"
    try:
        await asyncio.wait_for(consumer.topics(), timeout_s)
    except Exception as exc:
        return f"Kafka unreachable: {exc!r}"
    if service.store is not None:
        try:
            await asyncio.wait_for(service.store.collection.database.command("ping"), timeout_s)
        except Exception as exc:
            return f"store unreachable: {exc!r}"
    if service.follower is not None and not service.follower.caught_up:
        return "feature index still catching up with the features topic"
    if not consumer.assignment():
        return "no partitions assigned"
    return None


def health_server(settings: Settings, service: Service) -> HealthServer:
    """``/metrics``, ``/healthz``, ``/readyz`` for ``service`` on ``METRICS_HOST:METRICS_PORT`` (call ``start``)."""
    return HealthServer(service.metrics.registry, lambda: readiness(service), settings.metrics_host, settings.metrics_port)


async def serve(settings: Settings) -> None:
    """Run one replica until SIGTERM/SIGINT, then finish the batch in flight, commit and close."""
    log_effective_config(settings, log)
    service = build_service(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    health = await health_server(settings, service).start()
    await service.start()
    try:
        await service.run()
    finally:
        await service.close()
        await health.close()
        log.info("stopped after %d batches", service.batches)


def main() -> None:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        raise SystemExit(f"clip-search could not start: {exc}") from None

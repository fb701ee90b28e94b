"""Wiring: settings -> encoder, feature index, service; signal handling; ``main``."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from consumer.config.redaction import log_effective_config
from consumer.config.settings import Role, Settings, load_settings, retired_variables
from consumer.domain.errors import StartupError
from consumer.encoder.encoder import Encoder
from consumer.encoder.extras import EXPORT_MODULES, TORCH_BACKEND_MODULES, missing_extra
from consumer.encoder.manifest import embedding_dim
from consumer.index.feature_index import FeatureIndex
from consumer.kafka.service import Service
from consumer.ops import log_summary
from consumer.ops.health import HealthServer
from consumer.ops.supervisor import Policy
from consumer.store.client import mongo_client
from consumer.tools.model_builder import is_random_model

if TYPE_CHECKING:
    from consumer.store.product_store import ProductStore

log = logging.getLogger("consumer")

EXIT_SHUTDOWN_TIMED_OUT = 4
"""Process exit code when some shutdown step did not finish within ``SHUTDOWN_TIMEOUT_S``."""
TEARDOWN_GRACE_S = 2.0
"""Longest the event loop's own teardown may take after ``serve`` returned before the process exits anyway."""


def onnx_dir_for(settings: Settings) -> Path:
    """Where the ONNX export of ``CLIP_MODEL`` lives: ``ONNX_DIR``, else a per-model folder in ``MODEL_CACHE_DIR``
    named after the towers' quantization (``-int8``, ``-none``, or ``-text-none-vision-int8`` when they differ)."""
    if settings.onnx_dir:
        return Path(settings.onnx_dir)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.clip_model.strip("/"))[-60:]
    digest = hashlib.sha256(settings.clip_model.encode()).hexdigest()[:8]
    quantize = settings.tower_quantization
    variant = quantize["text"] if quantize["text"] == quantize["vision"] else f"text-{quantize['text']}-vision-{quantize['vision']}"
    return Path(settings.model_cache_dir).expanduser() / "onnx" / f"{slug}-{digest}-{variant}"


def build_encoder(settings: Settings) -> Encoder:
    """The encoder for ``ENCODER_BACKEND``; for onnx, exports ``CLIP_MODEL`` once in a child process if needed.

    Raises ``StartupError`` (one line naming the ``export`` extra) when the torch backend or a missing
    export needs torch/transformers/onnx and they are not installed (``pip install clip-search`` serves only).

    The model id recorded with every stored feature names the precision the export's vision tower
    finally has (after any fidelity fallback), so features of different precisions are never mixed
    (switching re-encodes the catalog).
    """
    if settings.encoder_backend == "torch":
        if missing := missing_extra("ENCODER_BACKEND=torch", TORCH_BACKEND_MODULES):
            raise StartupError(missing)
        from consumer.encoder.torch_backend import TorchBackend

        return Encoder(
            TorchBackend(settings.clip_model, settings.torch_num_threads),
            model_id=settings.clip_model,
            random_weights=is_random_model(settings.clip_model),
        )
    from consumer.encoder.onnx_backend import OnnxBackend
    from consumer.tools.onnx_export import export_in_subprocess, is_current

    out = onnx_dir_for(settings)
    quantize, min_cosine = settings.tower_quantization, settings.export_min_cosine
    if not is_current(settings.clip_model, out, quantize=quantize, min_cosine=min_cosine):
        purpose = f"CLIP_MODEL={settings.clip_model} has no current ONNX export in {out} (ONNX_DIR), and exporting it"
        if missing := missing_extra(purpose, EXPORT_MODULES):
            raise StartupError(missing)
        check_export_fits(settings, out)
        log.info("exporting %s to ONNX (%s) in %s; one-time, in a child process", settings.clip_model, quantize, out)
        export_in_subprocess(settings.clip_model, out, quantize=quantize, min_cosine=min_cosine)
    backend = OnnxBackend(str(out), settings.torch_num_threads, vision_threads=settings.vision_tower_threads)
    vision = (backend.manifest.get("towers") or {}).get("vision") or {}
    used = vision.get("quantization", quantize["vision"])
    suffix = "" if used == "none" else f"#onnx-{used}"
    return Encoder(backend, model_id=settings.clip_model + suffix, random_weights=backend.random_weights)


def check_export_fits(settings: Settings, out: Path) -> None:
    """Raise ``StartupError`` (one line: how to export elsewhere) when exporting ``CLIP_MODEL`` here would
    need more memory than ``MEMORY_LIMIT_MB`` or the container's cgroup limit allows: an OOM kill on first
    start, then a restart loop, is what it would otherwise be."""
    from consumer.ops.memory import cgroup_limit_bytes
    from consumer.tools.onnx_export import export_memory_need

    need = export_memory_need(settings.clip_model)
    limits = {
        "MEMORY_LIMIT_MB": settings.memory_limit_mb * 2**20 if settings.memory_limit_mb else None,
        "the cgroup limit": cgroup_limit_bytes(),
    }
    known = {name: value for name, value in limits.items() if value}
    if need is None or not known:
        return
    name, limit = min(known.items(), key=lambda item: item[1])
    if need > limit:
        raise StartupError(
            f"exporting CLIP_MODEL={settings.clip_model} to ONNX needs about {need / 2**20:.0f} MB, more than {name} "
            f"({limit / 2**20:.0f} MB): run `clip-search-export-onnx --model {settings.clip_model} --out {out} "
            f"--quantize-text {settings.tower_quantization['text']} --quantize-vision {settings.tower_quantization['vision']} "
            f"--min-cosine {settings.export_min_cosine}` where memory allows (docker compose: the model-export service), then start again"
        )


def build_store(settings: Settings) -> ProductStore | None:
    """The product store when ``MONGODB_URI`` is set, else None (pymongo is imported only then)."""
    if not settings.mongodb_uri:
        return None
    from consumer.store.product_store import ProductStore

    return ProductStore(mongo_client(settings), settings.mongodb_database, settings.mongodb_collection)


def build_service(settings: Settings, encoder: Encoder | None = None) -> Service:
    """A service for ``settings``; tests pass their own ``encoder`` to observe loads.

    Every role that holds an index sizes it the same way (``embedding_dim`` of ``CLIP_MODEL``'s config,
    ``FEATURE_DTYPE``) and names it by the encoder's model id, which comes from the export manifest without
    loading a tower: so an ingest replica's snapshots are the files search replicas look for. The ingest role's
    index (``Settings.ingest_snapshots``) only feeds snapshots: its product handler keeps checking versions in
    the store.
    """
    encoder = encoder or build_encoder(settings)
    index = None
    if (settings.cache_products and settings.role is not Role.INGEST) or settings.ingest_snapshots:
        index = FeatureIndex(dim=embedding_dim(settings.clip_model), dtype=settings.feature_dtype)
    return Service(settings, encoder, index, store=build_store(settings))


async def readiness(service: Service, timeout_s: float = 2.0) -> str | None:
    """None when ``service`` can serve, else why not: a failed background task, broker unreachable, store unreachable,
    a search replica's index not caught up, no partitions assigned.

    An ingest replica's index (``INGEST_WRITES_SNAPSHOTS``) is not waited for: it serves no search, and the
    product lane checks versions in the store, so it can ingest while its follower still reads the topic. Its
    follower's failures still show here (as the supervisor's reason) until the restarted follower polls again.
    """
    if (failed := service.supervisor.reason) is not None:
        return failed
    consumer = service.consumer
    if consumer is None:
        return "not connected to Kafka yet"
    try:
        await asyncio.wait_for(consumer.topics(), timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the broker is a not-ready reason
        return f"Kafka unreachable: {exc!r}"
    if service.store is not None:
        try:
            await asyncio.wait_for(service.store.collection.database.command("ping"), timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the store is a not-ready reason
            return f"store unreachable: {exc!r}"
    if service.follower is not None and not service.follower.caught_up and service.settings.role is not Role.INGEST:
        return "feature index still catching up with the features topic"
    if not consumer.assignment():
        return "no partitions assigned"
    return service.retry_reason()


def health_server(settings: Settings, service: Service) -> HealthServer:
    """``/metrics``, ``/healthz``, ``/readyz`` for ``service`` on ``METRICS_HOST:METRICS_PORT`` (call ``start``).

    Every ``/readyz`` answer also sets the ``clip_search_ready`` gauge.
    """

    async def probe() -> str | None:
        reason = await readiness(service)
        service.metrics.ready.set(1 if reason is None else 0)
        return reason

    return HealthServer(service.metrics.registry, probe, settings.metrics_host, settings.metrics_port)


async def serve(settings: Settings) -> int:
    """Run one replica until SIGTERM/SIGINT (or a fatal background-task failure); return the exit code.

    Once a stop is requested, everything ends within ``SHUTDOWN_TIMEOUT_S``: a start still in
    progress is abandoned at once; the run loop gets what it needs of the budget to finish its
    batch and commit; ``Service.close`` gets the rest. Steps still running at the deadline are
    abandoned and named in one ERROR line, and the code is ``EXIT_SHUTDOWN_TIMED_OUT``; otherwise
    it is ``service.exit_code`` (``EXIT_TASK_FAILED`` after a fatal task failure, else 0).
    Raises ``StartupError`` (after closing) when the replica cannot start.
    """
    log_effective_config(settings, log)
    for line in retired_variables(os.environ):
        log.warning(line)
    service = build_service(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    try:
        health = await health_server(settings, service).start()
    except OSError as exc:
        await service.close()
        raise StartupError(
            f"cannot listen on METRICS_HOST:METRICS_PORT ({settings.metrics_host}:{settings.metrics_port}): {exc.strerror or exc}"
        ) from None
    service.supervisor.start("health-server", health.serve_forever, Policy.EXIT)
    started = asyncio.Event()

    async def start_and_run() -> None:
        await service.start()
        started.set()
        await service.run()

    work = asyncio.create_task(start_and_run(), name="service")
    stop = asyncio.create_task(service.stop_requested.wait())
    await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    budget = settings.shutdown_timeout_s
    deadline = loop.time() + budget
    timed_out: list[str] = []
    if not work.done():
        if not started.is_set():
            log.info("stop requested while starting: abandoning the start")
            work.cancel()
        await asyncio.wait({work}, timeout=max(deadline - loop.time(), 0))
        if not work.done():
            work.cancel()
            timed_out.append("finish the run loop (its batch in flight and commit, if any)" if started.is_set() else "abandon the start")
    timed_out += await service.close(timeout_s=max(deadline - loop.time(), 0))
    await service.supervisor.cancel()
    await health.close()
    if timed_out:
        log.error(
            "shutdown timed out after %g s (SHUTDOWN_TIMEOUT_S): could not %s; exiting with code %d",
            budget,
            "; ".join(timed_out),
            EXIT_SHUTDOWN_TIMED_OUT,
        )
    failure = None if not work.done() or work.cancelled() else work.exception()
    if failure is not None and not service.stop_requested.is_set():
        raise failure
    if failure is not None and started.is_set():
        log.warning("the run loop ended with %r after the stop request", failure)
    log.info("stopped after %d batches", service.batches)
    return EXIT_SHUTDOWN_TIMED_OUT if timed_out else service.exit_code


def main() -> None:
    """``clip-search``: run ``serve`` and exit with its code; a start failure exits with one line on stderr.

    When shutdown timed out, the process exits at once (whatever is still running is abandoned);
    otherwise the event loop is torn down normally, for at most ``TEARDOWN_GRACE_S``.
    """
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_summary.install()
    runner = asyncio.Runner()
    try:
        code = runner.run(serve(settings))
    except StartupError as exc:
        message = f"clip-search could not start: {exc}"
        _teardown(runner, 1, message)
        raise SystemExit(message) from None
    except BaseException:
        _teardown(runner, 1)
        raise
    if code == EXIT_SHUTDOWN_TIMED_OUT:
        _exit_now(code)
    _teardown(runner, code)
    raise SystemExit(code)


def _teardown(runner: asyncio.Runner, code: int, message: str | None = None) -> None:
    """Close ``runner``; if that takes longer than ``TEARDOWN_GRACE_S``, print ``message`` and exit with ``code`` anyway."""

    def overdue() -> None:
        log.error("event loop teardown did not finish in %g s: exiting anyway", TEARDOWN_GRACE_S)
        _exit_now(code, message)

    watchdog = threading.Timer(TEARDOWN_GRACE_S, overdue)
    watchdog.daemon = True
    watchdog.start()
    runner.close()


def _exit_now(code: int, message: str | None = None) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    if message is not None:
        print(message, file=sys.stderr)
    sys.stderr.flush()
    os._exit(code)

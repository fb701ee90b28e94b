"""Shared fixtures: a real Tansu broker, a tiny random CLIP, and in-process service replicas."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from consumer.app import build_encoder, build_service
from consumer.config.settings import Settings
from consumer.tools.model_builder import build_random_clip
from devservices import TansuBroker, create_topics

# The TLS and SASL fixtures (pki, tls_kafka, tls_mongo, sasl_broker), for every test folder.
pytest_plugins = ["tests.tls_services"]

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("CLIP_SEARCH_MODEL_CACHE", REPO / ".cache" / "models"))
os.environ.setdefault("MODEL_CACHE_DIR", str(REPO / ".cache"))


# Fixtures that start a real service (broker, store, ...). ``item.fixturenames`` holds every fixture a test
# uses, directly or through others (``topics``, ``settings_for``, ``service_factory``, ``store_settings`` ...).
SERVICE_FIXTURES = frozenset({"broker", "mongo", "noida", "sasl_broker", "tls_kafka", "tls_mongo"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test is ``unit`` or ``integration``; ``pytest -m unit`` is the fast suite (no service, seconds).

    ``integration``: uses a ``SERVICE_FIXTURES`` fixture; or is marked ``integration`` itself because it starts
    one without a fixture (a service process, Prometheus, a broker or store of its own: ``pytestmark`` for whole
    modules, e.g. tests/system/, tests/devservices/); or is marked ``slow`` (seconds of local CPU each: ONNX
    exports, long property-based runs). Everything else is ``unit``.
    """
    for item in items:
        if item.get_closest_marker("integration") is not None:
            continue
        uses_a_service = not SERVICE_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
        slow = item.get_closest_marker("slow") is not None
        item.add_marker(pytest.mark.integration if uses_a_service or slow else pytest.mark.unit)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return str(build_random_clip(MODEL_CACHE / "tiny", size="tiny"))


@pytest.fixture(scope="session")
def tiny_exports(tiny_model: str) -> dict[str, Path]:
    """ONNX exports of ``tiny_model`` by quantization (``none``, ``int8``); read-only for tests.

    The folders the service itself uses (``onnx_dir_for`` in ``MODEL_CACHE_DIR``), kept between runs like
    ``tiny_model`` and re-exported whenever ``is_current`` says the export no longer matches: ``-m unit`` stays
    fast, and in-process replicas find their export. Delete ``.cache/onnx`` to force a fresh export.
    """
    from consumer.app import onnx_dir_for
    from consumer.tools.onnx_export import export_onnx

    settings = {q: Settings(clip_model=tiny_model, onnx_quantize=q, _env_file=None) for q in ("none", "int8")}
    return {q: export_onnx(tiny_model, onnx_dir_for(s), quantize=q) for q, s in settings.items()}


@pytest.fixture(scope="session")
def broker():
    with TansuBroker() as b:
        yield b


async def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def topic_names(prefix: str = "") -> dict[str, str]:
    """Settings fields naming a fresh set of topics and consumer groups (unique suffix, optional prefix)."""
    suffix = uuid.uuid4().hex[:8]
    return {
        "search_requests_topic": f"{prefix}search-requests-{suffix}",
        "product_updates_topic": f"{prefix}product-updated-{suffix}",
        "reply_topic": f"{prefix}search-results-{suffix}",
        "dead_letter_topic": f"{prefix}dead-letters-{suffix}",
        "features_topic": f"{prefix}product-features-{suffix}",
        "consumer_group_id": f"{prefix}clip-search-{suffix}",
        "ingest_group_id": f"{prefix}clip-search-ingest-{suffix}",
    }


async def create_stream_topics(bootstrap: str, names: dict[str, str]) -> None:
    """3 partitions for requests, 1 for the rest; the features topic compacted."""
    await create_topics(bootstrap, [names["search_requests_topic"]], partitions=3)
    await create_topics(bootstrap, [names[k] for k in ("product_updates_topic", "reply_topic", "dead_letter_topic")], partitions=1)
    await create_topics(bootstrap, [names["features_topic"]], partitions=1, compacted={names["features_topic"]})


@pytest.fixture
async def topics(broker):
    """Fresh topics for one test (``topic_names``, created by ``create_stream_topics``)."""
    names = topic_names()
    await create_stream_topics(broker.bootstrap, names)
    return names


@pytest.fixture
def settings_for(broker, topics, tiny_model):
    def make(**overrides) -> Settings:
        values = {
            "kafka_bootstrap_servers": broker.bootstrap,
            "clip_model": tiny_model,
            "kafka_session_timeout_ms": 1500,
            "kafka_heartbeat_interval_ms": 250,
            "max_batch_wait_ms": 20,
            "_env_file": None,
        } | topics
        return Settings(**(values | overrides))

    return make


@asynccontextmanager
async def running(service, *, start: bool = True, timeout: float = 30.0):
    """Run ``service`` (started here unless ``start`` is False) in a task until the block exits; yields the task.

    On exit the service is stopped gracefully and closed (store included).
    """
    if start:
        try:
            await service.start()
        except BaseException:
            await service.close()
            raise
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.assigned.wait(), timeout)
        yield task
    finally:
        service.request_stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        finally:
            await service.close()


def replies_sent(service) -> float:
    """Replies a replica published (results and typed errors, every outcome), from its metrics registry."""
    return sum(s.value for m in service.metrics.replies.collect() for s in m.samples if s.name.endswith("_total"))


def feature_records(service) -> float:
    """Features-topic records a search replica read, from its metrics registry."""
    return service.metrics.registry.get_sample_value("clip_search_feature_records_total")


def products_encoded(service) -> float:
    """Products a replica encoded (from text or image), from its metrics registry."""
    return sum(s.value for m in service.metrics.product_encodes.collect() for s in m.samples if s.name.endswith("_total"))


@pytest.fixture
def service_factory(settings_for):
    def make(encoder=None, **overrides):
        settings = settings_for(**overrides)
        return build_service(settings, encoder or build_encoder(settings))

    return make


@pytest.fixture(scope="session")
def mongo():
    from devservices import MongoServer

    with MongoServer(storage_path=":memory:") as server:
        yield server


@pytest.fixture
def store_settings(mongo, topics):
    """Settings overrides that give a test its own database on the shared store."""
    return {"mongodb_uri": mongo.uri, "mongodb_database": f"db_{topics['consumer_group_id'].rsplit('-', 1)[1]}"}

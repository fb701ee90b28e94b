"""Memory readers, the metric definitions and the /metrics, /healthz, /readyz server."""

from __future__ import annotations

import asyncio
import json
import platform
from pathlib import Path
from typing import ClassVar

import numpy as np
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.ops import memory
from consumer.ops.health import HealthServer
from consumer.ops.metrics import ServiceMetrics
from consumer.pipeline.outcomes import BatchReport, Outcome, RecordOutcome
from producer_examples.client import publish
from schemas import Timings

MiB = 1 << 20


def proc_status_bytes() -> dict[str, int]:
    """VmRSS, RssAnon, VmHWM straight from /proc/self/status (independent of consumer.ops.memory)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, value = line.split(":", 1)
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def within(value: float, low: float, high: float, tolerance: float = 0.05) -> bool:
    return low * (1 - tolerance) <= value <= high * (1 + tolerance)


def metrics(**kwargs) -> ServiceMetrics:
    return ServiceMetrics(search_topic="req", **kwargs)


# --- memory gauges against /proc -------------------------------------------------------------


def test_memory_gauges_match_proc_and_psutil_in_the_same_moment():
    m = metrics(memory_limit_bytes=450 * MiB)
    before = proc_status_bytes()
    rss_psutil_before = psutil.Process().memory_info().rss
    rss = m.registry.get_sample_value("clip_search_memory_rss_bytes")
    anon = m.registry.get_sample_value("clip_search_memory_anon_bytes")
    peak = m.registry.get_sample_value("clip_search_memory_peak_rss_bytes")
    after = proc_status_bytes()
    rss_psutil_after = psutil.Process().memory_info().rss

    for gauge, key in ((rss, "VmRSS"), (anon, "RssAnon"), (peak, "VmHWM")):
        lo, hi = sorted((before[key], after[key]))
        assert within(gauge, lo, hi), f"{key}: gauge {gauge} vs /proc {before[key]}..{after[key]}"
    lo, hi = sorted((rss_psutil_before, rss_psutil_after))
    assert within(rss, lo, hi), f"RSS gauge {rss} vs psutil {lo}..{hi}"
    assert anon <= rss <= peak
    assert m.registry.get_sample_value("clip_search_memory_limit_bytes") == 450 * MiB


def test_memory_gauges_are_sampled_at_scrape_time():
    m = metrics()
    rss0 = m.registry.get_sample_value("clip_search_memory_rss_bytes")
    anon0 = m.registry.get_sample_value("clip_search_memory_anon_bytes")
    block = np.ones(64 * MiB, dtype=np.uint8)  # touched pages: resident and anonymous
    try:
        rss1 = m.registry.get_sample_value("clip_search_memory_rss_bytes")
        anon1 = m.registry.get_sample_value("clip_search_memory_anon_bytes")
        now = proc_status_bytes()
        assert rss1 - rss0 >= 0.9 * block.nbytes, (rss0, rss1)
        assert anon1 - anon0 >= 0.9 * block.nbytes, (anon0, anon1)
        assert within(rss1, now["VmRSS"], now["VmRSS"])
        assert m.registry.get_sample_value("clip_search_memory_peak_rss_bytes") >= rss1
    finally:
        del block
    assert m.registry.get_sample_value("clip_search_memory_rss_bytes") < rss1 - 0.5 * 64 * MiB


def test_limit_gauge_is_absent_without_a_configured_limit():
    assert metrics().registry.get_sample_value("clip_search_memory_limit_bytes") is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc-only")
def test_release_memory_calls_malloc_trim_on_glibc():
    assert memory.release_memory() is True


# --- cgroup readers on fake hierarchies and on this host -------------------------------------


def fake_cgroup(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    root = tmp_path / "sys"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    return proc, root


@pytest.mark.parametrize(
    "proc_line, files, usage, limit",
    [
        ("0::/", {"memory.current": "1000", "memory.max": "536870912"}, 1000, 536870912),
        ("0::/", {"memory.current": "1000", "memory.max": "max"}, 1000, None),
        ("0::/", {}, None, None),  # the host's root cgroup has no memory.current
        ("0::/system.slice/x.service", {"system.slice/x.service/memory.current": "7", "system.slice/x.service/memory.max": "9"}, 7, 9),
        ("4:memory:/docker/abc", {"memory/memory.usage_in_bytes": "5", "memory/memory.limit_in_bytes": "10"}, 5, 10),
        (
            "4:memory:/sandbox/1",
            {"memory/sandbox/1/memory.usage_in_bytes": "5", "memory/sandbox/1/memory.limit_in_bytes": "9223372036854771712"},
            5,
            None,
        ),
        ("4:memory:/", {"memory/memory.usage_in_bytes": "5", "memory/memory.limit_in_bytes": "9223372036854771712"}, None, None),
        ("4:memory:/\n0::/", {"memory/memory.usage_in_bytes": "5", "memory/memory.limit_in_bytes": "64", "memory.current": "1"}, 5, 64),
    ],
)
def test_cgroup_readers(tmp_path, proc_line, files, usage, limit):
    proc, root = fake_cgroup(tmp_path, proc_line, files)
    assert memory.cgroup_usage_bytes(proc, root) == usage
    assert memory.cgroup_limit_bytes(proc, root) == limit


def test_cgroup_gauges_follow_the_readers_on_this_host():
    m = metrics()
    usage, limit = memory.cgroup_usage_bytes(), memory.cgroup_limit_bytes()
    gauge_usage = m.registry.get_sample_value("clip_search_cgroup_memory_usage_bytes")
    gauge_limit = m.registry.get_sample_value("clip_search_cgroup_memory_limit_bytes")
    assert (gauge_usage is None) == (usage is None)
    assert gauge_limit == limit
    if usage is not None:
        again = memory.cgroup_usage_bytes()
        assert within(gauge_usage, min(usage, again), max(usage, again), tolerance=0.2)


def test_proc_readers_handle_a_missing_file(tmp_path):
    assert memory.proc_memory(tmp_path / "nope") == memory.ProcMemory(None, None, None)
    assert memory.rss_bytes(tmp_path / "nope") is None


# --- encoder, index and counters --------------------------------------------------------------


class FakeEncoder:
    tower_bytes: ClassVar[dict[str, int]] = {"text": 1234, "vision": 0}
    load_counts: ClassVar[dict[str, int]] = {"text": 1, "vision": 0}
    load_seconds: ClassVar[dict[str, float]] = {"text": 0.25}


def test_model_and_index_gauges_read_the_live_objects():
    from consumer.index.feature_index import FeatureIndex, ProductMeta

    index = FeatureIndex(dim=8, initial_capacity=4)
    m = metrics(encoder=FakeEncoder(), index=index)
    get = m.registry.get_sample_value
    assert get("clip_search_model_bytes", {"tower": "text"}) == 1234
    assert get("clip_search_model_bytes", {"tower": "vision"}) == 0
    assert get("clip_search_model_loaded", {"tower": "text"}) == 1
    assert get("clip_search_model_loaded", {"tower": "vision"}) == 0
    assert get("clip_search_model_load_seconds", {"tower": "text"}) == 0.25
    assert get("clip_search_model_load_seconds", {"tower": "vision"}) is None
    assert get("clip_search_model_loads_total", {"tower": "text"}) == 1
    assert get("clip_search_index_products") == 0
    for i in range(10):
        index.upsert(ProductMeta(f"p{i}", 1, "n", "", None, None), np.ones(8, dtype=np.float32))
    assert get("clip_search_index_products") == 10
    assert get("clip_search_index_bytes") == index.nbytes > 0


def outcome(topic: str, offset: int, kind: Outcome, code: str | None = None, timestamp: int = 1_000_000) -> RecordOutcome:
    return RecordOutcome(topic, 0, offset, timestamp, kind, code)


def test_observe_batch_counts_the_typed_outcomes():
    m = metrics()
    report = BatchReport(
        messages=6,
        outcomes=[
            outcome("req", 0, Outcome.RESULT),
            outcome("req", 1, Outcome.RESULT),
            outcome("req", 2, Outcome.ERROR_REPLY, "schema_violation"),
            outcome("req", 3, Outcome.DEAD_LETTER, "invalid_json"),  # no request_id: no reply possible
            outcome("prod", 0, Outcome.APPLIED),
            outcome("prod", 1, Outcome.DEAD_LETTER, "invalid_image"),
        ],
    )
    m.observe_batch(report, started=0.0, acknowledged_at=1_000.5)
    get = m.registry.get_sample_value
    assert get("clip_search_requests_total", {"outcome": "ok"}) == 2
    assert get("clip_search_requests_total", {"outcome": "schema_violation"}) == 1
    assert get("clip_search_requests_total", {"outcome": "invalid_json"}) == 1
    assert get("clip_search_replies_total", {"outcome": "ok"}) == 2
    assert get("clip_search_replies_total", {"outcome": "schema_violation"}) == 1
    assert get("clip_search_replies_total", {"outcome": "invalid_json"}) is None
    assert get("clip_search_errors_total", {"code": "invalid_image", "owner": "client"}) == 1
    assert get("clip_search_dead_letters_total", {"code": "invalid_json"}) == 1
    assert get("clip_search_product_updates_total", {"outcome": "applied"}) == 1
    assert get("clip_search_product_updates_total", {"outcome": "invalid_image"}) == 1
    assert get("clip_search_batch_size_count") == 1 and get("clip_search_batch_size_sum") == 6
    assert get("clip_search_request_duration_seconds_count") == 4
    assert get("clip_search_request_duration_seconds_sum") == pytest.approx(4 * 0.5)


def test_observe_batch_takes_encode_and_rank_time_of_the_batch():
    m = metrics()
    m.observe_batch(BatchReport(search_timings=Timings(queue_ms=1, encode_ms=20, rank_ms=3, total_ms=30)), started=0.0)
    get = m.registry.get_sample_value
    assert get("clip_search_encode_duration_seconds_count") == 1
    assert get("clip_search_encode_duration_seconds_sum") == pytest.approx(0.020)
    assert get("clip_search_rank_duration_seconds_sum") == pytest.approx(0.003)
    m.observe_batch(BatchReport(), started=0.0)
    assert get("clip_search_encode_duration_seconds_count") == 1


def test_set_paused_counts_transitions_to_paused():
    m = metrics()
    get = m.registry.get_sample_value
    assert (get("clip_search_paused"), get("clip_search_pauses_total")) == (0, 0)
    for state in (True, True, False, True, False, False):
        m.set_paused(state)
    assert (get("clip_search_paused"), get("clip_search_pauses_total")) == (0, 2)
    m.set_paused(True)
    assert (get("clip_search_paused"), get("clip_search_pauses_total")) == (1, 3)


class FakeConsumer:
    def __init__(self, state: dict[TopicPartition, tuple[int | None, int]]) -> None:
        self.state = state

    def assignment(self):
        return set(self.state)

    def highwater(self, tp):
        return self.state[tp][0]

    async def position(self, tp):
        return self.state[tp][1]


async def test_update_lag_sets_known_partitions_and_drops_revoked_ones():
    m = metrics()
    a, b, c = TopicPartition("req", 0), TopicPartition("req", 1), TopicPartition("prod", 0)
    consumer = FakeConsumer({a: (10, 4), b: (None, 0), c: (3, 3)})
    await m.update_lag(consumer)
    get = m.registry.get_sample_value
    assert get("clip_search_consumer_lag_records", {"topic": "req", "partition": "0"}) == 6
    assert get("clip_search_consumer_lag_records", {"topic": "req", "partition": "1"}) is None
    assert get("clip_search_consumer_lag_records", {"topic": "prod", "partition": "0"}) == 0
    consumer.state = {b: (5, 5)}
    await m.update_lag(consumer)
    assert get("clip_search_consumer_lag_records", {"topic": "req", "partition": "0"}) is None
    assert get("clip_search_consumer_lag_records", {"topic": "prod", "partition": "0"}) is None
    assert get("clip_search_consumer_lag_records", {"topic": "req", "partition": "1"}) == 0


async def test_lag_of_a_real_consumer_is_highwater_minus_position(broker, topics):
    topic = topics["product_updates_topic"]
    await publish(broker.bootstrap, topic, [{"n": i} for i in range(10)])
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        got = []
        while len(got) < 3:
            got += (await consumer.getmany(tp, timeout_ms=2000, max_records=3 - len(got))).get(tp, [])
        m = metrics()
        await m.update_lag(consumer)
        assert m.registry.get_sample_value("clip_search_consumer_lag_records", {"topic": topic, "partition": "0"}) == 7
    finally:
        await consumer.stop()


# --- the HTTP server --------------------------------------------------------------------------


async def http(port: int, path: str, method: str = "GET", headers: str = "") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), hdrs, body


async def test_health_server_endpoints():
    state: dict[str, object] = {"reason": "no partitions assigned"}

    async def readiness():
        if isinstance(state["reason"], Exception):
            raise state["reason"]
        return state["reason"]

    m = metrics(memory_limit_bytes=100 * MiB)
    async with HealthServer(m.registry, readiness, "127.0.0.1", 0) as server:
        status, hdrs, body = await http(server.port, "/metrics")
        assert status == 200 and hdrs["content-type"].startswith("text/plain; version=0.0.4")
        assert b"clip_search_memory_rss_bytes " in body and b"clip_search_memory_limit_bytes 1.048576e+08" in body
        status, hdrs, body = await http(server.port, "/metrics", headers="Accept: application/openmetrics-text; version=1.0.0\r\n")
        assert status == 200 and hdrs["content-type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")

        assert (await http(server.port, "/healthz"))[0] == 200
        status, _, body = await http(server.port, "/readyz")
        assert status == 503 and json.loads(body) == {"ready": False, "reason": "no partitions assigned"}
        state["reason"] = None
        status, _, body = await http(server.port, "/readyz?verbose=1")
        assert status == 200 and json.loads(body) == {"ready": True}
        state["reason"] = RuntimeError("boom")
        status, _, body = await http(server.port, "/readyz")
        assert status == 503 and "boom" in json.loads(body)["reason"]

        status, hdrs, body = await http(server.port, "/healthz", method="HEAD")
        assert status == 200 and body == b"" and int(hdrs["content-length"]) > 0
        assert (await http(server.port, "/nope"))[0] == 404
        assert (await http(server.port, "/metrics", method="POST"))[0] == 405


async def test_slow_readiness_is_not_ready():
    never = asyncio.Event()

    async def readiness():
        await never.wait()

    async with HealthServer(metrics().registry, readiness, "127.0.0.1", 0, readiness_timeout_s=0.2) as server:
        status, _, body = await http(server.port, "/readyz")
    assert status == 503 and "longer than" in json.loads(body)["reason"]


# --- readiness of a real service --------------------------------------------------------------


async def test_readiness_follows_the_broker_connection_assignment_and_store(service_factory):
    from consumer.app import health_server, readiness
    from devservices import free_port
    from tests.conftest import running

    service = service_factory(metrics_host="127.0.0.1", metrics_port=free_port())
    async with health_server(service.settings, service) as server:
        status, _, body = await http(server.port, "/readyz")
        assert status == 503 and json.loads(body)["reason"] == "not connected to Kafka yet"
        async with running(service):
            status, _, body = await http(server.port, "/readyz")
            assert status == 200, body
            status, _, body = await http(server.port, "/metrics")
            assert b"clip_search_service_info{model=" in body

            class UnreachableStore:
                class collection:
                    class database:
                        @staticmethod
                        async def command(name):
                            raise ConnectionError("connection refused")

            service.store = UnreachableStore()
            try:
                assert "store unreachable" in await readiness(service)
            finally:
                service.store = None
        assert (await http(server.port, "/healthz"))[0] == 200
        status, _, body = await http(server.port, "/readyz")
        assert status == 503, body


async def test_readiness_pings_a_real_store(service_factory, store_settings):
    from consumer.app import readiness
    from tests.conftest import running

    service = service_factory(**store_settings)
    async with running(service):
        assert await readiness(service) is None


def test_reply_cache_gauges_read_the_live_cache():
    from consumer.pipeline.reply_cache import ReplyCache

    m = metrics()
    get = m.registry.get_sample_value
    assert get("clip_search_reply_cache_bytes") is None
    cache: ReplyCache[bytes] = ReplyCache(10, 60, max_bytes=100, size=len)
    m.reply_cache = cache
    cache.put("a", b"x" * 30)
    cache.put("b", b"y" * 20)
    assert get("clip_search_reply_cache_bytes") == 50
    assert get("clip_search_reply_cache_entries") == 2

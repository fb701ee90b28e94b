"""Every Prometheus metric of the service, defined in one place.

One ``ServiceMetrics`` per replica, each with its own ``CollectorRegistry`` (tests
run several replicas in one process). Counters and histograms are updated by the
service loop through ``observe_batch`` (from a batch's typed outcomes), ``update_lag`` and
``set_paused``; memory, model and index gauges are read from the live objects at
scrape time by ``_LiveCollector``, so every scrape shows current values.

Names follow Prometheus conventions: prefix ``clip_search_``, base units
(``_bytes``, ``_seconds``), ``_total`` for counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consumer.domain.errors import owner_of
from consumer.ops import memory
from consumer.pipeline.outcomes import DEAD_LETTERED, BatchReport, Outcome, RecordOutcome

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer

    from consumer.encoder.encoder import Encoder
    from consumer.index.feature_index import FeatureIndex
    from consumer.pipeline.reply_cache import ReplyCache

log = logging.getLogger(__name__)

PREFIX = "clip_search"
OK = "ok"
TOWERS = ("text", "vision")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STAGES = ("queue", "batch_wait", "encode", "rank", "publish", "commit")
"""The stages of ``clip_search_stage_seconds``, in the order a search request passes them."""


def _export_fidelity(encoder: Encoder) -> Iterable[Metric]:
    """The ONNX export manifest's ``fidelity`` figures, per exported tower; nothing for a backend without a manifest (torch)."""
    manifest = getattr(getattr(encoder, "backend", None), "manifest", None)
    fidelity = manifest.get("fidelity") if isinstance(manifest, dict) else None
    if not fidelity:
        return
    cosine = GaugeMetricFamily(
        f"{PREFIX}_export_fidelity_cosine",
        "Cosine between the exported tower's and the source model's embeddings over the export's probe set (stat: mean or min).",
        labels=["tower", "stat"],
    )
    recall = GaugeMetricFamily(
        f"{PREFIX}_export_fidelity_recall_at_10",
        "Share of each probe's 10 nearest probe-catalog neighbours under the source model kept by the exported tower.",
        labels=["tower"],
    )
    quantized = GaugeMetricFamily(
        f"{PREFIX}_export_quantized",
        "1 when the exported tower serves int8 (possibly with MatMuls left in fp32), 0 for fp32.",
        labels=["tower"],
    )
    for tower, figures in sorted(fidelity.items()):
        cosine.add_metric([tower, "mean"], figures["mean_cosine"])
        cosine.add_metric([tower, "min"], figures["min_cosine"])
        recall.add_metric([tower], figures["recall_at_10"])
        quantized.add_metric([tower], 0 if figures["quantization"] == "none" else 1)
    yield from (cosine, recall, quantized)


class _LiveCollector(Collector):
    """Gauges sampled at scrape time from /proc, the cgroup, the encoder and the index."""

    def __init__(self, owner: ServiceMetrics) -> None:
        self.owner = owner

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        o = self.owner
        proc = memory.proc_memory()
        for name, value, doc in (
            ("memory_rss_bytes", proc.rss, "Resident set size of the process (VmRSS)."),
            ("memory_anon_bytes", proc.anon, "Resident anonymous memory of the process (RssAnon)."),
            ("memory_peak_rss_bytes", proc.peak_rss, "Peak resident set size since start (VmHWM)."),
            ("memory_limit_bytes", o.memory_limit_bytes, "Configured memory budget (MEMORY_LIMIT_MB); absent when unset."),
            ("cgroup_memory_usage_bytes", memory.cgroup_usage_bytes(), "Memory charged to the container's cgroup."),
            ("cgroup_memory_limit_bytes", memory.cgroup_limit_bytes(), "Hard memory limit of the container's cgroup."),
        ):
            if value is not None:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        if o.encoder is not None:
            held = o.encoder.tower_bytes
            loads = o.encoder.load_counts
            load_s = o.encoder.load_seconds
            nbytes = GaugeMetricFamily(f"{PREFIX}_model_bytes", "Parameter bytes held by a loaded model tower.", labels=["tower"])
            loaded = GaugeMetricFamily(f"{PREFIX}_model_loaded", "1 while the model tower is in memory.", labels=["tower"])
            seconds = GaugeMetricFamily(f"{PREFIX}_model_load_seconds", "Duration of the tower's latest load.", labels=["tower"])
            count = CounterMetricFamily(f"{PREFIX}_model_loads", "Completed loads of the model tower.", labels=["tower"])
            for tower in TOWERS:
                nbytes.add_metric([tower], held.get(tower, 0))
                loaded.add_metric([tower], 1 if held.get(tower, 0) else 0)
                count.add_metric([tower], loads.get(tower, 0))
                if tower in load_s:
                    seconds.add_metric([tower], load_s[tower])
            yield from (nbytes, loaded, seconds, count)
            yield from _export_fidelity(o.encoder)

        if o.index is not None:
            yield GaugeMetricFamily(f"{PREFIX}_index_bytes", "Bytes of the in-memory feature index arrays.", value=o.index.nbytes)
            yield GaugeMetricFamily(f"{PREFIX}_index_products", "Products in the in-memory feature index.", value=len(o.index))

        if o.reply_cache is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_reply_cache_bytes",
                "Approximate bytes held by the reply cache (REPLY_CACHE_MAX_BYTES bounds it).",
                value=o.reply_cache.nbytes,
            )
            yield GaugeMetricFamily(f"{PREFIX}_reply_cache_entries", "Replies held by the reply cache.", value=len(o.reply_cache))


class ServiceMetrics:
    """The metrics of one replica and the calls that update them.

    ``encoder`` and ``index`` may be None (e.g. no product cache); their gauges
    are then absent. ``memory_limit_bytes`` None leaves the limit gauge absent.
    ``reply_cache``, when set, adds the reply cache's size gauges.
    """

    reply_cache: ReplyCache[Any] | None = None

    def __init__(
        self,
        *,
        search_topic: str,
        encoder: Encoder | None = None,
        index: FeatureIndex | None = None,
        memory_limit_bytes: int | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.search_topic = search_topic
        self.encoder = encoder
        self.index = index
        self.memory_limit_bytes = memory_limit_bytes
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(_LiveCollector(self))

        self.info = Info(f"{PREFIX}_service", "Static facts about this replica.", registry=r)
        self.info.info(labels or {})
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Records per micro-batch.", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_duration = Histogram(
            f"{PREFIX}_batch_duration_seconds",
            "Time from a batch being collected to its offsets being committed.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.encode_duration = Histogram(
            f"{PREFIX}_encode_duration_seconds", "Batched query encoding time per search batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.rank_duration = Histogram(
            f"{PREFIX}_rank_duration_seconds", "Ranking time per search batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "End to end per search request: record timestamp to its reply acknowledged by the broker.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            f"{PREFIX}_stage_seconds",
            "Search latency by stage: queue (request timestamp to fetched, per request), batch_wait (fetched to batch "
            "closed), encode, rank, publish (until the replies are acknowledged), commit; per search batch otherwise.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for stage in STAGES:
            self.stage_duration.labels(stage)
        self.requests = Counter(f"{PREFIX}_requests", "Search requests consumed, by outcome (ok or error code).", ["outcome"], registry=r)
        self.replies = Counter(f"{PREFIX}_replies", "Replies published, by outcome (ok or error code).", ["outcome"], registry=r)
        self.product_updates = Counter(
            f"{PREFIX}_product_updates", "Product updates consumed, by outcome (applied, stale or error code).", ["outcome"], registry=r
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Records answered with an error, by error code and owner (client: the input; service: processing kept failing).",
            ["code", "owner"],
            registry=r,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters", "Records published to the dead-letter topic, by error code.", ["code"], registry=r
        )
        self.feature_records = Counter(f"{PREFIX}_feature_records", "Features-topic records read into the index (search role).", registry=r)
        self.fetches = Counter(f"{PREFIX}_fetches", "Batch collections by the service loop (flat while the loop is stuck).", registry=r)
        self.product_encodes = Counter(
            f"{PREFIX}_product_encodes", "Products encoded from their image or their text, by input.", ["input"], registry=r
        )
        self.partitions_retrying = Gauge(
            f"{PREFIX}_partitions_retrying",
            "Assigned partitions paused to retry records whose processing failed (store down, poison record).",
            registry=r,
        )
        self.consumer_lag = Gauge(
            f"{PREFIX}_consumer_lag_records",
            "Records not yet handed to the service per assigned partition (highwater - position).",
            ["topic", "partition"],
            registry=r,
        )
        self.paused = Gauge(f"{PREFIX}_paused", "1 while consumption is paused by memory backpressure.", registry=r)
        self.pauses = Counter(f"{PREFIX}_pauses", "Times consumption was paused by memory backpressure.", registry=r)
        self.index_catch_up = Gauge(
            f"{PREFIX}_index_catch_up_seconds",
            "Seconds the last start spent bringing the feature index up to date (snapshot load plus features topic).",
            registry=r,
        )
        self.index_snapshot_writes = Counter(
            f"{PREFIX}_index_snapshot_writes", "Feature index snapshot writes, by outcome (written, failed).", ["outcome"], registry=r
        )
        self.index_snapshot_timestamp = Gauge(
            f"{PREFIX}_index_snapshot_timestamp_seconds",
            "Unix time of the index snapshot last loaded or written (0: none yet).",
            registry=r,
        )
        self.background_task_failures = Counter(
            f"{PREFIX}_background_task_failures",
            "Background tasks that ended unexpectedly (then restarted or the replica stopped), by task.",
            ["task"],
            registry=r,
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when the latest /readyz check passed, else 0 (0 until the first).", registry=r)
        self.requests.labels(OK)
        self.replies.labels(OK)
        self.product_updates.labels("applied")
        self._lag_labels: set[tuple[str, str]] = set()
        self._paused = False

    def observe_batch(self, report: BatchReport, *, started: float, acknowledged_at: float | None = None) -> None:
        """Account for one committed batch from its typed outcomes.

        ``started`` is the ``time.monotonic()`` when the batch was collected; ``acknowledged_at`` the
        epoch time its messages were acknowledged (default: now). Records left for a retry are not
        in ``report.outcomes``: they are counted when they are handled.
        """
        acknowledged_at = time.time() if acknowledged_at is None else acknowledged_at
        self.batch_size.observe(report.messages)
        self.batch_duration.observe(time.monotonic() - started)
        if report.search_timings is not None:
            self.encode_duration.observe(report.search_timings.encode_ms / 1000.0)
            self.rank_duration.observe(report.search_timings.rank_ms / 1000.0)
        for o in report.outcomes:
            if o.code is not None and o.outcome is not Outcome.DUPLICATE:
                self.errors.labels(o.code, owner_of(o.code)).inc()
            if o.outcome in DEAD_LETTERED:
                self.dead_letters.labels(o.code or "unknown").inc()
            if o.topic == self.search_topic:
                self._observe_request(o, acknowledged_at)
            else:
                self.product_updates.labels(o.code or o.outcome.value).inc()

    def observe_stages(
        self, report: BatchReport, *, fetched_at: float, closed_at: float, processed_at: float, acknowledged_at: float, committed_at: float
    ) -> None:
        """Per-stage latency of a committed batch's searches (epoch times); nothing for a batch without searches.

        ``queue`` is observed per request from its record timestamp (clamped at 0 against clock skew);
        ``encode`` and ``rank`` come from ``report.search_timings``; the rest once per batch.
        """
        requests = [o for o in report.outcomes if o.topic == self.search_topic]
        if not requests:
            return
        for o in requests:
            if o.timestamp_ms is not None:
                self.stage_duration.labels("queue").observe(max(0.0, fetched_at - o.timestamp_ms / 1000.0))
        stages = {"batch_wait": closed_at - fetched_at, "publish": acknowledged_at - processed_at, "commit": committed_at - acknowledged_at}
        if report.search_timings is not None:
            stages |= {"encode": report.search_timings.encode_ms / 1000.0, "rank": report.search_timings.rank_ms / 1000.0}
        for stage, seconds in stages.items():
            self.stage_duration.labels(stage).observe(max(0.0, seconds))

    def _observe_request(self, o: RecordOutcome, acknowledged_at: float) -> None:
        self.requests.labels(o.code or OK).inc()
        if o.outcome in (Outcome.RESULT, Outcome.ERROR_REPLY, Outcome.DUPLICATE):
            self.replies.labels(o.code or OK).inc()
        if o.timestamp_ms is not None:
            self.request_duration.observe(max(0.0, acknowledged_at - o.timestamp_ms / 1000.0))

    async def update_lag(self, consumer: AIOKafkaConsumer | None, timeout_s: float = 0.5) -> None:
        """Set lag = highwater - position per assigned partition whose highwater is known; drop unassigned ones."""
        assigned = list(consumer.assignment()) if consumer is not None else []
        keep = {(tp.topic, str(tp.partition)) for tp in assigned}
        for key in self._lag_labels - keep:
            self.consumer_lag.remove(*key)
        self._lag_labels &= keep
        if consumer is None:
            return
        for tp in assigned:
            try:
                high = consumer.highwater(tp)
                if high is None:
                    continue
                position = await asyncio.wait_for(consumer.position(tp), timeout_s)
            except Exception as exc:  # noqa: BLE001 - revoked meanwhile or no position yet: the next update reports it
                log.debug("no lag for %s: %r", tp, exc)
                continue
            key = (tp.topic, str(tp.partition))
            self.consumer_lag.labels(*key).set(max(0, high - position))
            self._lag_labels.add(key)

    def set_paused(self, paused: bool) -> None:
        """Record the backpressure state; each change from running to paused counts one pause."""
        if paused and not self._paused:
            self.pauses.inc()
        self._paused = paused
        self.paused.set(1 if paused else 0)

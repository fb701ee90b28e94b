"""Generate ``grafana/dashboards/clip-search.json`` (run: ``python grafana/generate.py``).

The dashboard is plain Grafana JSON built from the small tables below, so a panel
is one line of intent (title, unit, PromQL) and the layout is computed. The JSON
is committed so Grafana provisioning needs no build step; a test fails when the
committed file differs from this script's output, and another evaluates every
expression against a real Prometheus scraping the service.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "clip-search.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"
WIDTH = 24


def quantiles(metric: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{SEL}}}[{RATE}])))", f"p{round(q * 100)}") for q in qs]


def stage_quantiles(metric: str, qs: tuple[float, ...] = (0.5, 0.99)) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le, stage) (rate({metric}_bucket{{{SEL}}}[{RATE}])))", f"p{round(q * 100)} {{{{stage}}}}")
        for q in qs
    ]


def by_rate(metric: str, label: str) -> list[tuple[str, str]]:
    return [(f"sum by ({label}) (rate({metric}{{{SEL}}}[{RATE}]))", f"{{{{{label}}}}}")]


# (row title, [(panel title, type, unit, width, [(expr, legend)], description)])
ROWS: list[tuple[str, list[tuple[str, str, str, int, list[tuple[str, str]], str]]]] = [
    (
        "Memory",
        [
            (
                "Process memory vs limit",
                "timeseries",
                "bytes",
                8,
                [
                    (f"clip_search_memory_rss_bytes{{{SEL}}}", "RSS {{instance}}"),
                    (f"clip_search_memory_anon_bytes{{{SEL}}}", "anonymous {{instance}}"),
                    (f"clip_search_memory_peak_rss_bytes{{{SEL}}}", "peak RSS {{instance}}"),
                    (f"clip_search_memory_limit_bytes{{{SEL}}}", "limit (MEMORY_LIMIT_MB) {{instance}}"),
                ],
                "VmRSS, RssAnon and VmHWM from /proc/self/status against the configured MEMORY_LIMIT_MB.",
            ),
            (
                "Container memory vs cgroup limit",
                "timeseries",
                "bytes",
                8,
                [
                    (f"clip_search_cgroup_memory_usage_bytes{{{SEL}}}", "cgroup usage {{instance}}"),
                    (f"clip_search_cgroup_memory_limit_bytes{{{SEL}}}", "cgroup limit {{instance}}"),
                ],
                "What the OOM killer sees (page cache included). Empty outside a container or without a limit.",
            ),
            (
                "RSS of budget",
                "gauge",
                "percentunit",
                4,
                [
                    (f"clip_search_memory_rss_bytes{{{SEL}}} / clip_search_memory_limit_bytes{{{SEL}}}", "{{instance}}"),
                ],
                "RSS as a fraction of MEMORY_LIMIT_MB.",
            ),
            (
                "Peak RSS",
                "stat",
                "bytes",
                4,
                [
                    (f"clip_search_memory_peak_rss_bytes{{{SEL}}}", "{{instance}}"),
                ],
                "Highest resident set size since the process started (VmHWM).",
            ),
            (
                "Model bytes by tower",
                "timeseries",
                "bytes",
                8,
                [
                    (f"clip_search_model_bytes{{{SEL}}}", "{{tower}} {{instance}}"),
                ],
                "Parameter bytes of each loaded CLIP tower; 0 while unloaded.",
            ),
            (
                "Feature index",
                "timeseries",
                "bytes",
                8,
                [
                    (f"clip_search_index_bytes{{{SEL}}}", "index bytes {{instance}}"),
                ],
                "Bytes of the in-memory feature matrix and per-slot arrays.",
            ),
            (
                "Indexed products",
                "stat",
                "short",
                4,
                [
                    (f"sum(clip_search_index_products{{{SEL}}})", "products"),
                ],
                "Products held in the in-memory index.",
            ),
            (
                "Backpressure",
                "timeseries",
                "short",
                4,
                [
                    (f"clip_search_paused{{{SEL}}}", "paused {{instance}}"),
                    (f"increase(clip_search_pauses_total{{{SEL}}}[{RATE}])", "pauses {{instance}}"),
                ],
                "1 while consumption is paused for memory; pauses started in the interval.",
            ),
        ],
    ),
    (
        "Latency",
        [
            (
                "Encode latency",
                "timeseries",
                "s",
                8,
                quantiles("clip_search_encode_duration_seconds"),
                "Batched CLIP encoding of one search batch.",
            ),
            ("Rank latency", "timeseries", "s", 8, quantiles("clip_search_rank_duration_seconds"), "Top-k ranking of one search batch."),
            (
                "End-to-end latency",
                "timeseries",
                "s",
                8,
                quantiles("clip_search_request_duration_seconds"),
                "Request record timestamp to its reply acknowledged by the broker.",
            ),
            (
                "Search latency by stage",
                "timeseries",
                "s",
                24,
                stage_quantiles("clip_search_stage_seconds"),
                "Where a search's time goes, p50 and p99 per stage: queue (request timestamp to fetched), batch_wait "
                "(fetched to batch closed), encode, rank, publish (replies acknowledged), commit.",
            ),
        ],
    ),
    (
        "Throughput",
        [
            (
                "Replies by outcome",
                "timeseries",
                "reqps",
                8,
                by_rate("clip_search_replies_total", "outcome"),
                "Replies published per second: ok or the error code.",
            ),
            (
                "Requests by outcome",
                "timeseries",
                "reqps",
                8,
                by_rate("clip_search_requests_total", "outcome"),
                "Search requests consumed per second, including those that could not be answered.",
            ),
            (
                "Product updates by outcome",
                "timeseries",
                "ops",
                8,
                by_rate("clip_search_product_updates_total", "outcome"),
                "Updates applied, skipped as stale, or rejected (error code).",
            ),
            (
                "Batch size",
                "timeseries",
                "short",
                12,
                [
                    *quantiles("clip_search_batch_size", (0.5, 0.95)),
                    (
                        f"sum(rate(clip_search_batch_size_sum{{{SEL}}}[{RATE}])) / sum(rate(clip_search_batch_size_count{{{SEL}}}[{RATE}]))",
                        "mean",
                    ),
                ],
                "Records per micro-batch (MAX_BATCH_SIZE caps it).",
            ),
            (
                "Model towers",
                "timeseries",
                "short",
                12,
                [
                    (f"clip_search_model_loaded{{{SEL}}}", "loaded {{tower}} {{instance}}"),
                    (f"clip_search_model_load_seconds{{{SEL}}}", "load seconds {{tower}} {{instance}}"),
                ],
                "Tower loaded state (1/0) and how long its latest load took.",
            ),
        ],
    ),
    (
        "Kafka and errors",
        [
            (
                "Consumer lag by partition",
                "timeseries",
                "short",
                8,
                [
                    (f"sum by (topic, partition) (clip_search_consumer_lag_records{{{SEL}}})", "{{topic}}[{{partition}}]"),
                ],
                "Highwater minus position per assigned partition.",
            ),
            (
                "Errors by code",
                "timeseries",
                "ops",
                8,
                [
                    (f"sum by (owner, code) (rate(clip_search_errors_total{{{SEL}}}[{RATE}]))", "{{owner}}: {{code}}"),
                ],
                "Records answered with an error per second, by owner (client: the input; service: processing kept failing) and code.",
            ),
            (
                "Dead letters by code",
                "timeseries",
                "ops",
                8,
                by_rate("clip_search_dead_letters_total", "code"),
                "Records published to the dead-letter topic per second.",
            ),
            (
                "Client error ratio",
                "timeseries",
                "percentunit",
                12,
                [
                    (
                        f'sum(rate(clip_search_errors_total{{owner="client", {SEL}}}[{RATE}])) / (sum(rate(clip_search_requests_total{{{SEL}}}[{RATE}])) + sum(rate(clip_search_product_updates_total{{{SEL}}}[{RATE}])))',
                        "client errors / records",
                    ),
                ],
                "Share of consumed records rejected as client errors; the alert ClipSearchClientErrorRatio fires above 20% for 10 minutes. Replicas keep serving.",
            ),
            (
                "Partitions retrying",
                "timeseries",
                "short",
                12,
                [
                    (f"clip_search_partitions_retrying{{{SEL}}}", "{{instance}}"),
                ],
                "Partitions paused to retry after a dependency outage or a failing record; /readyz says why.",
            ),
            (
                "Replicas up",
                "stat",
                "short",
                24,
                [
                    (f'sum(up{{job="clip-search", {SEL}}})', "up"),
                ],
                "Scrape targets answering /metrics.",
            ),
        ],
    ),
]


def _panel(pid: int, title: str, kind: str, unit: str, targets: list[tuple[str, str]], description: str, pos: dict) -> dict:
    panel = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": pos,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True}
            for i, (expr, legend) in enumerate(targets)
        ],
    }
    if kind == "timeseries":
        panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    elif kind == "gauge":
        panel["fieldConfig"]["defaults"] |= {
            "min": 0,
            "max": 1,
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "green", "value": None}, {"color": "orange", "value": 0.8}, {"color": "red", "value": 0.9}],
            },
        }
    return panel


def dashboard() -> dict:
    panels, pid, y = [], 1, 0
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"x": 0, "y": y, "w": WIDTH, "h": 1},
            }
        )
        pid, y, x = pid + 1, y + 1, 0
        for title, kind, unit, width, targets, description in row_panels:
            if x + width > WIDTH:
                x, y = 0, y + 8
            panels.append(_panel(pid, title, kind, unit, targets, description, {"x": x, "y": y, "w": width, "h": 8}))
            pid, x = pid + 1, x + width
        y += 8
    return {
        "uid": "clip-search",
        "title": "CLIP search",
        "description": "Memory first: RSS, cgroup and model/index bytes against the budget; then latency, throughput, lag and errors.",
        "tags": ["clip-search", "kafka"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "instance",
                    "label": "instance",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(clip_search_service_info, instance)", "refId": "instance"},
                    "definition": "label_values(clip_search_service_info, instance)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "sort": 1,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if OUT.read_text() == render() else f"{OUT} is out of date: run python grafana/generate.py")
    OUT.write_text(render())
    print(f"wrote {OUT}")

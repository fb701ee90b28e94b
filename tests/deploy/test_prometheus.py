"""A real Prometheus scrapes a loaded in-process service; every dashboard query must return series.

Also checks the Prometheus configs and alert rules with promtool (``check config``,
``check rules``, ``test rules``).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest

from consumer.app import health_server
from consumer.ops import memory
from devservices import free_port
from devservices.prometheus import PrometheusServer, prometheus_binary, promtool_binary
from producer_examples.client import SearchClient, product_text, publish
from tests.conftest import running, wait_for

REPO = Path(__file__).resolve().parents[2]
RULES = sorted((REPO / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((REPO / "prometheus" / "tests").glob("*.yml"))
DASHBOARDS = sorted((REPO / "grafana").rglob("*.json"))
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "5m"}
# Absent by contract on a host without a memory cgroup (usage) or without a cgroup limit (limit).
HOST_DEPENDENT = {
    "clip_search_cgroup_memory_usage_bytes": memory.cgroup_usage_bytes,
    "clip_search_cgroup_memory_limit_bytes": memory.cgroup_limit_bytes,
}

LIMIT_MB = 8192  # far above this test's RSS, so memory backpressure never pauses it

PRODUCTS = [
    {"product_id": f"p-{i}", "version": 1, "name": name, "description": "test item", "category": cat, "price": 10.0 + i}
    for i, (name, cat) in enumerate(
        [("Red cotton t-shirt", "apparel"), ("Steel kettle", "kitchen"), ("Oak desk lamp", "home"), ("Yoga mat", "sports")]
    )
]


def require(binary: str | None, name: str) -> str:
    if binary is None:
        pytest.fail(f"{name} is not installed: ./run.sh test installs it (apt-get install prometheus)")
    return binary


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [require(promtool_binary(), "promtool"), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL with Grafana variables substituted) for every panel target."""
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        if "panels" not in dashboard:
            continue
        variables = dict(GRAFANA_BUILTINS)
        for var in dashboard.get("templating", {}).get("list", []):
            variables[var["name"]] = var.get("allValue") or ".*"

        def substitute(expr: str, variables: dict[str, str] = variables, path: Path = path) -> str:
            def value(m: re.Match) -> str:
                name = m.group(1) or m.group(2) or m.group(3)
                if name not in variables:
                    raise AssertionError(f"{path.name}: unknown variable ${name} in {expr}")
                return variables[name]

            return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)

        stack = list(dashboard["panels"])
        while stack:
            panel = stack.pop(0)
            stack.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((path.name, panel["title"], substitute(target["expr"])))
    return out


def scrape_config(port: int) -> str:
    rules = "".join(f"\n  - {p}" for p in RULES)
    return f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:{rules}
scrape_configs:
  - job_name: clip-search
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


async def until(check, what: str, timeout: float = 60.0):
    """Run blocking ``check`` in a thread until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def scrapes(prom: PrometheusServer) -> int:
    result = prom.query('count_over_time(up{job="clip-search"}[1h])')
    return int(float(result[0]["value"][1])) if result else 0


def test_dashboards_have_queries():
    queries = dashboard_queries()
    assert DASHBOARDS and len(queries) >= 20
    assert all("$" not in q for _, _, q in queries)


@pytest.mark.integration  # needs Prometheus's promtool (the prometheus package ./run.sh test installs)
def test_prometheus_configs_and_rules_pass_promtool(tmp_path):
    for config in (REPO / "prometheus" / "prometheus.yml", tmp_path / "generated.yml"):
        if config.name == "generated.yml":
            config.write_text(scrape_config(9100))
        result = promtool("check", "config", config)
        assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("check", "rules", *RULES)
    assert RULES and result.returncode == 0, result.stdout + result.stderr
    for test in RULE_TESTS:
        result = promtool("test", "rules", test)
        assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken-rules.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(foo[5m]\n")
    assert promtool("check", "rules", broken).returncode != 0


@pytest.mark.slow
async def test_every_dashboard_query_returns_series_from_a_real_prometheus(service_factory, topics, broker):
    require(prometheus_binary(), "prometheus")
    service = service_factory(memory_limit_mb=LIMIT_MB, max_batch_size=8, metrics_host="127.0.0.1", metrics_port=free_port())
    async with running(service):
        health = await health_server(service.settings, service).start()
        prom = PrometheusServer(scrape_config(health.port))
        try:
            await asyncio.to_thread(prom.start)
            await until(lambda: scrapes(prom) >= 1, "the first scrape")

            await publish(broker.bootstrap, topics["product_updates_topic"], PRODUCTS, key_field="product_id")
            await publish(broker.bootstrap, topics["product_updates_topic"], [{"product_id": "bad", "version": "x"}])
            await wait_for(lambda: len(service.index) == len(PRODUCTS), what="products indexed")
            async with SearchClient(broker.bootstrap, topics["search_requests_topic"], topics["reply_topic"]) as client:
                for product in PRODUCTS:
                    assert (await client.search({"query_text": product_text(product), "top_k": 2}))["status"] == "ok"
                bad = await client.search({"query_text": "x", "top_k": 0})
                assert bad["status"] == "error" and bad["error"]["code"] == "schema_violation"
            await wait_for(
                lambda: service.metrics.registry.get_sample_value("clip_search_dead_letters_total", {"code": "schema_violation"}) == 2,
                what="dead letters counted",
            )

            after_load = await asyncio.to_thread(scrapes, prom)
            await until(lambda: scrapes(prom) >= after_load + 2, "two scrapes after the load")

            empty, not_finite, excused = [], [], []
            for dashboard, title, expr in dashboard_queries():
                result = await asyncio.to_thread(prom.query, expr)
                if not result:
                    absent = [m for m, reader in HOST_DEPENDENT.items() if m in expr and reader() is None]
                    (excused if absent else empty).append(f"{dashboard} / {title}: {expr}")
                elif "histogram_quantile" in expr and not any(math.isfinite(float(r["value"][1])) for r in result):
                    not_finite.append(f"{dashboard} / {title}: {expr} -> {result}")
            assert not empty, "panels whose query returned no series:\n" + "\n".join(empty)
            assert not not_finite, "latency panels without a value:\n" + "\n".join(not_finite)
            if excused:
                print("absent on this host by contract (no cgroup memory limit):\n" + "\n".join(excused))

            def value(expr: str) -> float:
                return float(prom.query(expr)[0]["value"][1])

            assert value('clip_search_index_products{job="clip-search"}') == len(PRODUCTS)
            assert value('clip_search_replies_total{outcome="ok"}') == len(PRODUCTS)
            assert value('clip_search_replies_total{outcome="schema_violation"}') == 1
            assert value('sum(clip_search_dead_letters_total{code="schema_violation"})') == 2
            assert value('clip_search_model_loaded{tower="text"}') == 1
            assert value("max(clip_search_consumer_lag_records)") == 0
            assert value("clip_search_memory_limit_bytes") == LIMIT_MB * 2**20
            assert value("clip_search_paused") == 0 and value("clip_search_pauses_total") == 0
            stages = {
                r["metric"]["stage"]: r["value"][1]
                for r in prom.query('sum by (stage) (clip_search_stage_seconds_count{job="clip-search"})')
            }
            searches = len(PRODUCTS) + 1
            assert float(stages.pop("queue")) == searches, "queue is observed once per search request"
            assert set(stages) == {"batch_wait", "encode", "rank", "publish", "commit"}
            assert all(1 <= float(n) <= searches for n in stages.values()), stages
            rss_now = memory.rss_bytes()
            assert 0.5 * rss_now < value("clip_search_memory_rss_bytes") < 1.5 * rss_now

            rules = await asyncio.to_thread(prom.api, "rules")
            loaded = [r for g in rules["groups"] for r in g["rules"]]
            assert len(loaded) >= 3 and all(r["health"] == "ok" for r in loaded), loaded
        finally:
            await asyncio.to_thread(prom.close)
            await health.close()

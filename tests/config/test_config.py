import subprocess
import sys

import pytest

from consumer.config.settings import ConfigError, Role, load_settings


def test_defaults_keep_the_seed_names_and_meanings(monkeypatch):
    for var in ("MAX_BATCH_SIZE", "CACHE_PRODUCTS", "LAZY_LOAD_MODEL", "TOP_K", "SIMILARITY_THRESHOLD"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings(_env_file=None)
    assert (s.max_batch_size, s.cache_products, s.lazy_load_model, s.top_k, s.similarity_threshold) == (16, True, True, 10, 0.0)
    assert s.clip_model == "openai/clip-vit-base-patch32" and s.role is Role.ALL


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("CACHE_PRODUCTS", "false")
    monkeypatch.setenv("MONGODB_URI", "mongodb://db:27017")
    monkeypatch.setenv("ROLE", "search")
    s = load_settings(_env_file=None)
    assert s.max_batch_size == 32 and s.cache_products is False and s.role is Role.SEARCH


@pytest.mark.parametrize(
    "env, threads, nice",
    [
        ({"ROLE": "all", "TORCH_NUM_THREADS": "2"}, 1, 10),
        ({"ROLE": "ingest", "TORCH_NUM_THREADS": "2"}, 2, 0),
        ({"ROLE": "search"}, None, 0),
        ({"ROLE": "all", "VISION_THREADS": "2", "IMAGE_WORK_NICE": "0"}, 2, 0),
        ({"ROLE": "ingest", "VISION_THREADS": "1", "IMAGE_WORK_NICE": "5"}, 1, 5),
    ],
)
def test_image_work_yields_to_searches_in_role_all_unless_told_otherwise(monkeypatch, env, threads, nice):
    for var in ("TORCH_NUM_THREADS", "VISION_THREADS", "IMAGE_WORK_NICE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    s = load_settings(_env_file=None)
    assert (s.vision_tower_threads, s.image_threads_nice) == (threads, nice)


@pytest.mark.parametrize(
    "var, value, named",
    [
        ("MAX_BATCH_SIZE", "0", "MAX_BATCH_SIZE"),
        ("MAX_BATCH_SIZE", "lots", "MAX_BATCH_SIZE"),
        ("SIMILARITY_THRESHOLD", "2", "SIMILARITY_THRESHOLD"),
        ("ROLE", "leader", "ROLE"),
        ("CACHE_PRODUCTS", "false", "MONGODB_URI"),
        ("TOP_K", "500", "TOP_K"),
    ],
)
def test_invalid_config_names_the_variable(monkeypatch, var, value, named):
    monkeypatch.delenv("MONGODB_URI", raising=False)
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as exc:
        load_settings(_env_file=None)
    assert named in str(exc.value)


@pytest.mark.integration  # starts the service as a process
def test_service_exits_at_start_with_a_readable_message():
    env = {"PATH": "/usr/bin:/bin", "MAX_BATCH_SIZE": "-3", "HOME": "/tmp"}
    proc = subprocess.run([sys.executable, "-m", "consumer"], env=env, capture_output=True, text=True, timeout=60, cwd=".")
    assert proc.returncode != 0
    assert "MAX_BATCH_SIZE" in proc.stderr and "Traceback" not in proc.stderr

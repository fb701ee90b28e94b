"""First start of a model with no ONNX export yet, inside a box that cannot hold the export.

``python -m consumer`` must stop at once with one line saying how to export elsewhere, and never launch
the export child (whose measured peak is 2.1 GB for ViT-B/32 shapes), rather than be OOM-killed and
restarted in a loop.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from consumer.tools.onnx_export import EXPORT_BASE_BYTES, export_memory_need
from devservices import free_port
from tests.conftest import REPO


def test_export_need_grows_with_the_weights(tiny_model, tmp_path):
    need = export_memory_need(tiny_model)
    assert need is not None and need > EXPORT_BASE_BYTES
    assert export_memory_need(str(tmp_path)) is None, "no weight files: no estimate"
    assert export_memory_need("openai/clip-vit-base-patch32") is None, "a hub id is not measured before download"


@pytest.mark.integration
def test_a_box_too_small_for_the_export_stops_with_one_line(tiny_model, tmp_path):
    onnx_dir = tmp_path / "export"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "CLIP_MODEL": tiny_model,
        "ONNX_DIR": str(onnx_dir),
        "MEMORY_LIMIT_MB": "64",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "METRICS_PORT": str(free_port()),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "consumer"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("clip-search could not start: exporting CLIP_MODEL="), proc.stderr[-2000:]
    assert "MEMORY_LIMIT_MB (64 MB)" in last and "clip-search-export-onnx --model" in last and "model-export service" in last
    assert "Traceback" not in proc.stderr
    assert not onnx_dir.exists() or not any(onnx_dir.iterdir()), "the export ran anyway"

"""``pip install clip-search`` serves without torch; what needs the ``export`` extra says so in one line.

The child processes here run on a site directory holding exactly the distributions that the core
dependencies of ``pyproject.toml`` install (their installed requirements followed recursively, markers
evaluated), symlinked from this interpreter's site-packages, with ``python -S`` so nothing else is on the
path. torch, transformers and onnx are then simply not installed there, as in a serving image, and the
test also catches a serving import of a package the core dependencies do not bring.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from consumer.encoder.extras import EXPORT_MODULES, INSTALL, TORCH_BACKEND_MODULES

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXPORT_ONLY = {"torch", "transformers", "onnx", "safetensors"}
CATALOG_IMAGE = min((REPO / "producer_examples" / "catalog" / "images").glob("*.png"))


def requirement_names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


# --- pyproject --------------------------------------------------------------------------------


def test_core_dependencies_name_neither_torch_nor_transformers():
    core = requirement_names(PYPROJECT["project"]["dependencies"])
    assert not core & EXPORT_ONLY, sorted(core & EXPORT_ONLY)
    assert {"onnxruntime", "tokenizers", "huggingface-hub"} <= core


def test_export_extra_pins_the_cpu_torch_and_dev_includes_it():
    extras = PYPROJECT["project"]["optional-dependencies"]
    export = {canonicalize_name(Requirement(r).name): Requirement(r) for r in extras["export"]}
    assert set(export) >= EXPORT_ONLY
    assert str(export["torch"].specifier) == "==2.13.0", "an unpinned torch pulls a multi-GB CUDA build"
    dev = [Requirement(r) for r in extras["dev"]]
    assert any(canonicalize_name(r.name) == "clip-search" and r.extras == {"export"} for r in dev), "dev must include the export extra"
    assert {canonicalize_name(m) for m in set(TORCH_BACKEND_MODULES) | set(EXPORT_MODULES)} <= set(export)


def test_int8_kernel_graph_is_what_the_onnx_helper_recipe_writes():
    """The serving path ships the 155-byte graph prebuilt, so it needs onnxruntime but not onnx."""
    from onnx import TensorProto, helper

    from consumer.index.int8_kernel import MODEL_BYTES

    a = helper.make_tensor_value_info("features", TensorProto.UINT8, ["n", "d"])
    b = helper.make_tensor_value_info("queries", TensorProto.INT8, ["d", "q"])
    y = helper.make_tensor_value_info("scores", TensorProto.INT32, ["n", "q"])
    node = helper.make_node("MatMulInteger", ["features", "queries"], ["scores"])
    graph = helper.make_graph([node], "int8_scores", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert model.SerializeToString() == MODEL_BYTES


# --- an environment with the core dependencies only ---------------------------------------------


def core_distributions() -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions ``pip install clip-search`` (no extras) brings, by canonical name."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    while pending:
        req = pending.pop()
        name = canonicalize_name(req.name)
        if name in found or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req} (a core dependency) is not installed: pip install -c constraints.txt -e '.[dev]'")
        found[name] = dist
        for extra in req.extras:
            pending += [r for r in map(Requirement, dist.requires or []) if r.marker is not None and r.marker.evaluate({"extra": extra})]
        pending += [r for r in map(Requirement, dist.requires or []) if r.marker is None or r.marker.evaluate({"extra": ""})]
    return found


@pytest.fixture(scope="module")
def core_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site directory with the top-level files of the core distributions only (symlinks)."""
    site = tmp_path_factory.mktemp("core-site")
    dists = core_distributions()
    assert not set(dists) & EXPORT_ONLY, f"a core dependency pulls in {sorted(set(dists) & EXPORT_ONLY)}"
    for dist in dists.values():
        for entry in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            source = Path(dist.locate_file(entry))
            if source.exists() and not (site / entry).exists():
                (site / entry).symlink_to(source)
    return site


def run_core_only(core_site: Path, cwd: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``python -S args`` with only the repository and ``core_site`` on the path."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CLIP_", "ONNX_", "ENCODER_", "KAFKA_"))}
    child_env |= {"PYTHONPATH": os.pathsep.join([str(REPO), str(core_site)]), "PYTHONDONTWRITEBYTECODE": "1"} | env
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=child_env, capture_output=True, text=True, timeout=120)


def test_the_core_environment_has_no_torch_transformers_or_onnx(core_site, tmp_path):
    probe = "import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in MODULES}))"
    modules = sorted(EXPORT_ONLY | {"onnxruntime", "tokenizers", "huggingface_hub", "aiokafka", "consumer"})
    result = run_core_only(core_site, tmp_path, ["-c", probe.replace("MODULES", repr(modules))])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {m: m not in EXPORT_ONLY for m in modules}


def start_failure(core_site: Path, tmp_path: Path, **env: str) -> str:
    """stderr of ``python -m consumer`` that must fail at start: exit 1, one line, no traceback."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "LOG_LEVEL": "WARNING", "MODEL_CACHE_DIR": str(tmp_path)} | env
    result = run_core_only(core_site, tmp_path, ["-m", "consumer"], **env)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.integration  # starts the service as a process
def test_torch_backend_without_the_extra_is_one_line_naming_it(core_site, tiny_model, tmp_path):
    line = start_failure(core_site, tmp_path, ENCODER_BACKEND="torch", CLIP_MODEL=tiny_model)
    assert line == f"clip-search could not start: ENCODER_BACKEND=torch needs torch and transformers: {INSTALL}"


@pytest.mark.integration  # starts the service as a process
def test_a_missing_export_without_the_extra_is_one_line_naming_it(core_site, tiny_model, tmp_path):
    onnx_dir = tmp_path / "no-export-here"
    line = start_failure(core_site, tmp_path, ENCODER_BACKEND="onnx", CLIP_MODEL=tiny_model, ONNX_DIR=str(onnx_dir))
    assert line == (
        f"clip-search could not start: CLIP_MODEL={tiny_model} has no current ONNX export in {onnx_dir} (ONNX_DIR), "
        f"and exporting it needs torch, transformers and onnx: {INSTALL}"
    )
    assert not onnx_dir.exists(), "no export was attempted"


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("consumer.tools.onnx_export", f"clip-search-export-onnx needs torch, transformers and onnx: {INSTALL}"),
        ("consumer.tools.model_builder", f"clip-search-build-model needs torch and transformers: {INSTALL}"),
    ],
)
def test_the_export_and_model_builder_commands_without_the_extra_say_so_in_one_line(core_site, tiny_model, tmp_path, module, line):
    args = ["--model", tiny_model] if module.endswith("onnx_export") else []
    result = run_core_only(core_site, tmp_path, ["-m", module, *args, "--out", str(tmp_path / "out")])
    assert (result.returncode, result.stderr) == (1, line + "\n")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def int8_export(tiny_exports: dict[str, Path]) -> Path:
    return tiny_exports["int8"]


SERVE = textwrap.dedent(
    """
    import base64, json, sys
    import consumer.app, consumer.encoder.onnx_backend, consumer.kafka.service
    from consumer.app import build_service
    from consumer.config.settings import Settings
    from consumer.encoder.images import ImageLimits, pixels_from_base64
    from consumer.index.feature_index import ProductMeta
    from consumer.index.ranking import Query
    from consumer.tools.onnx_export import ExportError, export_in_subprocess

    model, onnx_dir, image = sys.argv[1:4]
    settings = Settings(clip_model=model, onnx_dir=onnx_dir, feature_dtype="int8", _env_file=None)
    service = build_service(settings)
    texts = ["red leather shoes", "a desk lamp", "wireless smart watch"]
    text = service.encoder.encode_text(texts)
    with open(image, "rb") as f:
        pixels = pixels_from_base64(base64.b64encode(f.read()).decode(), ImageLimits())
    vision = service.encoder.encode_images(pixels[None])
    metas = [ProductMeta(f"p{i}", 1, t, "", None, None) for i, t in enumerate(texts)]
    service.index.upsert_many(metas, text)
    ranked = service.index.search(text[1:2], [Query(top_k=3)])[0]
    try:
        export_in_subprocess(model, onnx_dir + "-other")
        export_error = None
    except ExportError as exc:
        export_error = str(exc)
    heavy = sorted(m for m in ("torch", "transformers", "onnx", "safetensors") if m in sys.modules)
    print(json.dumps({"text": text.tolist(), "image": vision.tolist(), "top": ranked[0][0].product_id,
                      "export_error": export_error, "heavy": heavy, "model_id": service.encoder.model_id}))
    """
)


def test_the_serving_path_encodes_text_and_images_without_the_extra(core_site, tiny_model, int8_export, tmp_path):
    from PIL import Image

    from consumer.encoder.encoder import Encoder
    from consumer.encoder.images import clip_pixels
    from consumer.encoder.onnx_backend import OnnxBackend

    result = run_core_only(core_site, tmp_path, ["-c", SERVE, tiny_model, str(int8_export), str(CATALOG_IMAGE)])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["top"] == "p1"
    assert out["model_id"] == f"{tiny_model}#onnx-int8"
    assert out["export_error"] == f"exporting {tiny_model} to ONNX needs torch, transformers and onnx: {INSTALL}"
    assert not Path(str(int8_export) + "-other").exists()
    reference = Encoder(OnnxBackend(str(int8_export)), tiny_model)
    expected_text = reference.encode_text(["red leather shoes", "a desk lamp", "wireless smart watch"])
    expected_image = reference.encode_images(clip_pixels(Image.open(CATALOG_IMAGE).convert("RGB"))[None])
    assert np.array(out["text"]).shape == expected_text.shape == (3, 32)
    np.testing.assert_allclose(out["text"], expected_text, atol=1e-5)
    np.testing.assert_allclose(out["image"], expected_image, atol=1e-5)


# --- the image --------------------------------------------------------------------------------


def test_dockerfile_exports_in_a_build_stage_and_serves_without_torch():
    """Linted by tests/deploy/test_deploy_files.py; here: which stage installs what (no Docker engine to build it)."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    starts = [i for i, line in enumerate(instructions) if line.startswith("FROM ")]
    assert len(starts) == 2, "an export stage and the final stage"
    builder, final = instructions[starts[0] : starts[1]], instructions[starts[1] :]
    stage = builder[0].split()[-1]
    assert builder[0].split()[-2].upper() == "AS"
    builder_runs = " ".join(line for line in builder if line.startswith("RUN "))
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in builder_runs
    assert 'pip install -c constraints.txt ".[export]"' in builder_runs
    assert "BAKE_MODEL" in builder_runs and "consumer.tools.onnx_export" in builder_runs
    final_runs = " ".join(line for line in final if line.startswith("RUN "))
    installs = [args.strip() for line in final if line.startswith("RUN ") for args in re.findall(r"pip install ([^&;]*)", line)]
    assert installs == ["-c constraints.txt ."], "the final stage installs the package without extras, and nothing else"
    assert not re.search(r"\b(torch|transformers)\b", final_runs), "the final stage installs no torch"
    assert f"COPY --from={stage} /opt/models /opt/models" in final
    assert final[-1] == 'CMD ["python", "-m", "consumer"]'
    assert [line for line in final if line.startswith("USER ")][-1].split()[1] not in ("root", "0")

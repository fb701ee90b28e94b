# clip-search service image: CPU-only, one process, non-root, read-only-root-filesystem friendly, no torch.
#   docker build -t clip-search .                                  # weights and ONNX export mounted at run time
#   docker build --build-arg BAKE_MODEL=openai/clip-vit-base-patch32 -t clip-search:baked .
#   docker build --target export -t clip-search-export .           # the exporter alone, for mounted weights
# Two stages. "export" installs the export extra (torch 2.13.0 CPU, transformers, onnx) and, with BAKE_MODEL,
# downloads the weights and writes their ONNX int8 export. The final stage installs the package without
# extras (ONNX Runtime + tokenizers: all serving needs) and copies /opt/models from "export". Python packages,
# measured as venv site-packages on the build machine (no Docker engine there, so not image sizes):
# 277 MB for `pip install .`, 1.3 GB with `.[export]`.
# Never built in CI here: tests lint it with hadolint and check the compose file against the Compose spec.
FROM python:3.11-slim-bookworm AS export

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf

WORKDIR /build

# torch first, from the CPU-only index: the default wheel drags in several GB of CUDA libraries.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml constraints.txt README.md ./
COPY consumer ./consumer
COPY schemas ./schemas
COPY producer_examples ./producer_examples
RUN pip install -c constraints.txt ".[export]"

# Optional: bake weights and their ONNX int8 export (read-only at run time; run with
# CLIP_MODEL=/opt/models/clip ONNX_DIR=/opt/models/clip-onnx-int8). Without it /opt/models stays empty:
# mount weights and an export at /models, written by this stage's image (--target export) or any
# `pip install 'clip-search[export]'` (clip-search-export-onnx, about 1 GB of memory), outside the 512 MB container.
ARG BAKE_MODEL=""
RUN mkdir -p /opt/models \
 && if [ -n "$BAKE_MODEL" ]; then \
      python -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], local_dir='/opt/models/clip', allow_patterns=['*.json', '*.txt', '*.safetensors'])" "$BAKE_MODEL" \
      && python -m consumer.tools.onnx_export --model /opt/models/clip --out /opt/models/clip-onnx-int8 --quantize int8; \
    fi

FROM python:3.11-slim-bookworm

ARG BAKE_MODEL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_ARENA_MAX=2 \
    HOME=/tmp \
    TMPDIR=/tmp \
    HF_HOME=/models/hf \
    XDG_CACHE_HOME=/models/cache \
    MODEL_CACHE_DIR=/models/cache \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=9100

WORKDIR /app

COPY pyproject.toml constraints.txt README.md ./
COPY consumer ./consumer
COPY schemas ./schemas
COPY producer_examples ./producer_examples
# No extras: no torch or transformers (the export stage has them), and test-only servers (SecantusDB is GPL)
# never enter the image.
RUN pip install -c constraints.txt .

COPY --from=export /opt/models /opt/models
# A baked export must still match its weights here (config hash, weight sizes and mtimes), or the service
# would look for torch to export again at start: fail the build instead.
RUN if [ -n "$BAKE_MODEL" ]; then \
      python -c "import sys; from consumer.tools.onnx_export import is_current; sys.exit(0 if is_current('/opt/models/clip', '/opt/models/clip-onnx-int8') else 'the baked ONNX export does not match /opt/models/clip')"; \
    fi \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /models /snapshots \
 && chown app /models /snapshots
USER 10001
VOLUME ["/models", "/snapshots"]
EXPOSE 9100

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2)"]

CMD ["python", "-m", "consumer"]

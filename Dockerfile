# clip-search service image: CPU-only, one process, non-root, read-only-root-filesystem friendly.
#   docker build -t clip-search .                                  # weights mounted at run time (CLIP_MODEL=/models/...)
#   docker build --build-arg BAKE_MODEL=openai/clip-vit-base-patch32 -t clip-search:baked .
# Never built in CI here: tests lint it with hadolint and check the compose file against the Compose spec.
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

# torch first, from the CPU-only index: the default wheel drags in several GB of CUDA libraries.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml constraints.txt README.md ./
COPY consumer ./consumer
COPY schemas ./schemas
COPY producer_examples ./producer_examples
# No dev extra: test-only servers (SecantusDB is GPL) never enter the image.
RUN pip install -c constraints.txt .

# Optional: bake weights and their ONNX int8 export into the image (read-only at run time; run with
# CLIP_MODEL=/opt/models/clip ONNX_DIR=/opt/models/clip-onnx-int8). Without it, mount them at /models and
# run the one-time export (clip-search-export-onnx, about 1 GB of memory) outside the 512 MB container.
RUN if [ -n "$BAKE_MODEL" ]; then \
      python -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], local_dir='/opt/models/clip', allow_patterns=['*.json', '*.txt', '*.safetensors'])" "$BAKE_MODEL" \
      && python -m consumer.tools.onnx_export --model /opt/models/clip --out /opt/models/clip-onnx-int8 --quantize int8; \
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

"""Typed service configuration from environment variables and an optional ``.env``.

Names are the upper-case field names (``MAX_BATCH_SIZE``, ``CACHE_PRODUCTS`` ...).
An invalid value fails at start with an error naming the variable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer.config.security import SecuritySettings


class Role(StrEnum):
    ALL = "all"
    INGEST = "ingest"
    SEARCH = "search"


class Settings(SecuritySettings, BaseSettings):
    """Service settings; security fields (``KAFKA_SSL_*``, ``KAFKA_SASL_*``, ``MONGODB_TLS*`` ...) come from ``SecuritySettings``."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False)

    role: Role = Role.ALL

    metrics_host: str = Field("0.0.0.0", description="/metrics listener address")  # nosec B104  # Prometheus scrapes containers from outside (README: Security)
    metrics_port: Annotated[int, Field(ge=1, le=65535)] = 9100

    kafka_bootstrap_servers: str = "localhost:9092"
    search_requests_topic: str = "search-requests"
    product_updates_topic: str = "product-updated"
    reply_topic: str = Field("search-results", description="default reply topic when a request names none")
    dead_letter_topic: str = "search-dead-letters"
    features_topic: str = Field("product-features", description="compacted topic of product features (split roles)")
    consumer_group_id: str = "clip-search"
    ingest_group_id: str = "clip-search-ingest"
    kafka_client_id: str = "clip-search"
    kafka_session_timeout_ms: Annotated[int, Field(ge=100)] = 10_000
    kafka_heartbeat_interval_ms: Annotated[int, Field(ge=50)] = 3_000
    kafka_max_request_size: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    kafka_fetch_max_wait_ms: Annotated[int, Field(ge=0, le=10_000)] = Field(
        10,
        description="longest a fetch waits on the broker for new records; bounds added request latency on brokers that "
        "do not answer a waiting fetch as soon as records arrive (Tansu: a record waits about half of it)",
    )

    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    max_batch_wait_ms: Annotated[int, Field(ge=0, le=10_000)] = 10
    batch_wait_min_records: Annotated[int, Field(ge=1, le=1024)] = Field(
        2,
        description="a batch waits up to MAX_BATCH_WAIT_MS for more records only when its first fetch brought at least "
        "this many (busy); fewer (light load): it takes what is already fetched and closes at once. 1: always wait",
    )
    max_images_per_batch: Annotated[int, Field(ge=1)] = Field(
        4,
        description="ROLE=all: image updates encoded per batch at most; the rest of their partition waits for the next batch",
    )
    cache_products: bool = True
    lazy_load_model: bool = True
    top_k: Annotated[int, Field(ge=1)] = 10
    max_top_k: Annotated[int, Field(ge=1, le=10_000)] = 100
    similarity_threshold: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.0

    mongodb_uri: str | None = Field(None, description="product store; required for CACHE_PRODUCTS=false and ROLE=ingest")
    mongodb_database: str = "clip_search"
    mongodb_collection: str = "products"
    mongodb_timeout_ms: Annotated[int, Field(ge=100)] = Field(
        5000, description="how long a store call waits for an unreachable MongoDB (unless MONGODB_URI sets it)"
    )
    store_chunk_rows: Annotated[int, Field(ge=64)] = 4096

    clip_model: str = "openai/clip-vit-base-patch32"
    torch_num_threads: Annotated[int, Field(ge=1)] | None = Field(
        None, description="intra-op threads of the encoder (torch or ONNX Runtime); default: one per core"
    )
    vision_threads: Annotated[int, Field(ge=1)] | None = Field(
        None, description="intra-op threads of the ONNX vision tower; default: TORCH_NUM_THREADS, or 1 with ROLE=all"
    )
    image_work_nice: Annotated[int, Field(ge=0, le=19)] | None = Field(
        None,
        description="nice value of the threads that decode and encode product images; default: 10 with ROLE=all (searches first), else 0",
    )
    encoder_backend: Literal["onnx", "torch"] = Field(
        "onnx", description="onnx: ONNX Runtime, exported once from CLIP_MODEL, no torch in the serving process"
    )
    onnx_quantize: Literal["int8", "none"] = "int8"
    onnx_quantize_text: Literal["int8", "none"] | None = Field(None, description="the text tower's quantization; default: ONNX_QUANTIZE")
    onnx_quantize_vision: Literal["int8", "none"] | None = Field(
        None, description="the vision tower's quantization; default: ONNX_QUANTIZE"
    )
    export_min_cosine: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.99,
        description="an int8 tower whose minimum cosine to the source model over the export's probe set is below this falls back",
    )
    onnx_dir: str | None = Field(None, description="ONNX export of CLIP_MODEL; default under MODEL_CACHE_DIR")
    model_cache_dir: str = "~/.cache/clip-search"
    feature_dtype: Literal["float32", "float16", "int8"] = "float32"
    index_snapshot_dir: str | None = Field(
        None,
        description="ROLE=search: keep a snapshot of the feature index here, so a restart reads only newer features "
        "(ROLE=ingest writes one too, see INGEST_WRITES_SNAPSHOTS)",
    )
    index_snapshot_interval_s: Annotated[float, Field(ge=0)] = Field(
        300.0, description="write the snapshot this often when the index changed (0: only at shutdown)"
    )
    ingest_writes_snapshots: bool = Field(
        True,
        description="ROLE=ingest with INDEX_SNAPSHOT_DIR: also follow the features topic into a FEATURE_DTYPE index and "
        "write its snapshots there, so a first search replica starts from one (the ingest replica then holds the index)",
    )

    max_message_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    max_image_bytes: Annotated[int, Field(ge=1024)] = 5 * 1024 * 1024
    max_image_pixels: Annotated[int, Field(ge=1024)] = 40_000_000

    memory_limit_mb: Annotated[int, Field(ge=16)] | None = Field(
        None,
        description="soft memory limit in MiB: above it fetching pauses until RSS is under MEMORY_LOW_WATER x limit",
    )
    model_idle_unload_s: Annotated[float, Field(gt=0)] | None = Field(
        None, description="unload the image tower after this many seconds without an image; unset: keep it"
    )
    memory_low_water: Annotated[float, Field(gt=0.1, lt=1.0)] = 0.85

    reply_topic_pattern: re.Pattern[str] | None = Field(
        None,
        description="regular expression every reply_to must match in full (unset: any topic but the service's own)",
    )
    reply_send_timeout_s: Annotated[float, Field(gt=0)] = Field(
        10.0, description="how long a reply waits for its topic to appear in the broker's metadata before it is dead-lettered"
    )
    poison_max_attempts: Annotated[int, Field(ge=1)] = Field(
        3, description="attempts at a record whose processing keeps failing before it is dead-lettered as internal_error"
    )
    reply_cache_size: Annotated[int, Field(ge=0)] = 10_000
    reply_cache_ttl_s: Annotated[float, Field(gt=0)] = 600.0
    reply_cache_max_bytes: Annotated[int, Field(ge=0)] = Field(
        4 * 1024 * 1024, description="bytes of replies the reply cache holds at most (least recently used go first; 0: none)"
    )
    retry_backoff_s: Annotated[float, Field(gt=0)] = 2.0
    retry_backoff_max_s: Annotated[float, Field(gt=0)] = 10.0
    shutdown_timeout_s: Annotated[float, Field(ge=1)] = Field(
        20.0, description="after SIGTERM, the process exits within this many seconds whatever the state of its clients"
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.top_k > self.max_top_k:
            raise ValueError(f"TOP_K ({self.top_k}) must not exceed MAX_TOP_K ({self.max_top_k})")
        if self.reply_topic in self.own_topics:
            raise ValueError(f"REPLY_TOPIC ({self.reply_topic}) must not be one of the service's own topics")
        if not self.cache_products and not self.mongodb_uri:
            raise ValueError("CACHE_PRODUCTS=false streams features from the store: set MONGODB_URI")
        return self

    @property
    def own_topics(self) -> frozenset[str]:
        """Every topic the service reads or writes for itself; a reply may never be written to one."""
        return frozenset({self.search_requests_topic, self.product_updates_topic, self.features_topic, self.dead_letter_topic})

    def reply_topic_allowed(self, topic: str) -> bool:
        """The default reply topic always; any other unless it is one of ``own_topics`` or misses ``REPLY_TOPIC_PATTERN``."""
        if topic == self.reply_topic:
            return True
        if topic in self.own_topics:
            return False
        return self.reply_topic_pattern is None or self.reply_topic_pattern.fullmatch(topic) is not None

    @property
    def tower_quantization(self) -> dict[str, Literal["int8", "none"]]:
        """The quantization each tower is exported with: ``ONNX_QUANTIZE_TEXT`` / ``_VISION``, else ``ONNX_QUANTIZE``."""
        return {"text": self.onnx_quantize_text or self.onnx_quantize, "vision": self.onnx_quantize_vision or self.onnx_quantize}

    @property
    def vision_tower_threads(self) -> int | None:
        """``VISION_THREADS``, else 1 with ROLE=all (the other core stays free for searches), else ``TORCH_NUM_THREADS``."""
        if self.vision_threads is not None:
            return self.vision_threads
        return 1 if self.role is Role.ALL else self.torch_num_threads

    @property
    def image_threads_nice(self) -> int:
        """``IMAGE_WORK_NICE``, else 10 with ROLE=all (searches preempt product images), else 0."""
        if self.image_work_nice is not None:
            return self.image_work_nice
        return 10 if self.role is Role.ALL else 0

    @property
    def ingest_snapshots(self) -> bool:
        """ROLE=ingest follows the features topic and writes index snapshots (``INGEST_WRITES_SNAPSHOTS``, ``INDEX_SNAPSHOT_DIR``)."""
        return self.role is Role.INGEST and self.ingest_writes_snapshots and bool(self.index_snapshot_dir)

    @property
    def max_batch_wait_s(self) -> float:
        return self.max_batch_wait_ms / 1000.0


RETIRED_VARIABLES = {
    "DLQ_MAX_RATIO": 'client errors no longer stop a replica; alert on clip_search_errors_total{owner="client"} instead',
    "DLQ_WINDOW": 'client errors no longer stop a replica; alert on clip_search_errors_total{owner="client"} instead',
}
"""Variables earlier versions read, with why they are ignored now."""


def retired_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning line per retired variable set in ``environ``."""
    names = {k.upper() for k in environ}
    return [f"{name} is set but no longer used: {why}" for name, why in RETIRED_VARIABLES.items() if name in names]


class ConfigError(SystemExit):
    """Raised at start for invalid settings; the message names each bad variable."""


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (``overrides`` win); exit with a readable message if invalid."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            var = "_".join(str(p) for p in err["loc"]).upper() or "settings"
            lines.append(f"  {var}: {err['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None

"""Event models exchanged over Kafka (JSON on the wire, pydantic v2).

Every event carries ``schema_version``; a consumer rejects versions it does not
know with a typed error instead of guessing. Fields are strict about shape and
size so a producer learns about a mistake from the reply, not from silence.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

MAX_ID_LENGTH = 128
MAX_QUERY_LENGTH = 1000
MAX_TEXT_LENGTH = 4000
MAX_TOPIC_LENGTH = 249
MAX_IMAGE_B64_LENGTH = 8 * 1024 * 1024

Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[A-Za-z0-9._:\-]+$")]
TopicName = Annotated[str, Field(min_length=1, max_length=MAX_TOPIC_LENGTH, pattern=r"^[A-Za-z0-9._\-]+$")]
ImageB64 = Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_B64_LENGTH)]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchFilters(_Event):
    """Restricts the candidate products; unknown filter names are rejected."""

    category: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    min_price: Annotated[float, Field(ge=0)] | None = None
    max_price: Annotated[float, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _price_range(self) -> SearchFilters:
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise ValueError("min_price must not exceed max_price")
        return self


class SearchRequest(_Event):
    """A search by text and/or an inline image; the reply goes to ``reply_to``.

    With both ``query_text`` and ``query_image_b64`` the query embedding is the
    normalised mean of the two. ``top_k`` and ``similarity_threshold`` fall back
    to the service's configured defaults; ``deadline`` is an absolute UTC time
    after which the caller no longer wants an answer (it gets a timeout error).
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: Identifier
    query_text: Annotated[str, Field(max_length=MAX_QUERY_LENGTH)] | None = None
    query_image_b64: ImageB64 | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    filters: SearchFilters | None = None
    similarity_threshold: Annotated[float, Field(ge=-1.0, le=1.0)] | None = None
    reply_to: TopicName | None = None
    deadline: datetime | None = None

    @model_validator(mode="after")
    def _has_query(self) -> SearchRequest:
        if not (self.query_text and self.query_text.strip()) and not self.query_image_b64:
            raise ValueError("a search needs a non-empty query_text or a query_image_b64")
        return self


class ProductUpdated(_Event):
    """A product's current state, at ``version``; ``deleted`` removes it.

    A consumer applies an event only if ``version`` is newer than the one it
    holds, so replays and out-of-order deliveries are harmless. The feature is
    computed from the image when one is given, else from name and description.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    product_id: Identifier
    version: Annotated[int, Field(ge=0)]
    name: Annotated[str, Field(max_length=500)] = ""
    description: Annotated[str, Field(max_length=MAX_TEXT_LENGTH)] = ""
    category: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    price: Annotated[float, Field(ge=0)] | None = None
    image_b64: ImageB64 | None = None
    deleted: bool = False

    @model_validator(mode="after")
    def _has_content(self) -> ProductUpdated:
        if not self.deleted and not (self.name.strip() or self.description.strip() or self.image_b64):
            raise ValueError("a product needs a name, a description or an image unless deleted")
        return self


class ProductFeature(_Event):
    """A product's CLIP feature as published by the ingest role on the compacted features topic.

    Keyed by product_id, so compaction keeps the latest state per product. ``feature_b64``
    is the base64 of ``dim`` little-endian float16 values (absent for deletes). Search
    replicas apply it with the same newest-version-wins rule as product updates.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    product_id: Identifier
    version: Annotated[int, Field(ge=0)]
    model_id: str
    deleted: bool = False
    name: str = ""
    description: str = ""
    category: str | None = None
    price: float | None = None
    dim: Annotated[int, Field(ge=1)] | None = None
    feature_b64: str | None = None


class ResultItem(_Event):
    rank: Annotated[int, Field(ge=1)]
    product_id: str
    score: float
    name: str
    description: str
    category: str | None = None
    price: float | None = None


class Timings(_Event):
    """Milliseconds spent: waiting in the batch, encoding, ranking, in total since receipt."""

    queue_ms: float
    encode_ms: float
    rank_ms: float
    total_ms: float


class SearchResult(_Event):
    """Ranked products for one request, best first."""

    schema_version: Literal[1] = SCHEMA_VERSION
    status: Literal["ok"] = "ok"
    request_id: str
    items: list[ResultItem]
    model_id: str
    random_weights: bool = Field(
        default=False, description="True when the model has random weights: rankings carry no meaning beyond exact matches."
    )
    batch_size: int
    timings: Timings


ErrorCode = Literal[
    "invalid_json",
    "schema_violation",
    "unsupported_schema_version",
    "invalid_base64",
    "invalid_image",
    "image_too_large",
    "message_too_large",
    "empty_query",
    "top_k_out_of_range",
    "unknown_filter",
    "deadline_expired",
    "internal_error",
]


class ErrorDetail(_Event):
    code: ErrorCode
    message: str


class ErrorReply(_Event):
    """The typed answer to a request that could not be served."""

    schema_version: Literal[1] = SCHEMA_VERSION
    status: Literal["error"] = "error"
    request_id: str | None
    error: ErrorDetail


EXPORTED_MODELS: dict[str, type[BaseModel]] = {
    "search_request": SearchRequest,
    "product_updated": ProductUpdated,
    "product_feature": ProductFeature,
    "search_result": SearchResult,
    "error_reply": ErrorReply,
}

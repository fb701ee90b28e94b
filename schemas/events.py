"""Event models exchanged over Kafka (JSON on the wire, pydantic v2).

Every event carries ``schema_version``; a consumer rejects versions it does not
know with a typed error instead of guessing. Fields are strict about shape and
size so a producer learns about a mistake from the reply, not from silence.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from pydantic.config import JsonDict, JsonValue

SCHEMA_VERSION: Final = 1

MAX_ID_LENGTH = 128
MAX_QUERY_LENGTH = 1000
MAX_TEXT_LENGTH = 4000
MAX_TOPIC_LENGTH = 249
MAX_IMAGE_B64_LENGTH = 8 * 1024 * 1024

DEFAULT_MAX_TOP_K = 100
"""The service's default ``MAX_TOP_K`` (``consumer.config.settings.Settings.max_top_k``), published as ``top_k``'s ``maximum``.

The real limit is deployment configuration the schema cannot know. The exported schema states
the default, and says so in ``top_k``'s description, rather than leaving ``top_k`` unbounded:
a producer that validates against it is right for a default deployment, and a deployment that
raises the limit must tell its producers anyway. The Python model does not check it (the
parser does, against the configured value: ``top_k_out_of_range``).
"""

# --- Rules only the exported JSON Schema states (``json_schema_extra``) -------------------------
# The models check these in Python (validators, the parser); JSON Schema needs them spelled out
# so that a producer in another language that validates against schemas/json/ is told the same.
# Patterns use only syntax that means the same in ECMA-262 (what JSON Schema specifies) and in
# Python's ``re`` (what the ``jsonschema`` package uses).

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
"""The JSON Schema draft pydantic generates; every exported file names it in ``$schema``."""

NON_BLANK_PATTERN = r"[^\t\n\v\f\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
"""Matches a string with at least one character that Python's ``str.strip()`` keeps.

The class lists exactly the characters for which ``str.isspace()`` is true. ``\\S`` would not do:
ECMA-262's whitespace lacks U+001C..U+001F and U+0085 (which ``strip()`` removes, so the
service would reject what the schema accepts) and includes U+FEFF (which ``strip()`` keeps).
tests/domain/test_schemas.py checks the class against ``str.isspace`` for every code point, in both
regex dialects.
"""

_NO_LINE_TERMINATOR = {"not": {"pattern": r"[\n\r\u0085\u2028\u2029]"}}
"""Beside every ``^...$`` pattern: in Python's ``re`` (and Java, .NET, PCRE) ``$`` also matches
before a final newline, so ``"p1\\n"`` would pass ``^[A-Za-z0-9._:\\-]+$`` there while the
service rejects it. A ``not`` keeps the pattern free of look-arounds (which RE2-based
validators cannot compile)."""

_YEAR = r"(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"  # 0001-9999: Python has no year 0
_LEAP_YEAR = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|([02468][48]|[13579][26]|[2468]0)00)"
_MONTH_DAY = r"((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2])-(29|30)|(0[13578]|1[02])-31)"
_TIME = r"[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
DATE_TIME_PATTERN = rf"^({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29){_TIME}$"
"""The RFC 3339 date-times the service parses: ``format: date-time`` less year 0000 and leap
second 60, with the calendar (no February 30th) spelled out, because a 2020-12 validator treats
``format`` as an annotation unless told to assert it."""

Identifier = Annotated[
    str,
    Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[A-Za-z0-9._:\-]+$", json_schema_extra=_NO_LINE_TERMINATOR),
]
TopicName = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TOPIC_LENGTH, pattern=r"^[A-Za-z0-9._\-]+$", json_schema_extra=_NO_LINE_TERMINATOR),
]
ImageB64 = Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_B64_LENGTH)]
Deadline = Annotated[datetime, Field(json_schema_extra={"pattern": DATE_TIME_PATTERN, **_NO_LINE_TERMINATOR})]


def _exported(**rules: JsonValue) -> ConfigDict:
    """Config of a model exported to schemas/json: names the draft, adds cross-field ``rules``."""
    return ConfigDict(json_schema_extra={"$schema": JSON_SCHEMA_DIALECT, **rules})


def _non_blank(field: str) -> JsonDict:
    """Schema clause: ``field`` is present and a string with a character ``str.strip()`` keeps."""
    return {"required": [field], "properties": {field: {"type": "string", "pattern": NON_BLANK_PATTERN}}}


def _present(field: str) -> JsonDict:
    """Schema clause: ``field`` is present and a string (not null); with ``minLength: 1`` it is non-empty."""
    return {"required": [field], "properties": {field: {"type": "string"}}}


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchFilters(_Event):
    """Restricts the candidate products; unknown filter names are rejected.

    ``min_price`` must not exceed ``max_price``. JSON Schema cannot compare two values, so the
    exported schema does not check that rule: the service answers ``schema_violation``.
    """

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

    A request needs a ``query_text`` with a non-whitespace character or a
    ``query_image_b64`` (the schema's ``anyOf``). With both the query embedding
    is the normalised mean of the two. ``top_k`` and ``similarity_threshold``
    fall back to the service's configured defaults; ``deadline`` is an absolute
    UTC time after which the caller no longer wants an answer (it gets a timeout
    error). The whole message must also fit the service's MAX_MESSAGE_BYTES
    (8 MiB by default), a limit no JSON Schema keyword measures.
    """

    model_config = _exported(anyOf=[_non_blank("query_text"), _present("query_image_b64")])

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: Identifier
    query_text: Annotated[str, Field(max_length=MAX_QUERY_LENGTH)] | None = None
    query_image_b64: ImageB64 | None = None
    top_k: Annotated[int, Field(ge=1, json_schema_extra={"maximum": DEFAULT_MAX_TOP_K})] | None = Field(
        None,
        description=f"At most the service's MAX_TOP_K. The schema states the default, {DEFAULT_MAX_TOP_K}; "
        "a deployment may configure another limit (error top_k_out_of_range above it).",
    )
    filters: SearchFilters | None = None
    similarity_threshold: Annotated[float, Field(ge=-1.0, le=1.0)] | None = None
    reply_to: TopicName | None = None
    deadline: Deadline | None = None

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
    Unless ``deleted`` is true, a product needs a ``name`` or a ``description``
    with a non-whitespace character, or an ``image_b64`` (the schema's ``anyOf``).
    """

    model_config = _exported(
        anyOf=[
            {"required": ["deleted"], "properties": {"deleted": {"const": True}}},
            _non_blank("name"),
            _non_blank("description"),
            _present("image_b64"),
        ]
    )

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

    model_config = _exported()

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

    model_config = _exported()

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
    "reply_topic_not_allowed",
    "reply_undeliverable",
    "internal_error",
]


class ErrorDetail(_Event):
    code: ErrorCode
    message: str


class ErrorReply(_Event):
    """The typed answer to a request that could not be served."""

    model_config = _exported()

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

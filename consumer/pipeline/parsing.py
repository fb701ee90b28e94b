"""Raw message values to typed events, or to typed ``InputError``s; never anything else.

``parse_search`` and ``parse_product`` raise only ``InputError`` subclasses (each with its wire
error code) for bytes that cannot be served as sent; ``reply_address`` reads where an invalid
request's error reply may go, and ``error_reply`` builds that reply. No I/O, no Kafka.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from consumer.domain.errors import InputError, InvalidJson, MessageTooLarge, SchemaViolation, UnsupportedSchemaVersion
from schemas import SCHEMA_VERSION, ErrorDetail, ErrorReply, ProductUpdated, SearchRequest

_FILTER_FIELDS = {"category", "min_price", "max_price"}


def _load_json(raw: bytes | None, max_bytes: int) -> dict[str, Any]:
    if raw is None:
        raise InvalidJson("message has no value")
    if len(raw) > max_bytes:
        raise MessageTooLarge(f"message is {len(raw)} bytes, limit {max_bytes}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJson(f"value is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SchemaViolation("value must be a JSON object")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise UnsupportedSchemaVersion(f"schema_version {version!r} is not supported (supported: {SCHEMA_VERSION})")
    return data


def _schema_error(exc: ValidationError) -> InputError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "event"
    msg = f"{where}: {first['msg']}"
    if exc.error_count() > 1:
        msg += f" (and {exc.error_count() - 1} more)"
    return SchemaViolation(msg)


def parse_search(raw: bytes | None, max_bytes: int, max_top_k: int) -> SearchRequest:
    """Decode and validate a search request; raises a typed ``InputError``."""
    data = _load_json(raw, max_bytes)
    filters = data.get("filters")
    if isinstance(filters, dict) and (unknown := set(filters) - _FILTER_FIELDS):
        raise InputError(f"unknown filters: {sorted(unknown)}; known: {sorted(_FILTER_FIELDS)}", "unknown_filter")
    if isinstance(data.get("query_text"), str) and not data["query_text"].strip() and not data.get("query_image_b64"):
        raise InputError("query_text is empty and no query image was given", "empty_query")
    try:
        request = SearchRequest.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(exc) from None
    if request.top_k is not None and request.top_k > max_top_k:
        raise InputError(f"top_k {request.top_k} exceeds the limit {max_top_k}", "top_k_out_of_range")
    return request


def parse_product(raw: bytes | None, max_bytes: int) -> ProductUpdated:
    """Decode and validate a product update; raises a typed ``InputError``."""
    data = _load_json(raw, max_bytes)
    try:
        return ProductUpdated.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(exc) from None


def reply_address(raw: bytes | None) -> tuple[str | None, str | None]:
    """Best-effort (request_id, reply_to) from an invalid request, for its error reply."""
    try:
        data = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    rid, topic = data.get("request_id"), data.get("reply_to")
    rid = rid if isinstance(rid, str) and 0 < len(rid) <= 128 and rid.isprintable() else None
    ok_topic = isinstance(topic, str) and 0 < len(topic) <= 249 and all(c.isalnum() or c in "._-" for c in topic)
    return rid, topic if ok_topic else None


def error_reply(request_id: str | None, err: InputError) -> ErrorReply:
    """The typed error reply that answers a request with ``err``."""
    return ErrorReply(request_id=request_id, error=ErrorDetail(code=err.code, message=err.message))

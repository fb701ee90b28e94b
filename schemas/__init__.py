"""Versioned event schemas of the CLIP product-search service."""

from schemas.events import (
    EXPORTED_MODELS,
    SCHEMA_VERSION,
    ErrorDetail,
    ErrorReply,
    ProductFeature,
    ProductUpdated,
    ResultItem,
    SearchFilters,
    SearchRequest,
    SearchResult,
    Timings,
)

__all__ = [
    "EXPORTED_MODELS",
    "SCHEMA_VERSION",
    "ErrorDetail",
    "ErrorReply",
    "ProductFeature",
    "ProductUpdated",
    "ResultItem",
    "SearchFilters",
    "SearchRequest",
    "SearchResult",
    "Timings",
]

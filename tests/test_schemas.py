import json

import pytest
from pydantic import ValidationError

from schemas import ProductUpdated, SearchRequest
from schemas.export import JSON_DIR, rendered


def test_exported_json_schemas_match_models():
    files = rendered()
    assert sorted(files) == sorted(p.name for p in JSON_DIR.glob("*.json"))
    for name, text in files.items():
        assert (JSON_DIR / name).read_text() == text, f"{name} drifted: run python -m schemas.export"


def test_search_request_defaults_and_limits():
    req = SearchRequest.model_validate({"request_id": "r1", "query_text": "red shirt"})
    assert req.top_k is None and req.schema_version == 1
    with pytest.raises(ValidationError):
        SearchRequest.model_validate({"request_id": "r1"})
    with pytest.raises(ValidationError):
        SearchRequest.model_validate({"request_id": "r1", "query_text": "x", "top_k": 0})
    with pytest.raises(ValidationError):
        SearchRequest.model_validate({"request_id": "r1", "query_text": "x", "surprise": 1})
    with pytest.raises(ValidationError):
        SearchRequest.model_validate({"request_id": "r 1", "query_text": "x"})
    with pytest.raises(ValidationError):
        SearchRequest.model_validate({"request_id": "r1", "query_text": "x", "filters": {"min_price": 5, "max_price": 1}})


def test_product_updated_requires_content_unless_deleted():
    assert ProductUpdated.model_validate({"product_id": "p", "version": 2, "deleted": True}).deleted
    with pytest.raises(ValidationError):
        ProductUpdated.model_validate({"product_id": "p", "version": 2})
    with pytest.raises(ValidationError):
        ProductUpdated.model_validate({"product_id": "p", "version": -1, "name": "x"})


def test_schema_files_are_valid_json_with_ids():
    for path in JSON_DIR.glob("*.json"):
        doc = json.loads(path.read_text())
        assert doc["$id"].startswith("urn:clip-search:")
        assert doc["type"] == "object"

import functools
import json
import re
import sys

import jsonschema
import pytest
import regress
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from pydantic import ValidationError

from consumer.config.settings import Settings
from consumer.domain.errors import InputError
from consumer.pipeline.parsing import parse_product, parse_search
from schemas import EXPORTED_MODELS, SCHEMA_VERSION, ProductUpdated, SearchRequest
from schemas.events import DATE_TIME_PATTERN, DEFAULT_MAX_TOP_K, JSON_SCHEMA_DIALECT, NON_BLANK_PATTERN
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


# --- The exported schemas against the service ------------------------------------------------
# A producer in another language validates against schemas/json/; these tests hold the files to
# the service: whatever a schema accepts the service accepts (documents generated from the
# schema), and hand-written documents the service rejects are rejected by the schema too, both
# with Python's ``re`` (the ``jsonschema`` package) and with ECMA-262 patterns (what JSON Schema
# specifies; ``regress``, the engine check-jsonschema uses by default).

SCHEMA_NAMES = sorted(p.name.split(".")[0] for p in JSON_DIR.glob("*.json"))
# The service's defaults: the schema's top_k maximum is the default MAX_TOP_K (schemas.events.DEFAULT_MAX_TOP_K).
MAX_BYTES = Settings.model_fields["max_message_bytes"].default
MAX_TOP_K = Settings.model_fields["max_top_k"].default


def _schema(name: str) -> dict:
    return json.loads((JSON_DIR / f"{name}.v{SCHEMA_VERSION}.schema.json").read_text())


@functools.cache
def _ecma_regex(pattern: str) -> regress.Regex:
    return regress.Regex(pattern, flags="u")


def _ecma_pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and _ecma_regex(pattern).find(instance) is None:
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r} (ECMA-262)")


@functools.cache
def _validators(name: str) -> tuple:
    """The schema's draft (its ``$schema``) with Python ``re`` patterns, and the same with ECMA-262 patterns."""
    schema = _schema(name)
    cls = jsonschema.validators.validator_for(schema, default=None)
    assert cls is jsonschema.Draft202012Validator, f"{name}: unexpected $schema {schema.get('$schema')!r}"
    cls.check_schema(schema)
    ecma = jsonschema.validators.extend(cls, {"pattern": _ecma_pattern})
    return cls(schema), ecma(schema)


@functools.cache
def _documents(name: str):
    return from_schema(_schema(name))


# The service's inputs go through its Kafka parsers (which add rules to the models'); the other
# schemas describe what it publishes, and are held to their models.
SERVICE_PARSERS = {
    "search_request": lambda raw: parse_search(raw, MAX_BYTES, MAX_TOP_K),
    "product_updated": lambda raw: parse_product(raw, MAX_BYTES),
}


def _service_parse(name: str, doc) -> object:
    """What the service does with ``doc`` on the wire."""
    raw = json.dumps(doc).encode()
    if name in SERVICE_PARSERS:
        return SERVICE_PARSERS[name](raw)
    return EXPORTED_MODELS[name].model_validate(json.loads(raw))


def _beyond_json_schema(name: str, doc) -> bool:
    """Documents a schema accepts that the service rejects by a rule JSON Schema cannot state.

    Only one: SearchFilters' min_price <= max_price (comparing two values). The schema says so in
    its description; ``test_min_price_above_max_price_is_the_stated_gap`` pins the gap down.
    """
    filters = (doc.get("filters") if name == "search_request" else None) or {}
    low, high = filters.get("min_price"), filters.get("max_price")
    return low is not None and high is not None and low > high


def test_schemas_name_their_draft_and_the_default_top_k_limit():
    for name in SCHEMA_NAMES:
        assert _schema(name)["$schema"] == JSON_SCHEMA_DIALECT
    assert DEFAULT_MAX_TOP_K == MAX_TOP_K
    top_k = _schema("search_request")["properties"]["top_k"]
    assert top_k["anyOf"][0]["maximum"] == MAX_TOP_K and str(MAX_TOP_K) in top_k["description"]


def _check_round_trip(name: str, data) -> None:
    doc = data.draw(_documents(name), label="document")
    assume(not _beyond_json_schema(name, doc))
    for validator in _validators(name):
        assert validator.is_valid(doc), next(validator.iter_errors(doc)).message
    _service_parse(name, doc)


_HYPOTHESIS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much]}


@pytest.mark.slow  # hypothesis-jsonschema generation: ~15 s for both schemas
@pytest.mark.parametrize("name", [n for n in SCHEMA_NAMES if n in SERVICE_PARSERS])
@settings(max_examples=200, **_HYPOTHESIS)
@given(data=st.data())
def test_service_accepts_every_input_its_schema_accepts(name, data):
    _check_round_trip(name, data)


# Fewer examples: hypothesis-jsonschema is slow on nested objects (search_result's items), and
# these schemas carry no rule beyond their models' field constraints.
@pytest.mark.slow  # hypothesis-jsonschema generation: ~6 s for the four schemas
@pytest.mark.parametrize("name", [n for n in SCHEMA_NAMES if n not in SERVICE_PARSERS])
@settings(max_examples=50, **_HYPOTHESIS)
@given(data=st.data())
def test_models_accept_every_output_their_schema_accepts(name, data):
    _check_round_trip(name, data)


def test_min_price_above_max_price_is_the_stated_gap():
    doc = {"request_id": "r-1", "query_text": "shirt", "filters": {"min_price": 5, "max_price": 1}}
    assert _beyond_json_schema("search_request", doc)
    for validator in _validators("search_request"):
        assert validator.is_valid(doc)
    with pytest.raises(InputError, match="min_price must not exceed max_price"):
        _service_parse("search_request", doc)
    assert "JSON Schema cannot compare" in _schema("search_request")["$defs"]["SearchFilters"]["description"]


def _with(base: dict, **changes) -> dict:
    return {**base, **changes}


def _without(base: dict, *keys: str) -> dict:
    return {k: v for k, v in base.items() if k not in keys}


_SEARCH = {"request_id": "r-1", "query_text": "red shirt"}
_PRODUCT = {"product_id": "p-1", "version": 3, "name": "Mug"}
_FEATURE = {"product_id": "p-1", "version": 3, "model_id": "clip"}
_RESULT = {
    "schema_version": 1,
    "status": "ok",
    "request_id": "r-1",
    "items": [{"rank": 1, "product_id": "p-1", "score": 0.5, "name": "Mug", "description": "", "category": None, "price": None}],
    "model_id": "clip",
    "random_weights": False,
    "batch_size": 1,
    "timings": {"queue_ms": 0.0, "encode_ms": 1.0, "rank_ms": 1.0, "total_ms": 2.0},
}
_ERROR = {"schema_version": 1, "status": "error", "request_id": "r-1", "error": {"code": "empty_query", "message": "no query"}}
# Characters str.strip() removes that ECMA-262's \s does not know: a schema with \S would let them through.
_PY_ONLY_SPACE = "\x1c\x1d\x1e\x1f\x85"

REJECTED = {
    "search_request": {
        "no query": {"request_id": "r-1"},
        "empty query_text": _with(_SEARCH, query_text=""),
        "blank query_text": _with(_SEARCH, query_text=" \t\r\n\v\f"),
        "unicode-blank query_text": _with(_SEARCH, query_text="\u00a0\u1680\u2003\u2028\u2029\u202f\u205f\u3000"),
        "query_text blank only to python": _with(_SEARCH, query_text=_PY_ONLY_SPACE),
        "null query_text, no image": _with(_SEARCH, query_text=None),
        "blank query_text, null image": _with(_SEARCH, query_text=" ", query_image_b64=None),
        "empty image": {"request_id": "r-1", "query_image_b64": ""},
        "query_text too long": _with(_SEARCH, query_text="x" * 1001),
        "unknown filter": _with(_SEARCH, filters={"colour": "red"}),
        "negative min_price": _with(_SEARCH, filters={"min_price": -1}),
        "empty category filter": _with(_SEARCH, filters={"category": ""}),
        "top_k 0": _with(_SEARCH, top_k=0),
        "top_k above the default MAX_TOP_K": _with(_SEARCH, top_k=MAX_TOP_K + 1),
        "fractional top_k": _with(_SEARCH, top_k=2.5),
        "similarity_threshold above 1": _with(_SEARCH, similarity_threshold=1.5),
        "schema_version 2": _with(_SEARCH, schema_version=2),
        "schema_version as text": _with(_SEARCH, schema_version="1"),
        "schema_version null": _with(_SEARCH, schema_version=None),
        "no request_id": _without(_SEARCH, "request_id"),
        "empty request_id": _with(_SEARCH, request_id=""),
        "request_id with a space": _with(_SEARCH, request_id="r 1"),
        "request_id with a trailing newline": _with(_SEARCH, request_id="r-1\n"),
        "request_id with a non-ASCII letter": _with(_SEARCH, request_id="r-é"),
        "request_id too long": _with(_SEARCH, request_id="r" * 129),
        "reply_to with a colon": _with(_SEARCH, reply_to="replies:1"),
        "reply_to with a trailing newline": _with(_SEARCH, reply_to="replies\n"),
        "deadline not a date-time": _with(_SEARCH, deadline="tomorrow"),
        "deadline on February 30th": _with(_SEARCH, deadline="2024-02-30T00:00:00Z"),
        "deadline on February 29th of a common year": _with(_SEARCH, deadline="1900-02-29T00:00:00Z"),
        "deadline in year 0": _with(_SEARCH, deadline="0000-01-01T00:00:00Z"),
        "deadline on a leap second": _with(_SEARCH, deadline="2016-12-31T23:59:60Z"),
        "deadline with a trailing newline": _with(_SEARCH, deadline="2030-01-01T00:00:00Z\n"),
        "extra field": _with(_SEARCH, surprise=1),
        "not an object": [_SEARCH],
    },
    "product_updated": {
        "no content": {"product_id": "p-1", "version": 3},
        "deleted false, no content": {"product_id": "p-1", "version": 3, "deleted": False},
        "blank name and description": _with(_PRODUCT, name=" \n", description="\u3000\u2028"),
        "name blank only to python": _with(_PRODUCT, name=_PY_ONLY_SPACE),
        "blank name, null image": _with(_PRODUCT, name="\t", image_b64=None),
        "empty image": {"product_id": "p-1", "version": 3, "image_b64": ""},
        "null deleted": _with(_PRODUCT, deleted=None),
        "negative version": _with(_PRODUCT, version=-1),
        "fractional version": _with(_PRODUCT, version=1.5),
        "no version": _without(_PRODUCT, "version"),
        "negative price": _with(_PRODUCT, price=-0.01),
        "name too long": _with(_PRODUCT, name="x" * 501),
        "null name": _with(_PRODUCT, name=None, description="Green"),
        "product_id with a slash": _with(_PRODUCT, product_id="p/1"),
        "product_id with a trailing newline": _with(_PRODUCT, product_id="p-1\n"),
        "schema_version 2": _with(_PRODUCT, schema_version=2),
        "extra field": _with(_PRODUCT, colour="green"),
    },
    "product_feature": {
        "no model_id": _without(_FEATURE, "model_id"),
        "dim 0": _with(_FEATURE, dim=0),
        "negative version": _with(_FEATURE, version=-1),
        "product_id with a trailing newline": _with(_FEATURE, product_id="p-1\n"),
        "schema_version 2": _with(_FEATURE, schema_version=2),
        "extra field": _with(_FEATURE, vector=[0.1]),
    },
    "search_result": {
        "status error": _with(_RESULT, status="error"),
        "rank 0": _with(_RESULT, items=[{**_RESULT["items"][0], "rank": 0}]),
        "no timings": _without(_RESULT, "timings"),
        "schema_version 2": _with(_RESULT, schema_version=2),
        "extra field": _with(_RESULT, extra=True),
    },
    "error_reply": {
        "unknown code": _with(_ERROR, error={"code": "oops", "message": "x"}),
        "no error": _without(_ERROR, "error"),
        "status ok": _with(_ERROR, status="ok"),
        "schema_version 2": _with(_ERROR, schema_version=2),
        "extra field": _with(_ERROR, hint="x"),
    },
}


def test_every_schema_has_a_rejection_corpus():
    assert sorted(REJECTED) == SCHEMA_NAMES


@pytest.mark.parametrize(
    ("name", "doc"), [pytest.param(n, d, id=f"{n}: {label}") for n, docs in REJECTED.items() for label, d in docs.items()]
)
def test_schema_rejects_what_the_service_rejects(name, doc):
    with pytest.raises((InputError, ValidationError)):
        _service_parse(name, doc)
    for validator in _validators(name):
        assert not validator.is_valid(doc), f"{type(validator).__name__} accepts it"


def test_non_blank_pattern_is_str_strip_in_both_regex_dialects():
    every_char = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)
    kept = "".join(c for c in every_char if not c.isspace())
    runs = f"(?:{NON_BLANK_PATTERN})+"  # one match per stretch between whitespace characters
    assert "".join(re.findall(runs, every_char)) == kept
    utf8 = every_char.encode()  # regress reports matches as UTF-8 byte slices
    assert "".join(utf8[m.group(0)].decode() for m in _ecma_regex(runs).find_iter(every_char)) == kept


@settings(max_examples=300, deadline=None)
@given(
    year=st.integers(0, 9999),
    month=st.integers(0, 13),
    day=st.integers(0, 32),
    clock=st.tuples(st.integers(0, 24), st.integers(0, 60), st.integers(0, 61)),
    sep=st.sampled_from("Tt"),
    fraction=st.sampled_from(["", ".5", ".123456", ".1234567890"]),
    offset=st.sampled_from(["Z", "z", "+00:00", "-23:59", "+14:30", "+24:00", "-05:60"]),
)
def test_date_time_pattern_matches_exactly_what_the_service_parses(year, month, day, clock, sep, fraction, offset):
    text = f"{year:04d}-{month:02d}-{day:02d}{sep}{clock[0]:02d}:{clock[1]:02d}:{clock[2]:02d}{fraction}{offset}"
    try:
        SearchRequest.model_validate({"request_id": "r", "query_text": "x", "deadline": text})
        parsed = True
    except ValidationError:
        parsed = False
    assert bool(re.search(DATE_TIME_PATTERN, text)) is parsed
    assert (_ecma_regex(DATE_TIME_PATTERN).find(text) is not None) is parsed

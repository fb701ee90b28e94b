"""The features topic's records: built from applied product updates, applied to a ``FeatureIndex``.

``feature_event`` is what the ingest role publishes for each applied update (a tombstone record for
a delete); ``apply_feature_events`` is how a search replica reads them back. Vectors use the one wire
format of ``consumer.domain.codecs``. Nothing here knows about Kafka.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import TypeAdapter, ValidationError

from consumer.domain.codecs import decode_features, encode_feature
from consumer.index.feature_index import FeatureIndex, ProductMeta
from schemas import ProductFeature, ProductUpdated

_RECORDS = TypeAdapter(list[ProductFeature])


def parse_feature_records(values: Sequence[bytes | None]) -> tuple[list[ProductFeature], list[int]]:
    """The features-topic records of ``values`` that validate, in order, and the positions of those that do not.

    When every value is one JSON object (starts with ``{``, ends with ``}``), all are validated as one
    JSON array in a single pydantic call (a quarter to a third less CPU per record than one call each,
    measured on 4,096 ViT-B/32 records) and kept only if that yields exactly one event per value; any
    other batch is validated record by record, which tells the invalid ones apart. The same records
    validate either way (tests/pipeline/test_feature_records.py).
    """
    if not values:
        return [], []
    if all(v and v.lstrip().startswith(b"{") and v.rstrip().endswith(b"}") for v in values):
        try:
            bulk = _RECORDS.validate_json(b"[" + b",".join(v for v in values if v) + b"]")
        except ValidationError:
            bulk = []
        if len(bulk) == len(values):
            return bulk, []
    events: list[ProductFeature] = []
    invalid: list[int] = []
    for i, value in enumerate(values):
        try:
            events.append(ProductFeature.model_validate_json(value or b""))
        except ValidationError:
            invalid.append(i)
    return events, invalid


def feature_event(update: ProductUpdated, feature: np.ndarray | None, model_id: str) -> ProductFeature:
    """The features-topic record for an applied update (float16 on the wire)."""
    if update.deleted or feature is None:
        return ProductFeature(product_id=update.product_id, version=update.version, model_id=model_id, deleted=True)
    dim, feature_b64 = encode_feature(feature)
    return ProductFeature(
        product_id=update.product_id,
        version=update.version,
        model_id=model_id,
        name=update.name,
        description=update.description,
        category=update.category,
        price=update.price,
        dim=dim,
        feature_b64=feature_b64,
    )


@dataclass
class FeatureApplyReport:
    """What ``apply_feature_events`` did: rows applied (upserts and deletes), that changed nothing (not newer), of another model, unusable."""

    applied: int = 0
    unchanged: int = 0
    other_model: int = 0
    invalid: list[str] = field(default_factory=list)


class _UpsertRun:
    """Consecutive upsert records, applied to the index in one vectorised write."""

    def __init__(self, index: FeatureIndex, report: FeatureApplyReport) -> None:
        self.index = index
        self.report = report
        self.events: list[ProductFeature] = []

    def flush(self) -> None:
        if not self.events:
            return
        matrix, rejected = decode_features([e.feature_b64 or "" for e in self.events], self.index.dim)
        skip = set(rejected)
        self.report.invalid.extend(self.events[i].product_id for i in rejected)
        metas = [
            ProductMeta(e.product_id, e.version, e.name, e.description, e.category, e.price)
            for i, e in enumerate(self.events)
            if i not in skip
        ]
        self.events.clear()
        if metas:
            done = self.index.upsert_many(metas, matrix)
            self.report.applied += done.applied
            self.report.unchanged += done.stale
            self.report.invalid.extend(done.invalid)


def apply_feature_events(index: FeatureIndex, events: Sequence[ProductFeature], model_id: str) -> FeatureApplyReport:
    """Apply features-topic records to ``index`` in order, upserts in vectorised runs.

    Records of another model are skipped; a feature that is not ``index.dim`` float16 values,
    or has a zero or non-finite norm, is reported in ``invalid`` and not applied.
    """
    report = FeatureApplyReport()
    run = _UpsertRun(index, report)
    for event in events:
        if event.model_id != model_id:
            report.other_model += 1
        elif event.deleted or not event.feature_b64:
            run.flush()
            if index.delete(event.product_id, event.version):
                report.applied += 1
            else:
                report.unchanged += 1
        else:
            run.events.append(event)
    run.flush()
    return report

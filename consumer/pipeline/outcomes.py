"""What became of each record of a batch: one typed outcome per record.

``BatchReport`` is the only thing batch metrics are recorded from (``ServiceMetrics.observe_batch``);
nothing re-reads the messages the service built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import NamedTuple, Protocol

from consumer.domain.errors import Owner, owner_of
from schemas import Timings


class Record(Protocol):
    """What the pipeline reads of a consumed record (aiokafka's ``ConsumerRecord`` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class Partition(NamedTuple):
    """A topic partition (equal to aiokafka's ``TopicPartition`` with the same fields)."""

    topic: str
    partition: int


class Outcome(StrEnum):
    RESULT = "result"
    """A search answered with ranked results."""
    ERROR_REPLY = "error_reply"
    """A search answered with a typed error; its record is dead-lettered too."""
    DEAD_LETTER = "dead_letter"
    """Dead-lettered only: no reply address could be read, or a product update was rejected."""
    DUPLICATE = "duplicate"
    """A redelivered request_id, answered with its first reply."""
    APPLIED = "applied"
    """A product update stored and/or indexed."""
    STALE = "stale"
    """A product update older than (or as old as) the version held."""
    RETRY = "retry"
    """Left for a retry: nothing is published or committed for it now."""


DEAD_LETTERED = frozenset({Outcome.ERROR_REPLY, Outcome.DEAD_LETTER})


@dataclass(frozen=True)
class RecordOutcome:
    """The outcome of one record; ``code`` is its wire error code (``schemas.ErrorCode``) when it was rejected."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    outcome: Outcome
    code: str | None = None

    @classmethod
    def of(cls, record: Record, outcome: Outcome, code: str | None = None) -> RecordOutcome:
        timestamp = record.timestamp if record.timestamp and record.timestamp > 0 else None
        return cls(record.topic, record.partition, record.offset, timestamp, outcome, code)

    @property
    def owner(self) -> Owner | None:
        return None if self.code is None else owner_of(self.code)


@dataclass
class BatchReport:
    """What one batch produced: an outcome per record, what to commit and what to retry."""

    messages: int = 0
    outcomes: list[RecordOutcome] = field(default_factory=list)
    offsets: dict[Partition, int] = field(default_factory=dict)
    """Next offset to commit per (topic, partition)."""
    rewind: dict[Partition, int] = field(default_factory=dict)
    """Partitions whose records could not be handled (e.g. store down): seek back here and retry later."""
    defer: dict[Partition, int] = field(default_factory=dict)
    """Partitions whose records from this offset on were left for the next batch (``MAX_IMAGES_PER_BATCH``):
    commit up to it and read on from it, at once."""
    retry_reasons: dict[Partition, str] = field(default_factory=dict)
    """Why each partition in ``rewind`` is retried (reported by ``/readyz`` until it succeeds)."""
    search_timings: Timings | None = None
    """Encode and rank time of the batch's searches (from its first result), if it had any."""

    def count(self, *kinds: Outcome) -> int:
        return sum(o.outcome in kinds for o in self.outcomes)

    @property
    def replies(self) -> int:
        return self.count(Outcome.RESULT)

    @property
    def error_replies(self) -> int:
        return self.count(Outcome.ERROR_REPLY)

    @property
    def dead_letters(self) -> int:
        return self.count(*DEAD_LETTERED)

    @property
    def duplicates(self) -> int:
        return self.count(Outcome.DUPLICATE)

    @property
    def products_applied(self) -> int:
        return self.count(Outcome.APPLIED)

    @property
    def products_stale(self) -> int:
        return self.count(Outcome.STALE)

    def dead_letter_instead(self, record: Record, code: str) -> None:
        """The reply to ``record`` could not be delivered: it was dead-lettered with ``code`` instead."""
        for i, o in enumerate(self.outcomes):
            if (o.topic, o.partition, o.offset) == (record.topic, record.partition, record.offset):
                self.outcomes[i] = replace(o, outcome=Outcome.DEAD_LETTER, code=code)

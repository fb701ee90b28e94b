"""Which assigned partitions are paused, and why: a retry backoff after failed records, or memory backpressure.

``retry_later`` seeks a partition back and pauses it for ``RetryPolicy.delay(failures)`` (failures
in a row of that partition); ``succeeded`` forgets its failures once a batch of it is committed;
``resume_due`` resumes partitions whose pause is over (not while memory backpressure holds every
partition). ``reason`` is what ``/readyz`` reports while any assigned partition waits for a retry.
"""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.domain.retry import RetryPolicy


class PartitionPauses:
    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self._retry_at: dict[TopicPartition, float] = {}
        self._failures: dict[TopicPartition, int] = {}
        self._reasons: dict[TopicPartition, str] = {}

    def retry_later(self, consumer: AIOKafkaConsumer, rewind: dict[TopicPartition, int], reasons: dict[TopicPartition, str]) -> None:
        """Seek each still-assigned partition of ``rewind`` back to its offset and pause it for its backoff."""
        live = {tp: offset for tp, offset in rewind.items() if tp in consumer.assignment()}
        for tp, offset in live.items():
            consumer.seek(tp, offset)
            self._failures[tp] = self._failures.get(tp, 0) + 1
            self._retry_at[tp] = time.monotonic() + self.policy.delay(self._failures[tp])
            self._reasons[tp] = reasons.get(tp, "processing failed")
        consumer.pause(*live)

    def succeeded(self, tp: TopicPartition) -> None:
        self._failures.pop(tp, None)
        self._reasons.pop(tp, None)

    def waiting(self) -> set[TopicPartition]:
        """Partitions still inside their retry pause."""
        return set(self._retry_at)

    def resume_due(self, consumer: AIOKafkaConsumer) -> None:
        now = time.monotonic()
        due = [tp for tp, at in self._retry_at.items() if at <= now]
        for tp in due:
            del self._retry_at[tp]
        assigned = consumer.assignment()
        if due := [tp for tp in due if tp in assigned]:
            consumer.resume(*due)

    def retrying(self, assigned: set[TopicPartition]) -> int:
        return sum(tp in assigned for tp in self._reasons)

    def reason(self, assigned: set[TopicPartition]) -> str | None:
        """Why some assigned partition waits for a retry, or None; forgets partitions no longer assigned."""
        for tp in [tp for tp in self._reasons if tp not in assigned]:
            del self._reasons[tp]
        if not self._reasons:
            return None
        tp, reason = next(iter(self._reasons.items()))
        more = f" (and {len(self._reasons) - 1} more partitions)" if len(self._reasons) > 1 else ""
        return f"retrying {tp.topic}[{tp.partition}] after: {reason}{more}"

"""Kafka plumbing: client construction and acknowledged publishing (aiokafka).

The rest of the service sees ``Outbound`` messages and ``publish_all``; only
this module and the service wiring import aiokafka.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from consumer.config.settings import Settings
from consumer.config.security import kafka_security_options


@dataclass(frozen=True)
class Outbound:
    """One message to publish.

    ``give_up_on``: errors on which this message is abandoned and returned to the caller instead of
    failing the whole publish (a reply's ``REFUSED_TOPIC + TOO_LARGE``: its client chose its topic
    and size). ``source``: the record it answers, opaque here.
    """

    topic: str
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    give_up_on: tuple[type[BaseException], ...] = ()
    source: Any = field(default=None, compare=False, repr=False)


TOO_LARGE: tuple[type[BaseException], ...] = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
"""The message is larger than the producer or the broker accepts."""
REFUSED_TOPIC: tuple[type[BaseException], ...] = (
    UnknownTopicOrPartitionError,
    TopicAuthorizationFailedError,
    InvalidTopicError,
    PolicyViolationError,
    TimeoutError,
)
"""The topic is unknown (or not in the metadata in time), forbidden, or refused by a broker policy."""


def client_options(settings: Settings) -> dict:
    """Connection options shared by every consumer and producer, security included (holds secrets: never log)."""
    return {"bootstrap_servers": settings.kafka_bootstrap_servers, "client_id": settings.kafka_client_id} | kafka_security_options(settings)


def make_consumer(settings: Settings, group_id: str, **overrides: object) -> AIOKafkaConsumer:
    """A consumer with manual commits that starts from the earliest offset for a new group."""
    options = client_options(settings) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "fetch_max_bytes": max(settings.max_message_bytes * 2, 52428800),
        "max_partition_fetch_bytes": max(settings.max_message_bytes + 65536, 1048576),
    }
    return AIOKafkaConsumer(**(options | overrides))


def make_producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
    """A producer whose sends count as delivered only when all in-sync replicas have them."""
    options = client_options(settings) | {
        "acks": "all",
        "max_request_size": settings.kafka_max_request_size,
        "linger_ms": 0,
    }
    return AIOKafkaProducer(**(options | overrides))


async def publish_all(producer: AIOKafkaProducer, messages: list[Outbound]) -> None:
    """Send every message and return once the broker acknowledged all of them (raises otherwise)."""
    failed = await publish_each(producer, messages, topic_timeout_s=None)
    if failed:
        raise failed[0][1]


async def publish_each(
    producer: AIOKafkaProducer, messages: list[Outbound], topic_timeout_s: float | None
) -> list[tuple[Outbound, BaseException]]:
    """Send every message; return those abandoned on one of their ``give_up_on`` errors, with the error.

    A message that may give up on ``TimeoutError`` waits at most ``topic_timeout_s`` for its topic's
    metadata (None: the producer's own request timeout). Any other failure raises, so the caller
    retries the publish (at least once). Returns when every other message is acknowledged.
    """
    sent: list[tuple[Outbound, asyncio.Future]] = []
    failed: list[tuple[Outbound, BaseException]] = []
    for m in messages:
        send = producer.send(m.topic, value=m.value, key=m.key, headers=m.headers or None)
        try:
            if topic_timeout_s is not None and TimeoutError in m.give_up_on:
                future = await asyncio.wait_for(send, topic_timeout_s)
            else:
                future = await send
        except Exception as exc:
            if not isinstance(exc, m.give_up_on):
                raise
            failed.append((m, exc))
            continue
        sent.append((m, future))
    results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
    for (m, _), result in zip(sent, results):
        if isinstance(result, BaseException):
            if not isinstance(result, m.give_up_on):
                raise result
            failed.append((m, result))
    return failed

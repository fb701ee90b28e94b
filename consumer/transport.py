"""Kafka plumbing: client construction and acknowledged publishing (aiokafka).

The rest of the service sees ``Outbound`` messages and ``publish_all``; only
this module and the service wiring import aiokafka.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.config import Settings
from consumer.security import kafka_security_options


@dataclass(frozen=True)
class Outbound:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


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
    futures = [
        await producer.send(m.topic, value=m.value, key=m.key, headers=m.headers or None) for m in messages
    ]
    if futures:
        await asyncio.gather(*futures)

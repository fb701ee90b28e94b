"""Acknowledged publishing (aiokafka): ``publish_all`` and ``publish_each``.

The layers above see ``Outbound`` messages (``consumer.domain.messages``) and ``publish_all`` /
``publish_each``; only the ``kafka`` layer imports aiokafka. Clients are built and started by
``consumer.kafka.clients``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from consumer.domain.messages import Outbound

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


def _gives_up_on(message: Outbound) -> tuple[type[BaseException], ...]:
    """The broker refusals that abandon ``message`` rather than fail the publish (``Outbound``'s contract)."""
    return (TOO_LARGE if message.reply else ()) + (REFUSED_TOPIC if message.client_topic else ())


async def publish_all(producer: AIOKafkaProducer, messages: list[Outbound]) -> None:
    """Send every message and return once the broker acknowledged all of them (raises otherwise)."""
    failed = await publish_each(producer, messages, topic_timeout_s=None)
    if failed:
        raise failed[0][1]


async def publish_each(
    producer: AIOKafkaProducer, messages: list[Outbound], topic_timeout_s: float | None
) -> list[tuple[Outbound, BaseException]]:
    """Send every message; return those abandoned on a refusal their ``Outbound`` flags allow, with the error.

    A message to a client-named topic waits at most ``topic_timeout_s`` for that topic's metadata
    (None: the producer's own request timeout). Any other failure raises, so the caller
    retries the publish (at least once). Returns when every other message is acknowledged.
    """
    sent: list[tuple[Outbound, asyncio.Future[Any]]] = []
    failed: list[tuple[Outbound, BaseException]] = []
    for m in messages:
        send = producer.send(m.topic, value=m.value, key=m.key, headers=m.headers or None)
        try:
            if topic_timeout_s is not None and m.client_topic:
                future = await asyncio.wait_for(send, topic_timeout_s)
            else:
                future = await send
        except Exception as exc:
            if not isinstance(exc, _gives_up_on(m)):
                raise
            failed.append((m, exc))
            continue
        sent.append((m, future))
    results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
    for (m, _), result in zip(sent, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, _gives_up_on(m)):
                raise result
            failed.append((m, result))
    return failed

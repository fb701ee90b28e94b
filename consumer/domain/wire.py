"""The names on the wire, defined once: event types, Kafka header names, the JSON content type.

Header names are ``str`` (as aiokafka takes them); header values are bytes, so senders encode
these names' values (``EventType.SEARCH_RESULT.encode()``) and readers compare decoded values or
encoded constants. Changing any value here changes the wire format that clients and dashboards read.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

JSON_CONTENT_TYPE = "application/json"
"""The ``content-type`` of every event the service publishes (and of its HTTP JSON answers)."""


class EventType(StrEnum):
    """The ``event-type`` header of each published event (the event's schema name and version)."""

    SEARCH_RESULT = "search_result.v1"
    ERROR_REPLY = "error_reply.v1"
    PRODUCT_FEATURE = "product_feature.v1"


class Header:
    """Kafka header names (plain ``str`` constants: aiokafka's record builder takes exactly ``str`` keys).

    Replies carry ``CORRELATION_ID`` (the request_id), ``CONTENT_TYPE`` and ``EVENT_TYPE``; features
    records carry ``CONTENT_TYPE`` and ``EVENT_TYPE``; dead letters carry the ``ERROR_*`` and ``SOURCE_*``
    headers (why it failed, who owns the failure, and the record's topic, partition and offset).
    """

    CONTENT_TYPE: Final = "content-type"
    EVENT_TYPE: Final = "event-type"
    CORRELATION_ID: Final = "correlation_id"
    ERROR_CODE: Final = "error.code"
    ERROR_MESSAGE: Final = "error.message"
    ERROR_OWNER: Final = "error.owner"
    SOURCE_TOPIC: Final = "source.topic"
    SOURCE_PARTITION: Final = "source.partition"
    SOURCE_OFFSET: Final = "source.offset"

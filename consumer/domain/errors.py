"""Who owns a failure, and the wire error code it travels as.

``InputError`` and its subclasses are *client* errors: the event cannot be served as sent
(unparsable bytes, a schema violation, a bad image, a reply address the service may not
or cannot write). They are answered with a typed error reply and/or a dead letter, the
offset is committed, and they never count toward stopping a replica, whatever their share
of the traffic.

``ServiceFailure`` is the *service's* own failure on one record (the encoder or ranking
raised, a bug): retried with backoff, then isolated and dead-lettered as ``internal_error``.
A dependency that is down (``is_dependency_outage``) is retried for as long as it is down
and never dead-letters anything.
"""

from __future__ import annotations

from typing import Literal

Owner = Literal["client", "service"]


class InputError(Exception):
    """An event that cannot be served as sent. ``code`` is one of ``schemas.events.ErrorCode``."""

    code = "schema_violation"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])

    @property
    def owner(self) -> Owner:
        return owner_of(self.code)


class InvalidJson(InputError):
    code = "invalid_json"


class SchemaViolation(InputError):
    code = "schema_violation"


class UnsupportedSchemaVersion(InputError):
    code = "unsupported_schema_version"


class InvalidBase64(InputError):
    code = "invalid_base64"


class InvalidImage(InputError):
    code = "invalid_image"


class ImageTooLarge(InputError):
    code = "image_too_large"


class MessageTooLarge(InputError):
    code = "message_too_large"


class DeadlineExpired(InputError):
    code = "deadline_expired"


class ReplyTopicNotAllowed(InputError):
    """``reply_to`` names one of the service's own topics, or does not match ``REPLY_TOPIC_PATTERN``."""

    code = "reply_topic_not_allowed"


class ReplyUndeliverable(InputError):
    """The broker would not take the reply (unknown topic, not authorised, too large): it is dead-lettered instead."""

    code = "reply_undeliverable"


class ServiceFailure(InputError):
    """Processing this record kept failing inside the service; it was isolated and dead-lettered."""

    code = "internal_error"


CLIENT_CODES = frozenset(
    {
        "invalid_json",
        "schema_violation",
        "unsupported_schema_version",
        "invalid_base64",
        "invalid_image",
        "image_too_large",
        "message_too_large",
        "empty_query",
        "top_k_out_of_range",
        "unknown_filter",
        "deadline_expired",
        "reply_topic_not_allowed",
        "reply_undeliverable",
    }
)
"""Error codes a client caused; every other code (``internal_error``) is the service's."""


def owner_of(code: str) -> Owner:
    return "client" if code in CLIENT_CODES else "service"


def is_dependency_outage(exc: BaseException) -> bool:
    """True for failures of something the service depends on being reachable (broker, store, network).

    These are retried for as long as they last; they say nothing about the record being processed.
    """
    from aiokafka.errors import KafkaError
    from pymongo.errors import AutoReconnect, ConnectionFailure, ExecutionTimeout, NetworkTimeout, ServerSelectionTimeoutError

    outage = (
        OSError,
        TimeoutError,
        KafkaError,
        ConnectionFailure,
        AutoReconnect,
        NetworkTimeout,
        ServerSelectionTimeoutError,
        ExecutionTimeout,
    )
    return isinstance(exc, outage)

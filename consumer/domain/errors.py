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

``StartupError`` is neither: the replica cannot start (a connection that retrying cannot fix,
a port it cannot listen on); ``main`` prints its one-line message and exits 1.
"""

from __future__ import annotations

from typing import Literal

Owner = Literal["client", "service"]


class StartupError(RuntimeError):
    """The replica cannot start; the message names the settings to check, never a secret."""


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


OWNERS: dict[str, Owner] = {
    "invalid_json": "client",
    "schema_violation": "client",
    "unsupported_schema_version": "client",
    "invalid_base64": "client",
    "invalid_image": "client",
    "image_too_large": "client",
    "message_too_large": "client",
    "empty_query": "client",
    "top_k_out_of_range": "client",
    "unknown_filter": "client",
    "deadline_expired": "client",
    "reply_topic_not_allowed": "client",
    "reply_undeliverable": "client",
    "internal_error": "service",
}
"""Who owns each wire error code of ``schemas.ErrorCode`` (a test keeps the two in step)."""


def owner_of(code: str) -> Owner:
    """The owner of ``code``; a code this build does not know is the service's."""
    return OWNERS.get(code, "service")


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

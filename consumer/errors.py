"""Typed failures of a single input; each maps to an error reply and/or a dead letter."""

from __future__ import annotations


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

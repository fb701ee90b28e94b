"""The service's MongoDB client: built from the settings, checked once at start.

Contracts:

- ``mongo_client`` builds an ``AsyncMongoClient`` for ``MONGODB_URI`` with ``MONGODB_USERNAME``/``MONGODB_PASSWORD``
  and ``MONGODB_TLS*`` (``mongo_client_options``), ``appname`` ``KAFKA_CLIENT_ID`` and, unless the URI sets
  ``serverSelectionTimeoutMS``, ``MONGODB_TIMEOUT_MS``. It connects lazily.
- ``check_mongo`` pings: refused credentials and TLS failures raise ``StartupError`` naming the settings to
  check; a server that does not answer raises its subclass ``MongoUnreachable`` (the caller may retry).
  Messages are one line and never hold a secret.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from consumer.config.redaction import parse_mongo_uri, scrub
from consumer.config.security import MongoSecuritySettings
from consumer.config.settings import Settings
from consumer.domain.errors import StartupError

if TYPE_CHECKING:
    from pymongo import AsyncMongoClient


class MongoUnreachable(StartupError):
    """MongoDB did not answer at all (no TLS or credential verdict): possibly transient, so callers may retry."""


def mongo_client_options(settings: MongoSecuritySettings) -> dict[str, Any]:
    """``AsyncMongoClient`` keyword arguments for the credential and TLS settings (contains plain passwords)."""
    options: dict[str, Any] = {}
    if settings.mongodb_tls is not None:
        options["tls"] = settings.mongodb_tls
    if settings.mongodb_tls_ca_file is not None:
        options["tls"] = True
        options["tlsCAFile"] = str(settings.mongodb_tls_ca_file)
    if settings.mongodb_tls_cert_key_file is not None:
        options["tls"] = True
        options["tlsCertificateKeyFile"] = str(settings.mongodb_tls_cert_key_file)
    if settings.mongodb_tls_cert_key_password is not None:
        options["tlsCertificateKeyFilePassword"] = settings.mongodb_tls_cert_key_password.get_secret_value()
    if settings.mongodb_username:
        options["username"] = settings.mongodb_username
        if settings.mongodb_password is not None:
            options["password"] = settings.mongodb_password.get_secret_value()
    return options


def mongo_client(settings: Settings, **overrides: Any) -> AsyncMongoClient[dict[str, Any]]:
    """An ``AsyncMongoClient`` for ``MONGODB_URI`` with the credential/TLS settings (``overrides`` win).

    The client connects lazily; ``check_mongo`` turns a first failure into a ``StartupError``.
    """
    from pymongo import AsyncMongoClient

    uri = settings.mongodb_uri
    if not uri:
        raise StartupError("MONGODB_URI is not set")
    defaults: dict[str, Any] = {"appname": settings.kafka_client_id} if settings.kafka_client_id else {}
    parsed = parse_mongo_uri(uri)
    if "serverSelectionTimeoutMS" not in (parsed.options if parsed else {}):
        defaults |= {"serverSelectionTimeoutMS": settings.mongodb_timeout_ms, "connectTimeoutMS": settings.mongodb_timeout_ms}
    return AsyncMongoClient(uri, **(defaults | mongo_client_options(settings) | overrides))


async def check_mongo(client: AsyncMongoClient[dict[str, Any]], settings: Settings, timeout: float = 30.0) -> None:
    """Ping MongoDB; raise ``StartupError`` naming the settings to check if that fails within ``timeout``.

    Refused credentials and TLS failures raise ``StartupError``; a server that does not answer
    raises its subclass ``MongoUnreachable``. Messages are one line and never hold a secret.
    """
    from pymongo.errors import OperationFailure, PyMongoError

    try:
        await asyncio.wait_for(client.admin.command("ping"), timeout)
    except OperationFailure as exc:
        if exc.code == 18:
            parsed = parse_mongo_uri(settings.mongodb_uri or "")
            where = (
                "the user info of MONGODB_URI"
                if parsed is not None and parsed.username is not None
                else "MONGODB_USERNAME and MONGODB_PASSWORD (or MONGODB_PASSWORD_FILE)"
            )
            raise StartupError(f"MongoDB refused the credentials: check {where}") from None
        raise StartupError(_one_line(scrub(f"MongoDB ping failed: {exc}", settings.secret_values()))) from None
    except (PyMongoError, TimeoutError) as exc:
        hint = _mongo_hint(str(exc))
        error = MongoUnreachable if hint == _MONGO_UNREACHABLE else StartupError
        raise error(_one_line(scrub(f"{hint}: {exc or type(exc).__name__}", settings.secret_values()))) from None


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MONGO_UNREACHABLE = "cannot reach MongoDB at MONGODB_URI"


def _mongo_hint(message: str) -> str:
    low = message.lower()
    if "certificate verify failed" in low and ("hostname" in low or "ip address mismatch" in low):
        return "MongoDB's certificate does not match the host name in MONGODB_URI"
    if "certificate verify failed" in low:
        return "MongoDB's certificate is not signed by a CA in MONGODB_TLS_CA_FILE (or the system store)"
    if "ssl" in low or "tls" in low:
        return "TLS to MongoDB failed: check MONGODB_TLS, MONGODB_TLS_CA_FILE and MONGODB_TLS_CERT_KEY_FILE"
    return _MONGO_UNREACHABLE

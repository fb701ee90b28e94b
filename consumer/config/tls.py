"""TLS contexts built from the settings, and the checks that make a bad TLS file fail when settings load.

Contracts:

- ``kafka_ssl_context`` is the one place a Kafka client's ``ssl.SSLContext`` is built (aiokafka's
  ``create_ssl_context``): ``KAFKA_SSL_CA_FILE`` or, unset, the system CA store; the client certificate and
  key; hostname checking per ``KAFKA_SSL_CHECK_HOSTNAME``. Settings validation builds it too, so a file that
  does not load fails at start.
- ``check_mongo_tls_files`` loads ``MONGODB_TLS_CA_FILE`` and ``MONGODB_TLS_CERT_KEY_FILE`` the way pymongo
  will; pymongo builds its own context from the file names.
- Failures raise ``ValueError`` naming the variable, never echoing a password; OpenSSL never prompts for one.

Pure functions of the settings (no network); the config layer may use them, so they live here, not in
``consumer.kafka``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiokafka.helpers import create_ssl_context
from pydantic import SecretStr

if TYPE_CHECKING:
    from consumer.config.security import KafkaSecuritySettings

log = logging.getLogger(__name__)


def ssl_reason(exc: BaseException) -> str:
    """OpenSSL's short reason (``CERTIFICATE_VERIFY_FAILED``...), else the OS error text, else the class name."""
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__


def no_password_prompt(secret: SecretStr | None) -> Callable[[], str]:
    """A password callback for ``load_cert_chain``: OpenSSL must never prompt on the terminal."""
    return lambda: secret.get_secret_value() if secret is not None else ""


def kafka_ssl_context(settings: KafkaSecuritySettings) -> ssl.SSLContext:
    """The client TLS context for ``settings``; raises ValueError naming the setting that cannot be loaded."""
    ca = settings.kafka_ssl_ca_file
    try:
        context: ssl.SSLContext = create_ssl_context(cafile=str(ca) if ca else None)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"KAFKA_SSL_CA_FILE: no usable CA certificate in {ca} ({ssl_reason(exc)})") from None
    if ca is None:
        log.debug("KAFKA_SSL_CA_FILE not set: trusting the system CA store")
    if settings.kafka_ssl_cert_file is not None:
        key = settings.kafka_ssl_key_file
        try:
            context.load_cert_chain(
                str(settings.kafka_ssl_cert_file),
                str(key) if key else None,
                password=no_password_prompt(settings.kafka_ssl_key_password),
            )
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                "KAFKA_SSL_CERT_FILE/KAFKA_SSL_KEY_FILE: cannot load the client certificate and key "
                f"(wrong KAFKA_SSL_KEY_PASSWORD?): {ssl_reason(exc)}"
            ) from None
    context.check_hostname = settings.kafka_ssl_check_hostname
    return context


def check_mongo_tls_files(ca_file: Path | None, cert_key_file: Path | None, cert_key_password: SecretStr | None) -> None:
    """Raise ValueError naming ``MONGODB_TLS_CA_FILE`` or ``MONGODB_TLS_CERT_KEY_FILE`` if it does not load."""
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except ssl.SSLError as exc:
            raise ValueError(f"MONGODB_TLS_CA_FILE: no usable CA certificate in {ca_file} ({ssl_reason(exc)})") from None
    if cert_key_file is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(cert_key_file), password=no_password_prompt(cert_key_password))
        except ssl.SSLError as exc:
            raise ValueError(
                "MONGODB_TLS_CERT_KEY_FILE: cannot load the client certificate and key "
                f"(wrong MONGODB_TLS_CERT_KEY_PASSWORD?): {ssl_reason(exc)}"
            ) from None

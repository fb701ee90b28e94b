"""Security settings: Kafka TLS/SASL, MongoDB credentials/TLS, secret files; validated when the settings load.

Contracts:

- Every password or key password is a ``SecretStr``. It can come from the variable itself or from a
  file named by the same variable with ``_FILE`` appended (``KAFKA_SASL_PASSWORD_FILE``); one trailing
  newline is dropped. Setting both, or naming an unreadable file, fails at start naming the variable.
- Misconfiguration fails when settings are loaded, with a message naming the variable and never
  echoing a secret: TLS files with a non-TLS protocol, SASL settings with a non-SASL protocol, a SASL
  protocol without mechanism/username/password, unreadable or unparsable CA/certificate/key files, a
  key that does not decrypt with its password.
- ``SSL``/``SASL_SSL`` without ``KAFKA_SSL_CA_FILE`` trusts the system CA store (managed Kafka with
  publicly signed certificates); a CA file that is set must be readable and hold a certificate.
  Hostname verification is on unless ``KAFKA_SSL_CHECK_HOSTNAME=false``.
- ``safe_dump`` and ``repr`` show secrets as ``**********`` and URIs without their password.

Only the models live here. TLS contexts: ``consumer.config.tls``; redaction: ``consumer.config.redaction``;
Kafka clients: ``consumer.kafka.clients``; the MongoDB client: ``consumer.store.client``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, SecretStr, field_serializer, model_validator

from consumer.config.redaction import parse_mongo_uri, redact_uri, uri_secrets
from consumer.config.tls import check_mongo_tls_files, kafka_ssl_context

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


def _env(field: str) -> str:
    return field.upper()


def _read_secret_file(path: object, variable: str) -> str:
    try:
        text = Path(str(path)).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"{variable}: cannot read {path}: {reason}") from None
    return text.removesuffix("\n").removesuffix("\r")


def _check_readable(path: Path | None, variable: str) -> None:
    if path is None:
        return
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"{variable}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def _unset(value: object) -> bool:
    return value is None or value == "" or (isinstance(value, SecretStr) and not value.get_secret_value())


class _SecretFiles(BaseModel):
    """Reads ``<FIELD>_FILE`` into ``<field>`` before validation (``secret_file_fields`` of every class in the MRO)."""

    secret_file_fields: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        fields = dict.fromkeys(f for klass in cls.__mro__ if issubclass(klass, _SecretFiles) for f in klass.secret_file_fields)
        for field in fields:
            path = data.get(f"{field}_file")
            if path in (None, ""):
                continue
            if data.get(field) not in (None, ""):
                raise ValueError(f"set {_env(field)} or {_env(field)}_FILE, not both")
            data[field] = _read_secret_file(path, f"{_env(field)}_FILE")
        return data


class KafkaSecuritySettings(_SecretFiles):
    """``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SSL_*`` and ``KAFKA_SASL_*``; used by every Kafka client."""

    secret_file_fields: ClassVar[tuple[str, ...]] = ("kafka_ssl_key_password", "kafka_sasl_password")

    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_ssl_ca_file: Path | None = None
    kafka_ssl_cert_file: Path | None = None
    kafka_ssl_key_file: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_key_password_file: Path | None = None
    kafka_ssl_check_hostname: bool = True
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None

    @model_validator(mode="after")
    def _kafka_consistent(self) -> KafkaSecuritySettings:
        protocol = self.kafka_security_protocol
        tls: dict[str, object] = {
            "KAFKA_SSL_CA_FILE": self.kafka_ssl_ca_file,
            "KAFKA_SSL_CERT_FILE": self.kafka_ssl_cert_file,
            "KAFKA_SSL_KEY_FILE": self.kafka_ssl_key_file,
            "KAFKA_SSL_KEY_PASSWORD": self.kafka_ssl_key_password,
        }
        sasl: dict[str, object] = {
            "KAFKA_SASL_MECHANISM": self.kafka_sasl_mechanism,
            "KAFKA_SASL_USERNAME": self.kafka_sasl_username,
            "KAFKA_SASL_PASSWORD": self.kafka_sasl_password,
        }
        if protocol not in TLS_PROTOCOLS:
            for name, value in tls.items():
                if value is not None:
                    raise ValueError(f"{name} is set but KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS (use SSL or SASL_SSL)")
        if protocol not in SASL_PROTOCOLS:
            for name, value in sasl.items():
                if value is not None:
                    raise ValueError(
                        f"{name} is set but KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL (use SASL_SSL or SASL_PLAINTEXT)"
                    )
        else:
            for name, value in sasl.items():
                if _unset(value):
                    hint = " (or KAFKA_SASL_PASSWORD_FILE)" if name == "KAFKA_SASL_PASSWORD" else ""
                    raise ValueError(f"{name}{hint} is required with KAFKA_SECURITY_PROTOCOL={protocol}")
        if self.kafka_ssl_key_file is not None and self.kafka_ssl_cert_file is None:
            raise ValueError("KAFKA_SSL_KEY_FILE is set without KAFKA_SSL_CERT_FILE")
        if self.kafka_ssl_key_password is not None and self.kafka_ssl_cert_file is None:
            raise ValueError("KAFKA_SSL_KEY_PASSWORD is set without KAFKA_SSL_CERT_FILE")
        _check_readable(self.kafka_ssl_ca_file, "KAFKA_SSL_CA_FILE")
        _check_readable(self.kafka_ssl_cert_file, "KAFKA_SSL_CERT_FILE")
        _check_readable(self.kafka_ssl_key_file, "KAFKA_SSL_KEY_FILE")
        if protocol in TLS_PROTOCOLS:
            kafka_ssl_context(self)
        return self

    def security_warnings(self) -> list[tuple[int, str]]:
        """Weak but valid choices (cleartext passwords, no hostname check), as ``(logging level, message)``."""
        protocol, notes = self.kafka_security_protocol, []
        if protocol == "SASL_PLAINTEXT":
            notes.append(
                (logging.WARNING, "KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT: SASL credentials and data cross the network unencrypted")
            )
        if protocol in TLS_PROTOCOLS and not self.kafka_ssl_check_hostname:
            notes.append(
                (logging.WARNING, "KAFKA_SSL_CHECK_HOSTNAME=false: any certificate signed by the trusted CA is accepted for any broker")
            )
        if protocol in TLS_PROTOCOLS and self.kafka_ssl_ca_file is None:
            notes.append((logging.INFO, "KAFKA_SSL_CA_FILE not set: broker certificates are verified against the system CA store"))
        return notes


class MongoSecuritySettings(_SecretFiles):
    """``MONGODB_URI`` and the credentials and TLS applied to it by ``consumer.store.client.mongo_client``."""

    secret_file_fields: ClassVar[tuple[str, ...]] = ("mongodb_uri", "mongodb_password", "mongodb_tls_cert_key_password")

    mongodb_uri: str | None = None  # ``Settings`` re-declares it with its description
    mongodb_uri_file: Path | None = None
    mongodb_username: str | None = None
    mongodb_password: SecretStr | None = None
    mongodb_password_file: Path | None = None
    mongodb_tls: bool | None = None
    mongodb_tls_ca_file: Path | None = None
    mongodb_tls_cert_key_file: Path | None = None
    mongodb_tls_cert_key_password: SecretStr | None = None
    mongodb_tls_cert_key_password_file: Path | None = None

    @model_validator(mode="after")
    def _mongo_consistent(self) -> MongoSecuritySettings:
        uri = parse_mongo_uri(self.mongodb_uri) if self.mongodb_uri else None
        if self.mongodb_password is not None and not self.mongodb_username:
            raise ValueError("MONGODB_PASSWORD is set without MONGODB_USERNAME")
        x509 = uri is not None and str(uri.options.get("authMechanism", "")).upper() == "MONGODB-X509"
        if self.mongodb_username and self.mongodb_password is None and not x509:
            raise ValueError("MONGODB_USERNAME is set without MONGODB_PASSWORD (or MONGODB_PASSWORD_FILE)")
        if self.mongodb_username and uri is not None and uri.username is not None:
            raise ValueError("MONGODB_USERNAME is set and MONGODB_URI has credentials too: use one of them")
        tls_files = {
            "MONGODB_TLS_CA_FILE": self.mongodb_tls_ca_file,
            "MONGODB_TLS_CERT_KEY_FILE": self.mongodb_tls_cert_key_file,
            "MONGODB_TLS_CERT_KEY_PASSWORD": self.mongodb_tls_cert_key_password,
        }
        if self.mongodb_tls is False:
            for name, value in tls_files.items():
                if value is not None:
                    raise ValueError(f"{name} is set but MONGODB_TLS=false")
        if self.mongodb_tls_cert_key_password is not None and self.mongodb_tls_cert_key_file is None:
            raise ValueError("MONGODB_TLS_CERT_KEY_PASSWORD is set without MONGODB_TLS_CERT_KEY_FILE")
        _check_readable(self.mongodb_tls_ca_file, "MONGODB_TLS_CA_FILE")
        _check_readable(self.mongodb_tls_cert_key_file, "MONGODB_TLS_CERT_KEY_FILE")
        check_mongo_tls_files(self.mongodb_tls_ca_file, self.mongodb_tls_cert_key_file, self.mongodb_tls_cert_key_password)
        return self


class SecuritySettings(KafkaSecuritySettings, MongoSecuritySettings):
    """Both mixins, plus redaction: ``safe_dump`` for logs; ``repr`` and JSON dumps without URI passwords.

    ``hide_input_in_errors`` keeps raw input (which may hold secrets) out of ``ValidationError`` text.
    """

    model_config = ConfigDict(hide_input_in_errors=True)

    @field_serializer("mongodb_uri", when_used="json")
    def _redacted_uri(self, value: str | None) -> str | None:
        return redact_uri(value) if value else value

    def safe_dump(self) -> dict[str, Any]:
        """Every setting as JSON-compatible values, secrets masked and URIs redacted: safe to log."""
        out = {}
        for name, value in self.model_dump(mode="json").items():
            if isinstance(value, str) and "://" in value:
                value = redact_uri(value)
            out[name] = value
        return out

    def secret_values(self) -> list[str]:
        """The plain values of every secret setting (for ``redaction.scrub`` before text leaves the process)."""
        values = [v.get_secret_value() for v in self.__dict__.values() if isinstance(v, SecretStr)]
        for value in self.__dict__.values():
            if isinstance(value, str) and "://" in value:
                values += uri_secrets(value)
        return [v for v in values if v]

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, (redact_uri(value) if isinstance(value, str) and "://" in value else value)

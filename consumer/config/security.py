"""Security settings and the clients built from them: Kafka TLS/SASL, MongoDB credentials/TLS, secrets hygiene.

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
- At start, failures that retrying cannot fix (untrusted certificate, host name mismatch, not a TLS
  listener, SASL refused) raise ``StartupError`` naming the settings to check; an unreachable broker
  raises ``KafkaConnectionError`` (with the reason) for the caller's retry loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

from aiokafka.conn import collect_hosts
from aiokafka.helpers import create_ssl_context
from pydantic import BaseModel, ConfigDict, SecretStr, field_serializer, model_validator

log = logging.getLogger(__name__)

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})
_SECRET_QUERY_KEYS = re.compile(r"(password|secret|token|authmechanismproperties)", re.IGNORECASE)


class StartupError(RuntimeError):
    """A connection could not be set up at start; the message names the settings to check, never a secret."""


class MongoUnreachable(StartupError):
    """MongoDB did not answer at all (no TLS or credential verdict): possibly transient, so callers may retry."""


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its user info and secret-looking query values replaced by ``***``.

    Works for ``mongodb://`` and ``mongodb+srv://`` URIs with several hosts; a string without
    ``scheme://`` is returned unchanged.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    query_at = rest.find("?")
    authority_end = query_at if query_at >= 0 else len(rest)
    at = rest.rfind("@", 0, authority_end)
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        rest = f"{user}:***" + rest[at:] if colon else rest
        query_at = rest.find("?")
    if query_at >= 0:
        head, query = rest[: query_at + 1], rest[query_at + 1 :]
        parts = []
        for part in re.split(r"([&;])", query):
            key, eq, _ = part.partition("=")
            parts.append(f"{key}=***" if eq and _SECRET_QUERY_KEYS.search(key) else part)
        rest = head + "".join(parts)
    return f"{scheme}://{rest}"


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


def _ssl_reason(exc: Exception) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__


def _no_password_prompt(secret: SecretStr | None):
    """A password callback for ``load_cert_chain``: OpenSSL must never prompt on the terminal."""
    return lambda: secret.get_secret_value() if secret is not None else ""


class _SecretFiles(BaseModel):
    """Reads ``<FIELD>_FILE`` into ``<field>`` before validation (``secret_file_fields`` of every class in the MRO)."""

    secret_file_fields: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        fields = dict.fromkeys(f for klass in cls.__mro__ for f in vars(klass).get("secret_file_fields", ()))
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
        tls_fields = ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file", "kafka_ssl_key_password")
        sasl_fields = ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password")
        if protocol not in TLS_PROTOCOLS:
            for name in tls_fields:
                if getattr(self, name) is not None:
                    raise ValueError(f"{_env(name)} is set but KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS (use SSL or SASL_SSL)")
        if protocol not in SASL_PROTOCOLS:
            for name in sasl_fields:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{_env(name)} is set but KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL (use SASL_SSL or SASL_PLAINTEXT)"
                    )
        else:
            for name in sasl_fields:
                value = getattr(self, name)
                if value is None or (isinstance(value, SecretStr) and not value.get_secret_value()) or value == "":
                    hint = " (or KAFKA_SASL_PASSWORD_FILE)" if name == "kafka_sasl_password" else ""
                    raise ValueError(f"{_env(name)}{hint} is required with KAFKA_SECURITY_PROTOCOL={protocol}")
        if self.kafka_ssl_key_file is not None and self.kafka_ssl_cert_file is None:
            raise ValueError("KAFKA_SSL_KEY_FILE is set without KAFKA_SSL_CERT_FILE")
        if self.kafka_ssl_key_password is not None and self.kafka_ssl_cert_file is None:
            raise ValueError("KAFKA_SSL_KEY_PASSWORD is set without KAFKA_SSL_CERT_FILE")
        for name in ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file"):
            _check_readable(getattr(self, name), _env(name))
        if protocol in TLS_PROTOCOLS:
            kafka_ssl_context(self)
        return self


class MongoSecuritySettings(_SecretFiles):
    """Credentials and TLS for ``MONGODB_URI`` (which ``Settings`` defines); applied by ``mongo_client``."""

    secret_file_fields: ClassVar[tuple[str, ...]] = ("mongodb_uri", "mongodb_password", "mongodb_tls_cert_key_password")

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
        uri = getattr(self, "mongodb_uri", None) or ""
        if self.mongodb_password is not None and not self.mongodb_username:
            raise ValueError("MONGODB_PASSWORD is set without MONGODB_USERNAME")
        x509 = "authmechanism=mongodb-x509" in uri.lower()
        if self.mongodb_username and self.mongodb_password is None and not x509:
            raise ValueError("MONGODB_USERNAME is set without MONGODB_PASSWORD (or MONGODB_PASSWORD_FILE)")
        if self.mongodb_username and _uri_has_user(uri):
            raise ValueError("MONGODB_USERNAME is set and MONGODB_URI has credentials too: use one of them")
        tls_files = ("mongodb_tls_ca_file", "mongodb_tls_cert_key_file", "mongodb_tls_cert_key_password")
        if self.mongodb_tls is False:
            for name in tls_files:
                if getattr(self, name) is not None:
                    raise ValueError(f"{_env(name)} is set but MONGODB_TLS=false")
        if self.mongodb_tls_cert_key_password is not None and self.mongodb_tls_cert_key_file is None:
            raise ValueError("MONGODB_TLS_CERT_KEY_PASSWORD is set without MONGODB_TLS_CERT_KEY_FILE")
        _check_readable(self.mongodb_tls_ca_file, "MONGODB_TLS_CA_FILE")
        _check_readable(self.mongodb_tls_cert_key_file, "MONGODB_TLS_CERT_KEY_FILE")
        if self.mongodb_tls_ca_file is not None:
            try:
                ssl.create_default_context(cafile=str(self.mongodb_tls_ca_file))
            except ssl.SSLError as exc:
                raise ValueError(
                    f"MONGODB_TLS_CA_FILE: no usable CA certificate in {self.mongodb_tls_ca_file} ({_ssl_reason(exc)})"
                ) from None
        if self.mongodb_tls_cert_key_file is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                    str(self.mongodb_tls_cert_key_file), password=_no_password_prompt(self.mongodb_tls_cert_key_password)
                )
            except ssl.SSLError as exc:
                raise ValueError(
                    "MONGODB_TLS_CERT_KEY_FILE: cannot load the certificate and key "
                    f"(wrong MONGODB_TLS_CERT_KEY_PASSWORD?): {_ssl_reason(exc)}"
                ) from None
        return self


def _uri_secrets(uri: str) -> list[str]:
    """The password of the user info and the values of secret-looking query parameters of ``uri``."""
    _, _, rest = uri.partition("://")
    query_at = rest.find("?")
    end = query_at if query_at >= 0 else len(rest)
    at = rest.rfind("@", 0, end)
    found = [rest[:at].partition(":")[2]] if at >= 0 and ":" in rest[:at] else []
    if query_at >= 0:
        for part in re.split(r"[&;]", rest[query_at + 1 :]):
            key, eq, value = part.partition("=")
            if eq and _SECRET_QUERY_KEYS.search(key):
                found.append(value)
    return [v for v in found if v]


def _uri_has_user(uri: str) -> bool:
    _, sep, rest = uri.partition("://")
    end = rest.find("?") if "?" in rest else len(rest)
    return bool(sep) and rest.rfind("@", 0, end) >= 0


class SecuritySettings(KafkaSecuritySettings, MongoSecuritySettings):
    """Both mixins, plus redaction: ``safe_dump`` for logs; ``repr`` and JSON dumps without URI passwords.

    ``hide_input_in_errors`` keeps raw input (which may hold secrets) out of ``ValidationError`` text.
    """

    model_config = ConfigDict(hide_input_in_errors=True)

    @field_serializer("mongodb_uri", when_used="json", check_fields=False)
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
        """The plain values of every secret setting (for scrubbing text before it leaves the process)."""
        values = [v.get_secret_value() for v in self.__dict__.values() if isinstance(v, SecretStr)]
        for value in self.__dict__.values():
            if isinstance(value, str) and "://" in value:
                values += _uri_secrets(value)
        return [v for v in values if v]

    def scrub(self, text: str) -> str:
        """``text`` with every secret value replaced by ``***``."""
        for secret in sorted(self.secret_values(), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, (redact_uri(value) if isinstance(value, str) and "://" in value else value)


def kafka_ssl_context(settings: KafkaSecuritySettings) -> ssl.SSLContext:
    """The client TLS context for ``settings``; raises ValueError naming the setting that cannot be loaded."""
    ca = settings.kafka_ssl_ca_file
    try:
        context = create_ssl_context(cafile=str(ca) if ca else None)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"KAFKA_SSL_CA_FILE: no usable CA certificate in {ca} ({_ssl_reason(exc)})") from None
    if ca is None:
        log.debug("KAFKA_SSL_CA_FILE not set: trusting the system CA store")
    if settings.kafka_ssl_cert_file is not None:
        key = settings.kafka_ssl_key_file
        try:
            context.load_cert_chain(
                str(settings.kafka_ssl_cert_file),
                str(key) if key else None,
                password=_no_password_prompt(settings.kafka_ssl_key_password),
            )
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                "KAFKA_SSL_CERT_FILE/KAFKA_SSL_KEY_FILE: cannot load the client certificate and key "
                f"(wrong KAFKA_SSL_KEY_PASSWORD?): {_ssl_reason(exc)}"
            ) from None
    context.check_hostname = settings.kafka_ssl_check_hostname
    return context


def kafka_security_options(settings: KafkaSecuritySettings) -> dict[str, Any]:
    """aiokafka keyword arguments for the security settings (contains the plain SASL password: never log it)."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in TLS_PROTOCOLS:
        options["ssl_context"] = kafka_ssl_context(settings)
    if protocol in SASL_PROTOCOLS:
        options |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": settings.kafka_sasl_password.get_secret_value(),
        }
    return options


def log_security_warnings(settings: KafkaSecuritySettings) -> None:
    """Warn about weak but valid choices (cleartext passwords, no hostname check)."""
    if settings.kafka_security_protocol == "SASL_PLAINTEXT":
        log.warning("KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT: SASL credentials and data cross the network unencrypted")
    if settings.kafka_security_protocol in TLS_PROTOCOLS and not settings.kafka_ssl_check_hostname:
        log.warning("KAFKA_SSL_CHECK_HOSTNAME=false: any certificate signed by the trusted CA is accepted for any broker")
    if settings.kafka_security_protocol in TLS_PROTOCOLS and settings.kafka_ssl_ca_file is None:
        log.info("KAFKA_SSL_CA_FILE not set: broker certificates are verified against the system CA store")


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


def mongo_client(settings: MongoSecuritySettings, **overrides: Any):
    """An ``AsyncMongoClient`` for ``MONGODB_URI`` with the credential/TLS settings (``overrides`` win).

    The client connects lazily; ``check_mongo`` turns a first failure into a ``StartupError``.
    """
    from pymongo import AsyncMongoClient

    uri = getattr(settings, "mongodb_uri", None)
    if not uri:
        raise StartupError("MONGODB_URI is not set")
    appname = getattr(settings, "kafka_client_id", None)
    defaults = {"appname": appname} if appname else {}
    timeout_ms = getattr(settings, "mongodb_timeout_ms", None)
    if timeout_ms and "serverselectiontimeoutms" not in uri.lower():
        defaults |= {"serverSelectionTimeoutMS": timeout_ms, "connectTimeoutMS": timeout_ms}
    return AsyncMongoClient(uri, **(defaults | mongo_client_options(settings) | overrides))


async def check_mongo(client, settings: SecuritySettings, timeout: float = 30.0) -> None:
    """Ping MongoDB; raise ``StartupError`` naming the settings to check if that fails within ``timeout``.

    Refused credentials and TLS failures raise ``StartupError``; a server that does not answer
    raises its subclass ``MongoUnreachable``. Messages are one line and never hold a secret.
    """
    from pymongo.errors import OperationFailure, PyMongoError

    try:
        await asyncio.wait_for(client.admin.command("ping"), timeout)
    except OperationFailure as exc:
        if exc.code == 18:
            where = (
                "the user info of MONGODB_URI"
                if _uri_has_user(getattr(settings, "mongodb_uri", None) or "")
                else "MONGODB_USERNAME and MONGODB_PASSWORD (or MONGODB_PASSWORD_FILE)"
            )
            raise StartupError(f"MongoDB refused the credentials: check {where}") from None
        raise StartupError(_one_line(settings.scrub(f"MongoDB ping failed: {exc}"))) from None
    except (PyMongoError, TimeoutError) as exc:
        hint = _mongo_hint(str(exc))
        error = MongoUnreachable if hint == _MONGO_UNREACHABLE else StartupError
        raise error(_one_line(settings.scrub(f"{hint}: {exc or type(exc).__name__}"))) from None


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


def _describe_tls_failure(exc: BaseException, host: str, port: int) -> str:
    where = f"{host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = exc.verify_message or str(exc)
        if "mismatch" in msg.lower() or "not valid for" in msg.lower():
            return (
                f"the certificate of {where} is not valid for the name {host!r} ({msg}): use a host name the "
                "certificate names in KAFKA_BOOTSTRAP_SERVERS (KAFKA_SSL_CHECK_HOSTNAME=false disables this check)"
            )
        return (
            f"the certificate of {where} is not trusted ({msg}): KAFKA_SSL_CA_FILE must hold the CA that "
            "signed it (without KAFKA_SSL_CA_FILE the system CA store is used)"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {where} failed ({_ssl_reason(exc)}): is it a TLS listener? check KAFKA_SECURITY_PROTOCOL"
    if isinstance(exc, TimeoutError):
        return f"no TLS handshake with {where} in time: is it a TLS listener? check KAFKA_SECURITY_PROTOCOL"
    return f"cannot connect to {where} ({_ssl_reason(exc)})"


def _is_definitive(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLCertVerificationError) or (
        isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError))
    )


async def check_kafka_tls(settings: SecuritySettings, timeout: float = 10.0) -> list[str]:
    """TLS handshake with each bootstrap server until one succeeds (no-op without TLS).

    Raises ``StartupError`` if a server presents a certificate that fails verification or does not
    speak TLS. Unreachable servers and timeouts may be transient (a broker still starting): they are
    logged as a warning and returned as descriptions; an empty list means a handshake succeeded.
    """
    if settings.kafka_security_protocol not in TLS_PROTOCOLS:
        return []
    context = kafka_ssl_context(settings)
    definitive, transient = [], []
    for host, port, _ in collect_hosts(getattr(settings, "kafka_bootstrap_servers")):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context, server_hostname=host), timeout)
        except (OSError, TimeoutError) as exc:
            (definitive if _is_definitive(exc) else transient).append(_describe_tls_failure(exc, host, port))
            continue
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return []
    if definitive:
        raise StartupError("TLS to Kafka failed: " + "; ".join(definitive + transient))
    log.warning("TLS pre-flight to Kafka failed: %s", "; ".join(transient))
    return transient


@contextmanager
def _capture(logger: str) -> Iterator[list[str]]:
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Collect(logging.WARNING)
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield messages
    finally:
        target.removeHandler(handler)


_AUTH_MARKERS = ("sasl", "authenticat", "unsupportedsaslmechanism", "illegalsaslstate")


def _sasl_failed(settings: SecuritySettings, exc: BaseException, logged: list[str]) -> bool:
    if settings.kafka_security_protocol not in SASL_PROTOCOLS:
        return False
    text = " ".join([*logged, type(exc).__name__, str(exc)]).lower()
    return isinstance(exc, (KeyError, ValueError)) or any(m in text for m in _AUTH_MARKERS)


async def start_kafka_client(settings: SecuritySettings, client: Any, timeout: float = 60.0) -> None:
    """Start one aiokafka ``client`` after a TLS pre-flight check, within ``timeout`` seconds.

    Failures retrying cannot fix (certificate not trusted or not valid for the host name, not a TLS
    listener, SASL authentication refused) stop the client and raise ``StartupError`` naming the
    settings to check. Other failures (broker unreachable, timeout) raise ``KafkaConnectionError``
    carrying the client's last logged reason, for the caller's retry loop.
    """
    from aiokafka.errors import KafkaConnectionError

    try:
        preflight = await check_kafka_tls(settings, min(timeout, 10.0))
        with _capture("aiokafka") as logged:
            try:
                await asyncio.wait_for(client.start(), timeout)
            except Exception as exc:
                log.debug("Kafka client start failed", exc_info=True)
                if _sasl_failed(settings, exc, logged):
                    raise StartupError(
                        settings.scrub(
                            f"SASL {settings.kafka_sasl_mechanism} authentication was refused: check "
                            "KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD "
                            f"(last error: {logged[-1] if logged else type(exc).__name__})"
                        )
                    ) from None
                reason = "; ".join([*preflight, logged[-1] if logged else f"{type(exc).__name__}: {exc}"])
                raise KafkaConnectionError(
                    settings.scrub(
                        f"cannot start a Kafka client for KAFKA_BOOTSTRAP_SERVERS="
                        f"{getattr(settings, 'kafka_bootstrap_servers', '?')} with KAFKA_SECURITY_PROTOCOL="
                        f"{settings.kafka_security_protocol} ({reason}); a broker that requires TLS or SASL "
                        "closes other connections"
                    )
                ) from None
    except StartupError:
        try:
            await client.stop()
        except Exception:  # noqa: BLE001 - best-effort cleanup; the StartupError is what the caller needs
            log.debug("stopping a client that failed to start", exc_info=True)
        raise


def log_effective_config(settings: SecuritySettings, logger: logging.Logger | None = None) -> None:
    """Log every setting (secrets masked, URIs redacted) and warnings about weak security choices."""
    (logger or log).info("effective configuration: %s", json.dumps(settings.safe_dump(), sort_keys=True))
    log_security_warnings(settings)

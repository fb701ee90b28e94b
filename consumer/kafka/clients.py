"""Kafka clients: their options (security included), construction, and a start that says what to fix.

Contracts:

- ``client_options`` is the one source of connection options for every aiokafka client (consumer,
  producer, admin): bootstrap servers, client id and ``kafka_security_options``. It holds the plain SASL
  password: never log it.
- ``start_kafka_client`` runs a TLS pre-flight against the bootstrap servers, then ``client.start()``.
  Failures that retrying cannot fix (certificate not trusted or not valid for the host name, not a TLS
  listener, SASL login refused) stop the client and raise ``StartupError`` naming the settings to check;
  an unreachable broker or a timeout raises ``KafkaConnectionError`` with the reason, for the caller's
  retry loop. Messages never hold a secret.
- A refused SASL login is recognised by aiokafka's exception types, never by its log text (see
  ``_sasl_refused``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.conn import AIOKafkaConnection, collect_hosts
from aiokafka.errors import IllegalSaslStateError, KafkaConnectionError, SaslAuthenticationFailed, UnsupportedSaslMechanismError

from consumer.config.redaction import scrub
from consumer.config.security import SASL_PROTOCOLS, TLS_PROTOCOLS, KafkaSecuritySettings
from consumer.config.settings import Settings
from consumer.config.tls import kafka_ssl_context, ssl_reason
from consumer.domain.errors import StartupError

log = logging.getLogger(__name__)


def kafka_security_options(settings: KafkaSecuritySettings) -> dict[str, Any]:
    """aiokafka keyword arguments for the security settings (contains the plain SASL password: never log it)."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in TLS_PROTOCOLS:
        options["ssl_context"] = kafka_ssl_context(settings)
    if protocol in SASL_PROTOCOLS:
        password = settings.kafka_sasl_password
        assert password is not None  # settings validation requires it with a SASL protocol
        options |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": password.get_secret_value(),
        }
    return options


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection options shared by every consumer and producer, security included (holds secrets: never log)."""
    return {"bootstrap_servers": settings.kafka_bootstrap_servers, "client_id": settings.kafka_client_id} | kafka_security_options(settings)


def make_consumer(settings: Settings, group_id: str | None, **overrides: object) -> AIOKafkaConsumer:
    """A consumer with manual commits that starts from the earliest offset for a new group.

    ``fetch_min_bytes`` stays aiokafka's 1 (a fetch is answered once any record is there) and
    ``fetch_max_wait_ms`` is ``KAFKA_FETCH_MAX_WAIT_MS`` (aiokafka's default is 500): a broker that holds a
    waiting fetch to its end whatever arrives (Tansu) delays a record by about half of it.
    """
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
    """A producer whose sends count as delivered only when all in-sync replicas have them.

    ``linger_ms=0``: a send goes out at once; the sends of a batch are in flight together
    (``transport.publish_each`` sends all, then gathers the acknowledgements).
    """
    options = client_options(settings) | {
        "acks": "all",
        "max_request_size": settings.kafka_max_request_size,
        "linger_ms": 0,
    }
    return AIOKafkaProducer(**(options | overrides))


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
        return f"TLS handshake with {where} failed ({ssl_reason(exc)}): is it a TLS listener? check KAFKA_SECURITY_PROTOCOL"
    if isinstance(exc, TimeoutError):
        return f"no TLS handshake with {where} in time: is it a TLS listener? check KAFKA_SECURITY_PROTOCOL"
    return f"cannot connect to {where} ({ssl_reason(exc)})"


def _is_definitive(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLCertVerificationError) or (
        isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError))
    )


async def check_kafka_tls(settings: Settings, timeout: float = 10.0) -> list[str]:
    """TLS handshake with each bootstrap server until one succeeds (no-op without TLS).

    Raises ``StartupError`` if a server presents a certificate that fails verification or does not
    speak TLS. Unreachable servers and timeouts may be transient (a broker still starting): they are
    logged as a warning and returned as descriptions; an empty list means a handshake succeeded.
    """
    if settings.kafka_security_protocol not in TLS_PROTOCOLS:
        return []
    context = kafka_ssl_context(settings)
    definitive: list[str] = []
    transient: list[str] = []
    for host, port, _ in collect_hosts(settings.kafka_bootstrap_servers):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context, server_hostname=host), timeout)
        except (OSError, TimeoutError) as exc:
            (definitive if _is_definitive(exc) else transient).append(_describe_tls_failure(exc, host, port))
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return []
    if definitive:
        raise StartupError("TLS to Kafka failed: " + "; ".join(definitive + transient))
    log.warning("TLS pre-flight to Kafka failed: %s", "; ".join(transient))
    return transient


SASL_REFUSALS: tuple[type[BaseException], ...] = (SaslAuthenticationFailed, UnsupportedSaslMechanismError, IllegalSaslStateError)
"""What ``AIOKafkaConnection._do_sasl_handshake`` raises when the broker refuses the mechanism or the login."""
_SASL_EXCHANGE = AIOKafkaConnection._do_sasl_handshake.__code__


class _AiokafkaFailures(logging.Handler):
    """While a client starts: aiokafka's warning/error messages (for the reason shown) and the exceptions they carry.

    ``AIOKafkaClient.bootstrap`` (aiokafka 0.14 ``client.py``: ``except (OSError, KafkaError,
    asyncio.TimeoutError) as err: log.error('Unable connect to "%s:%s": %s', host, port, err); continue``)
    and ``AIOKafkaClient._get_conn`` swallow a typed SASL error and then raise only a generic
    ``KafkaConnectionError("Unable to bootstrap ...")``. The typed exception survives only as an argument
    of that log record (no ``exc_info``), so it is taken from ``record.args``.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        args = record.args if isinstance(record.args, tuple) else ()
        self.errors += [a for a in args if isinstance(a, BaseException)]
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def _raised_in_sasl_exchange(exc: BaseException) -> bool:
    """True if ``exc`` came out of aiokafka's SASL exchange (``_do_sasl_handshake`` is in its traceback).

    Covers the SCRAM authenticator's ``KeyError``/``ValueError`` on a server-final message that carries
    an error (``e=...``) instead of a verifier: not a ``KafkaError``, so it escapes ``bootstrap`` untyped.
    """
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is _SASL_EXCHANGE:
            return True
        tb = tb.tb_next
    return False


def _sasl_refused(settings: Settings, exc: BaseException, logged: list[BaseException]) -> bool:
    if settings.kafka_security_protocol not in SASL_PROTOCOLS:
        return False
    return any(isinstance(e, SASL_REFUSALS) or _raised_in_sasl_exchange(e) for e in (exc, *logged))


async def start_kafka_client(settings: Settings, client: Any, timeout: float = 60.0) -> None:
    """Start one aiokafka ``client`` after a TLS pre-flight check, within ``timeout`` seconds.

    Failures retrying cannot fix (certificate not trusted or not valid for the host name, not a TLS
    listener, SASL authentication refused) stop the client and raise ``StartupError`` naming the
    settings to check. Other failures (broker unreachable, timeout) raise ``KafkaConnectionError``
    carrying the client's last logged reason, for the caller's retry loop.
    """
    secrets = settings.secret_values()
    failures = _AiokafkaFailures()
    target = logging.getLogger("aiokafka")
    try:
        preflight = await check_kafka_tls(settings, min(timeout, 10.0))
        target.addHandler(failures)
        try:
            await asyncio.wait_for(client.start(), timeout)
        except Exception as exc:
            log.debug("Kafka client start failed", exc_info=True)
            last = failures.messages[-1] if failures.messages else None
            if _sasl_refused(settings, exc, failures.errors):
                raise StartupError(
                    scrub(
                        f"SASL {settings.kafka_sasl_mechanism} authentication was refused: check "
                        "KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD "
                        f"(last error: {last or type(exc).__name__})",
                        secrets,
                    )
                ) from None
            reason = "; ".join([*preflight, last or f"{type(exc).__name__}: {exc}"])
            raise KafkaConnectionError(
                scrub(
                    f"cannot start a Kafka client for KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} with "
                    f"KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol} ({reason}); a broker that requires TLS or SASL "
                    "closes other connections",
                    secrets,
                )
            ) from None
        finally:
            target.removeHandler(failures)
    except StartupError:
        try:
            await client.stop()
        except Exception:  # best-effort cleanup; the StartupError is what the caller needs
            log.debug("stopping a client that failed to start", exc_info=True)
        raise

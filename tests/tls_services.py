"""Fixtures for TLS tests: throwaway PKI, Tansu and SecantusDB behind stunnel, topic helpers.

tests/conftest.py registers this module as a plugin, so its fixtures need no import.
Without stunnel the fixtures skip, except under CI (``CI`` set), where they fail: CI must run them.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.config.settings import Settings
from consumer.kafka.clients import client_options
from devservices import MongoServer, TansuBroker, free_port
from devservices.certs import CertificateAuthority, Issued
from devservices.stunnel import Stunnel, stunnel_binary

CLIENT_KEY_PASSWORD = "client-key-passphrase-7Qv"
MONGO_USER, MONGO_PASSWORD = "clip-app", "mongo-password-Zr8"


def require_stunnel() -> None:
    if stunnel_binary() is not None:
        return
    reason = "stunnel4 is not installed (./run.sh test installs it with apt-get; or: apt-get install stunnel4)"
    if os.environ.get("CI"):
        pytest.fail(reason + " - CI must run the TLS tests")
    pytest.skip(reason)


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server: Issued
    wrong_name: Issued
    client: Issued


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(root / "ca")
    other = CertificateAuthority(root / "other", name="unrelated CA")
    return Pki(
        ca=ca.cert_path,
        other_ca=other.cert_path,
        server=ca.issue("server", ["localhost", "127.0.0.1"]),
        wrong_name=ca.issue("wrong-name", ["example.test"]),
        client=ca.issue("client", ["clip-search"], client=True, key_password=CLIENT_KEY_PASSWORD),
    )


@dataclass(frozen=True)
class TlsKafka:
    broker: TansuBroker
    tls: Stunnel
    wrong_name: Stunnel

    @property
    def bootstrap(self) -> str:
        return f"localhost:{self.tls.port}"


@pytest.fixture(scope="session")
def tls_kafka(pki):
    """Tansu advertising a stunnel port (cert for localhost/127.0.0.1), plus a stunnel whose cert names example.test."""
    require_stunnel()
    port = free_port()
    with (
        TansuBroker(advertised_port=port) as broker,
        Stunnel(broker.port, pki.server.cert, pki.server.key, port=port) as tls,
        Stunnel(broker.port, pki.wrong_name.cert, pki.wrong_name.key) as wrong_name,
    ):
        yield TlsKafka(broker, tls, wrong_name)


@dataclass(frozen=True)
class TlsMongo:
    server: MongoServer
    tls: Stunnel

    @property
    def uri(self) -> str:
        return f"mongodb://localhost:{self.tls.port}/?directConnection=true"


@pytest.fixture(scope="session")
def tls_mongo(pki):
    """SecantusDB with user ``MONGO_USER`` behind stunnel (cert for localhost/127.0.0.1)."""
    require_stunnel()
    with MongoServer(storage_path=":memory:") as server:
        with server.client() as admin:
            admin.admin.command("createUser", MONGO_USER, pwd=MONGO_PASSWORD, roles=["readWrite"])
        with Stunnel(server.port, pki.server.cert, pki.server.key) as tls:
            yield TlsMongo(server, tls)


def sasl_settings(broker, mechanism: str, password: str, **overrides) -> Settings:
    """Settings logging in to ``broker`` over SASL_PLAINTEXT as user ``nobody``."""
    values = {
        "kafka_bootstrap_servers": broker.bootstrap,
        "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_sasl_mechanism": mechanism,
        "kafka_sasl_username": "nobody",
        "kafka_sasl_password": password,
        "_env_file": None,
    }
    return Settings(**(values | overrides))


def ssl_settings(pki: Pki, tls_kafka: TlsKafka, **overrides) -> Settings:
    """Settings for the TLS listener, client certificate with an encrypted key."""
    values = {
        "kafka_bootstrap_servers": tls_kafka.bootstrap,
        "kafka_security_protocol": "SSL",
        "kafka_ssl_ca_file": pki.ca,
        "kafka_ssl_cert_file": pki.client.cert,
        "kafka_ssl_key_file": pki.client.key,
        "kafka_ssl_key_password": CLIENT_KEY_PASSWORD,
        "kafka_session_timeout_ms": 1500,
        "kafka_heartbeat_interval_ms": 250,
        "max_batch_wait_ms": 20,
        "_env_file": None,
    }
    return Settings(**(values | overrides))


async def create_topics(settings: Settings, names: list[str]) -> None:
    """Create single-partition topics through the clients' own (secured) connection options."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, 1, 1) for n in names])
    finally:
        await admin.close()


async def read_topic(settings: Settings, topic: str, count: int, timeout: float = 30.0) -> list:
    """The first ``count`` records of partition 0 of ``topic``; fails after ``timeout`` seconds."""
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        records: list = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(records) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"expected {count} records on {topic}, got {len(records)}")
            batch = await consumer.getmany(tp, timeout_ms=200)
            records.extend(batch.get(tp, []))
        return records
    finally:
        await consumer.stop()


@pytest.fixture(scope="session")
def sasl_broker():
    """Tansu with ``--authentication``: only clients that complete a SASL handshake may talk to it.

    Tansu 0.6 offers only SCRAM and keeps its users in storage that memory:// loses on the restart
    needed to turn authentication on, so no client can log in: it can only refuse.
    """
    with TansuBroker(authentication=True) as broker:
        yield broker

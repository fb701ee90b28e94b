"""Security settings: validation at start, the kwargs handed to aiokafka and pymongo, redaction, no URL fetching."""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from pymongo import AsyncMongoClient

from consumer.app import build_service
from consumer.config.redaction import redact_uri
from consumer.config.settings import ConfigError, Settings, load_settings
from consumer.kafka.clients import client_options, kafka_security_options, make_consumer, make_producer
from consumer.store.client import mongo_client, mongo_client_options
from devservices.certs import CertificateAuthority

PASSWORD = "pw-Xy7-not-in-output"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("certs")
    ca = CertificateAuthority(root)
    plain = ca.issue("plain-client", ["clip-search"], client=True)
    combined = root / "client-combined.pem"
    combined.write_bytes(plain.cert.read_bytes() + plain.key.read_bytes())
    not_pem = root / "not-a-cert.pem"
    not_pem.write_text("hello\n")
    return {
        "ca": ca.cert_path,
        "client": ca.issue("client", ["clip-search"], client=True, key_password=PASSWORD),
        "plain_client": plain,
        "combined": combined,
        "not_pem": not_pem,
        "missing": root / "missing.pem",
    }


def settings(**values) -> Settings:
    return Settings(_env_file=None, **values)


def sasl(**values) -> dict:
    return {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "svc-clip",
        "kafka_sasl_password": PASSWORD,
    } | values


def test_plaintext_is_the_default_and_adds_nothing():
    assert kafka_security_options(settings()) == {"security_protocol": "PLAINTEXT"}
    assert client_options(settings())["security_protocol"] == "PLAINTEXT"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_ssl_maps_to_aiokafka_kwargs(mechanism):
    s = settings(**sasl(kafka_sasl_mechanism=mechanism))
    options = kafka_security_options(s)
    assert {k: v for k, v in options.items() if k != "ssl_context"} == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "svc-clip",
        "sasl_plain_password": PASSWORD,
    }
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] > 0, "without KAFKA_SSL_CA_FILE the system CA store is trusted"
    for client in (make_producer(s), make_consumer(s, "g")):
        kafka = client.client if isinstance(client, AIOKafkaProducer) else client._client
        assert (kafka._security_protocol, kafka._sasl_mechanism) == ("SASL_SSL", mechanism)
        assert kafka._sasl_plain_password == PASSWORD and kafka._ssl_context is not None
        await client.stop()


def test_sasl_plaintext_has_no_tls_context():
    options = kafka_security_options(settings(**sasl(kafka_security_protocol="SASL_PLAINTEXT")))
    assert options["security_protocol"] == "SASL_PLAINTEXT" and "ssl_context" not in options


async def test_ssl_with_ca_client_certificate_and_hostname_switch(certs):
    s = settings(
        kafka_security_protocol="SSL",
        kafka_ssl_ca_file=certs["ca"],
        kafka_ssl_cert_file=certs["client"].cert,
        kafka_ssl_key_file=certs["client"].key,
        kafka_ssl_key_password=PASSWORD,
    )
    options = kafka_security_options(s)
    assert set(options) == {"security_protocol", "ssl_context"}
    assert options["ssl_context"].cert_store_stats()["x509_ca"] == 1
    assert options["ssl_context"].check_hostname
    unchecked = settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=certs["ca"], kafka_ssl_check_hostname=False)
    assert kafka_security_options(unchecked)["ssl_context"].check_hostname is False
    producer, consumer = AIOKafkaProducer(**client_options(s)), AIOKafkaConsumer(**client_options(s))
    assert producer.client._ssl_context is not None and consumer._client._ssl_context is not None
    for client in (producer, consumer):
        await client.stop()


def test_secret_files_are_read_from_the_environment(tmp_path, monkeypatch):
    secret = tmp_path / "sasl-password"
    secret.write_text(PASSWORD + "\n")
    for name, value in sasl(kafka_sasl_password=None).items():
        if value is not None:
            monkeypatch.setenv(name.upper(), value)
    monkeypatch.setenv("KAFKA_SASL_PASSWORD_FILE", str(secret))
    loaded = load_settings(_env_file=None)
    assert loaded.kafka_sasl_password.get_secret_value() == PASSWORD
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "also-set")
    with pytest.raises(ConfigError, match="set KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE, not both"):
        load_settings(_env_file=None)


def test_mongo_secret_files(tmp_path):
    uri_file, password_file = tmp_path / "uri", tmp_path / "password"
    uri_file.write_text("mongodb://db.internal:27017/?authSource=admin\n")
    password_file.write_text(PASSWORD)
    s = settings(mongodb_uri_file=uri_file, mongodb_username="clip", mongodb_password_file=password_file)
    assert s.mongodb_uri == "mongodb://db.internal:27017/?authSource=admin"
    assert mongo_client_options(s) == {"username": "clip", "password": PASSWORD}


@pytest.mark.parametrize(
    ("values", "names"),
    [
        (sasl(kafka_sasl_mechanism=None), "KAFKA_SASL_MECHANISM"),
        (sasl(kafka_sasl_username=None), "KAFKA_SASL_USERNAME"),
        (sasl(kafka_sasl_password=None), "KAFKA_SASL_PASSWORD"),
        (sasl(kafka_sasl_password=""), "KAFKA_SASL_PASSWORD"),
        (sasl(kafka_sasl_mechanism="GSSAPI"), "KAFKA_SASL_MECHANISM"),
        ({"kafka_security_protocol": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"kafka_sasl_mechanism": "PLAIN"}, "KAFKA_SASL_MECHANISM is set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT"),
        ({"kafka_sasl_password": PASSWORD}, "KAFKA_SASL_PASSWORD is set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT"),
        ({"kafka_ssl_ca_file": "ca"}, "KAFKA_SSL_CA_FILE is set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "missing"}, "KAFKA_SSL_CA_FILE: cannot read"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "not_pem"}, "KAFKA_SSL_CA_FILE: no usable CA certificate"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_key_file": "client.key"}, "KAFKA_SSL_KEY_FILE is set without KAFKA_SSL_CERT_FILE"),
        (
            {
                "kafka_security_protocol": "SSL",
                "kafka_ssl_cert_file": "client.cert",
                "kafka_ssl_key_file": "client.key",
                "kafka_ssl_key_password": "wrong",
            },
            "KAFKA_SSL_KEY_PASSWORD",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cert_file": "client.cert", "kafka_ssl_key_file": "client.key"},
            "KAFKA_SSL_KEY_PASSWORD",
        ),
        ({"kafka_security_protocol": "SASL_SSL", **sasl(), "kafka_sasl_password_file": "missing"}, "not both"),
        ({"mongodb_password": PASSWORD}, "MONGODB_PASSWORD is set without MONGODB_USERNAME"),
        ({"mongodb_username": "clip"}, "MONGODB_USERNAME is set without MONGODB_PASSWORD"),
        ({"mongodb_uri": f"mongodb://a:{PASSWORD}@h", "mongodb_username": "b", "mongodb_password": "c"}, "MONGODB_URI has credentials"),
        ({"mongodb_tls": False, "mongodb_tls_ca_file": "ca"}, "MONGODB_TLS_CA_FILE is set but MONGODB_TLS=false"),
        ({"mongodb_tls_ca_file": "missing"}, "MONGODB_TLS_CA_FILE: cannot read"),
        ({"mongodb_tls_cert_key_file": "not_pem"}, "MONGODB_TLS_CERT_KEY_FILE"),
        ({"mongodb_tls_cert_key_file": "client.key"}, "MONGODB_TLS_CERT_KEY_FILE"),
        ({"mongodb_password_file": "missing", "mongodb_username": "u"}, "MONGODB_PASSWORD_FILE: cannot read"),
        ({"metrics_port": 0}, "METRICS_PORT"),
    ],
)
def test_misconfiguration_fails_at_load_naming_the_variable(certs, values, names):
    paths = {
        "ca": certs["ca"],
        "missing": certs["missing"],
        "not_pem": certs["not_pem"],
        "client.cert": certs["client"].cert,
        "client.key": certs["client"].key,
    }
    resolved = {k: (paths.get(v, v) if isinstance(v, str) and (k.endswith("_file")) else v) for k, v in values.items()}
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_settings(_env_file=None, **resolved)
    assert time.monotonic() - started < 5, "loading settings must not wait (e.g. for a key passphrase prompt)"
    assert names in str(err.value)
    assert PASSWORD not in str(err.value)


def test_mongo_client_gets_credentials_and_tls(certs):
    s = settings(
        mongodb_uri="mongodb://db.internal:27017/?replicaSet=rs0",
        mongodb_username="clip",
        mongodb_password=PASSWORD,
        mongodb_tls_ca_file=certs["ca"],
        mongodb_tls_cert_key_file=certs["combined"],
    )
    options = mongo_client_options(s)
    assert options == {
        "tls": True,
        "tlsCAFile": str(certs["ca"]),
        "tlsCertificateKeyFile": str(certs["combined"]),
        "username": "clip",
        "password": PASSWORD,
    }
    assert mongo_client_options(settings(mongodb_uri="mongodb+srv://cluster.example/")) == {}
    assert mongo_client_options(settings(mongodb_tls=True)) == {"tls": True}


async def test_mongo_client_builds_an_async_client_lazily():
    s = settings(mongodb_uri="mongodb://127.0.0.1:1/", mongodb_username="clip", mongodb_password=PASSWORD, mongodb_tls=False)
    client = mongo_client(s, connect=False)
    try:
        assert isinstance(client, AsyncMongoClient)
        credentials = client.options.pool_options._credentials
        assert (credentials.username, credentials.password) == ("clip", PASSWORD)
        assert client.options.pool_options._ssl_context is None
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("mongodb://user:s3cr%40t@db:27017/app", "mongodb://user:***@db:27017/app"),
        ("mongodb://user:p@ss@h1:1,h2:2/?replicaSet=rs", "mongodb://user:***@h1:1,h2:2/?replicaSet=rs"),
        ("mongodb+srv://user:pw@cluster.example/db?retryWrites=true", "mongodb+srv://user:***@cluster.example/db?retryWrites=true"),
        (
            "mongodb://db:27017/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:tok",
            "mongodb://db:27017/?authMechanism=MONGODB-AWS&authMechanismProperties=***",
        ),
        ("mongodb://db/?tls=true&tlsCertificateKeyFilePassword=pw", "mongodb://db/?tls=true&tlsCertificateKeyFilePassword=***"),
        ("mongodb://user@db/", "mongodb://user@db/"),
        ("mongodb://db:27017", "mongodb://db:27017"),
        ("not a uri", "not a uri"),
    ],
)
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_metrics_exposure_settings(monkeypatch):
    assert (settings().metrics_host, settings().metrics_port) == ("0.0.0.0", 9100)  # nosec B104  # asserting the default
    monkeypatch.setenv("METRICS_HOST", "127.0.0.1")
    monkeypatch.setenv("METRICS_PORT", "9200")
    loaded = load_settings(_env_file=None)
    assert (loaded.metrics_host, loaded.metrics_port) == ("127.0.0.1", 9200)


async def test_a_url_in_query_image_b64_is_invalid_base64_and_never_fetched(tiny_model, monkeypatch):
    """Images arrive inline: an http:// "image" is rejected by the base64 decoder, no socket is opened."""
    service = build_service(settings(clip_model=tiny_model, reply_topic="replies", dead_letter_topic="dead"))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/product.png"
        opened = []
        real_connect = socket.socket.connect
        monkeypatch.setattr(socket.socket, "connect", lambda self, addr: opened.append(addr) or real_connect(self, addr))
        monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: opened.append(a) or pytest.fail("name lookup"))
        request = {"request_id": "url-1", "query_image_b64": url}
        record = ConsumerRecord(service.settings.search_requests_topic, 0, 7, 0, 0, None, json.dumps(request).encode(), None, 0, 0, [])
        _report, out = await service.process([record])
        with pytest.raises(BlockingIOError):
            server.accept()
    assert opened == []
    replies = [json.loads(m.value) for m in out if m.topic == "replies"]
    assert [(r["request_id"], r["error"]["code"]) for r in replies] == [("url-1", "invalid_base64")]
    dead = [dict(m.headers) for m in out if m.topic == "dead"]
    assert [d["error.code"] for d in dead] == [b"invalid_base64"]
    assert service.encoder.load_counts == {"text": 0, "vision": 0}

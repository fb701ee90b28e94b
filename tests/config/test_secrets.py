"""Secrets never leave the process: not in logs, the config dump, replies, dead letters, /metrics or errors."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import urllib.request

import pytest
from prometheus_client import REGISTRY, generate_latest
from pydantic import ValidationError

from consumer import app
from consumer.config.settings import ConfigError, Settings, load_settings
from consumer.domain.errors import StartupError
from consumer.domain.messages import Outbound
from consumer.kafka.clients import make_producer, start_kafka_client
from consumer.kafka.transport import publish_all
from devservices import free_port
from tests.conftest import topic_names, wait_for
from tests.tls_services import CLIENT_KEY_PASSWORD, MONGO_PASSWORD, MONGO_USER, create_topics, read_topic, sasl_settings

SASL_PASSWORD = "sasl-password-Qm4"
SECRETS = (CLIENT_KEY_PASSWORD, MONGO_PASSWORD, SASL_PASSWORD)


def assert_no_secret(where: str, text: str | bytes) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"secret(s) {leaked} found in {where}"


def http_get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # nosec B310  # loopback test server
            return response.read().decode()
    except urllib.error.HTTPError as err:
        return err.read().decode()


async def test_secrets_stay_out_of_logs_replies_dead_letters_and_metrics(
    pki, tls_kafka, tls_mongo, tiny_model, tmp_path, monkeypatch, caplog, capsys
):
    caplog.set_level(logging.DEBUG)
    topics = {name.upper(): value for name, value in topic_names("sec-").items()}
    key_password_file = tmp_path / "kafka-key-password"
    key_password_file.write_text(CLIENT_KEY_PASSWORD + "\n")
    metrics_port = free_port()
    env = topics | {
        "KAFKA_BOOTSTRAP_SERVERS": tls_kafka.bootstrap,
        "KAFKA_SECURITY_PROTOCOL": "SSL",
        "KAFKA_SSL_CA_FILE": str(pki.ca),
        "KAFKA_SSL_CERT_FILE": str(pki.client.cert),
        "KAFKA_SSL_KEY_FILE": str(pki.client.key),
        "KAFKA_SSL_KEY_PASSWORD_FILE": str(key_password_file),
        "MONGODB_URI": f"mongodb://{MONGO_USER}:{MONGO_PASSWORD}@localhost:{tls_mongo.tls.port}/?directConnection=true",
        "MONGODB_TLS": "true",
        "MONGODB_TLS_CA_FILE": str(pki.ca),
        "MONGODB_DATABASE": "secrets_" + topics["CONSUMER_GROUP_ID"].rsplit("-", 1)[1],
        "CLIP_MODEL": tiny_model,
        "KAFKA_SESSION_TIMEOUT_MS": "1500",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "250",
        "MAX_BATCH_WAIT_MS": "20",
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(metrics_port),
        "LOG_LEVEL": "DEBUG",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(_env_file=None)
    assert settings.kafka_ssl_key_password.get_secret_value() == CLIENT_KEY_PASSWORD, "the _FILE secret was not read"
    await create_topics(
        settings, [topics[k] for k in ("SEARCH_REQUESTS_TOPIC", "PRODUCT_UPDATES_TOPIC", "REPLY_TOPIC", "DEAD_LETTER_TOPIC")]
    )

    services = []
    real_build = app.build_service
    monkeypatch.setattr(app, "build_service", lambda s, encoder=None: services.append(real_build(s, encoder)) or services[-1])
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(app.serve(settings))
    try:
        await wait_for(lambda: (services and services[0].assigned.is_set()) or task.done(), what="service started")
        assert not task.done(), task.exception()
        service = services[0]
        reply_to = topics["REPLY_TOPIC"]
        bad = [
            b"{not json",
            json.dumps({"request_id": "bad-url", "query_image_b64": "http://127.0.0.1:1/x.png", "reply_to": reply_to}).encode(),
            json.dumps({"request_id": "bad-topk", "query_text": "kettle", "top_k": "many", "reply_to": reply_to}).encode(),
        ]
        good = json.dumps({"request_id": "ok-1", "query_text": "Steel kettle", "reply_to": reply_to}).encode()
        product = json.dumps({"product_id": "p-1", "version": 1, "name": "Steel kettle"}).encode()
        producer = make_producer(settings)
        await producer.start()
        try:
            await publish_all(producer, [Outbound(topics["PRODUCT_UPDATES_TOPIC"], product, b"p-1")])
            await wait_for(lambda: len(service.index) == 1, what="product indexed")
            await publish_all(producer, [Outbound(topics["SEARCH_REQUESTS_TOPIC"], v) for v in [*bad, good]])
        finally:
            await producer.stop()
        replies = await read_topic(settings, reply_to, 3)
        dead = await read_topic(settings, topics["DEAD_LETTER_TOPIC"], 3)
        scraped = {
            path: await asyncio.to_thread(http_get, f"http://127.0.0.1:{metrics_port}{path}")
            for path in ("/metrics", "/healthz", "/readyz")
        }
        registries = generate_latest(service.metrics.registry) + generate_latest(REGISTRY)
    finally:
        if services:
            services[0].request_stop()
        await asyncio.wait_for(task, 30)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    by_id = {json.loads(r.value)["request_id"]: json.loads(r.value) for r in replies}
    assert by_id["bad-url"]["error"]["code"] == "invalid_base64"
    assert by_id["bad-topk"]["status"] == "error" and by_id["ok-1"]["status"] == "ok"
    assert "clip_search" in scraped["/metrics"]
    assert "effective configuration" in caplog.text and '"kafka_ssl_key_password": "**********"' in caplog.text
    assert f"{MONGO_USER}:***@localhost" in caplog.text, "the config dump did not show the redacted MongoDB URI"
    assert "stopped after" in caplog.text, "the service did not shut down through serve()"

    out = capsys.readouterr()
    assert_no_secret("captured logs", caplog.text)
    assert_no_secret("stdout", out.out)
    assert_no_secret("stderr", out.err)
    for record in replies + dead:
        assert_no_secret(f"{record.topic} value", record.value or b"")
        assert_no_secret(f"{record.topic} key", record.key or b"")
        for name, value in record.headers:
            assert_no_secret(f"{record.topic} header {name}", value)
    for path, body in scraped.items():
        assert_no_secret(path, body)
    assert_no_secret("prometheus registries", registries)


async def test_a_refused_sasl_start_does_not_leak_the_password(sasl_broker, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    settings = sasl_settings(sasl_broker, "SCRAM-SHA-256", SASL_PASSWORD)
    producer = make_producer(settings)
    with pytest.raises(StartupError) as err:
        await asyncio.wait_for(start_kafka_client(settings, producer), 20)
    assert "KAFKA_SASL_PASSWORD" in str(err.value)
    assert_no_secret("StartupError", str(err.value))
    assert_no_secret("captured logs", caplog.text)
    out = capsys.readouterr()
    assert_no_secret("stdout/stderr", out.out + out.err)


def test_configuration_errors_never_echo_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv("MONGODB_URI", f"mongodb://{MONGO_USER}:{MONGO_PASSWORD}@db.example:27017")
    monkeypatch.setenv("KAFKA_SSL_KEY_PASSWORD", CLIENT_KEY_PASSWORD)
    cases = [
        {"TOP_K": "many"},
        {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
        {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI", "KAFKA_SASL_USERNAME": "u"},
        {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERT_FILE": str(tmp_path / "missing.crt")},
        {"MONGODB_USERNAME": "someone"},
    ]
    for case in cases:
        with monkeypatch.context() as m:
            for name, value in case.items():
                m.setenv(name, value)
            with pytest.raises(ConfigError) as err:
                load_settings(_env_file=None)
            assert_no_secret(f"ConfigError for {case}", str(err.value))
            with pytest.raises(ValidationError) as raw:
                Settings(_env_file=None)
            assert_no_secret(f"ValidationError for {case}", str(raw.value))
    settings = Settings(
        _env_file=None,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="u",
        kafka_ssl_key_password=None,
    )
    for rendered in (repr(settings), str(settings), json.dumps(settings.safe_dump()), settings.model_dump_json()):
        assert_no_secret("rendered settings", rendered)

"""Real TLS and SASL: the service through stunnel-fronted Tansu, MongoDB through stunnel, SASL refusals by Tansu."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess  # nosec B404  # runs the service under test
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from consumer.app import build_service
from consumer.config.settings import Settings
from consumer.domain.errors import StartupError
from consumer.domain.messages import Outbound
from consumer.kafka.clients import client_options, kafka_security_options, make_producer, start_kafka_client
from consumer.kafka.transport import publish_all
from consumer.store.client import check_mongo, mongo_client
from devservices import free_port
from tests.conftest import running, topic_names, wait_for
from tests.tls_services import MONGO_PASSWORD, MONGO_USER, create_topics, read_topic, sasl_settings, ssl_settings

START_BOUND_S = 20
REPO = Path(__file__).resolve().parents[2]


async def start_error(settings: Settings) -> str:
    """The StartupError message of a service built from ``settings`` (fails the test if it starts)."""
    service = build_service(settings)
    try:
        with pytest.raises(StartupError) as err:
            await asyncio.wait_for(service.start(), START_BOUND_S)
    finally:
        await service.close()
    return str(err.value)


async def test_service_searches_end_to_end_over_tls(pki, tls_kafka, tiny_model):
    topics = topic_names()
    settings = ssl_settings(pki, tls_kafka, clip_model=tiny_model, **topics)
    await create_topics(
        settings, [topics[k] for k in ("search_requests_topic", "product_updates_topic", "reply_topic", "dead_letter_topic")]
    )
    service = build_service(settings)
    products = [
        {"product_id": "p-1", "version": 1, "name": "Red cotton t-shirt", "category": "apparel"},
        {"product_id": "p-2", "version": 1, "name": "Steel kettle", "category": "kitchen"},
    ]
    producer = make_producer(settings)
    async with running(service):
        await producer.start()
        try:
            await publish_all(
                producer, [Outbound(topics["product_updates_topic"], json.dumps(p).encode(), p["product_id"].encode()) for p in products]
            )
            await wait_for(lambda: len(service.index) == 2, what="products indexed over TLS")
            request = {"request_id": "tls-1", "query_text": "Steel kettle", "top_k": 1, "reply_to": topics["reply_topic"]}
            await publish_all(producer, [Outbound(topics["search_requests_topic"], json.dumps(request).encode(), b"tls-1")])
            [reply] = await read_topic(settings, topics["reply_topic"], 1)
        finally:
            await producer.stop()
    body = json.loads(reply.value)
    assert body["request_id"] == "tls-1" and body["status"] == "ok"
    assert body["items"][0]["product_id"] == "p-2"
    assert tls_kafka.tls.log_tail().count("accepted connection") >= 3, "traffic did not go through stunnel"


async def test_a_certificate_from_another_ca_is_refused_at_start(pki, tls_kafka, tiny_model):
    settings = ssl_settings(pki, tls_kafka, clip_model=tiny_model, kafka_ssl_ca_file=pki.other_ca, **topic_names("tls-"))
    message = await start_error(settings)
    assert "KAFKA_SSL_CA_FILE" in message and "not trusted" in message

    raw = AIOKafkaProducer(**client_options(settings))
    try:
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(raw.start(), START_BOUND_S)
    finally:
        await raw.stop()


async def test_the_service_process_exits_with_a_readable_tls_error(pki, tls_kafka, tiny_model, tmp_path):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "CLIP_MODEL": tiny_model,
        "KAFKA_BOOTSTRAP_SERVERS": tls_kafka.bootstrap,
        "KAFKA_SECURITY_PROTOCOL": "SSL",
        "KAFKA_SSL_CA_FILE": str(pki.other_ca),
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(free_port()),
    }
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "consumer"], env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("clip-search could not start: TLS to Kafka failed") and "KAFKA_SSL_CA_FILE" in last
    assert "Traceback" not in proc.stderr


async def test_a_certificate_for_another_host_name_is_refused_unless_the_check_is_off(pki, tls_kafka):
    wrong_name = f"localhost:{tls_kafka.wrong_name.port}"
    settings = ssl_settings(pki, tls_kafka, kafka_bootstrap_servers=wrong_name)
    producer = make_producer(settings)
    with pytest.raises(StartupError) as err:
        await asyncio.wait_for(start_kafka_client(settings, producer), START_BOUND_S)
    assert "not valid for the name 'localhost'" in str(err.value) and "KAFKA_BOOTSTRAP_SERVERS" in str(err.value)

    raw = AIOKafkaProducer(bootstrap_servers=wrong_name, **kafka_security_options(settings))
    try:
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(raw.start(), START_BOUND_S)
    finally:
        await raw.stop()

    unchecked = ssl_settings(pki, tls_kafka, kafka_bootstrap_servers=wrong_name, kafka_ssl_check_hostname=False)
    producer = make_producer(unchecked)
    try:
        await asyncio.wait_for(start_kafka_client(unchecked, producer), START_BOUND_S)
    finally:
        await producer.stop()


async def test_tls_against_a_plaintext_listener_fails_with_a_bounded_error_naming_the_protocol(pki, tls_kafka):
    settings = ssl_settings(pki, tls_kafka, kafka_bootstrap_servers=tls_kafka.broker.bootstrap)
    producer = make_producer(settings, request_timeout_ms=1000)
    try:
        with pytest.raises(KafkaConnectionError) as err:
            await asyncio.wait_for(start_kafka_client(settings, producer, timeout=2), START_BOUND_S)
    finally:
        await producer.stop()
    assert "is it a TLS listener? check KAFKA_SECURITY_PROTOCOL" in str(err.value)


def mongo_settings(pki, tls_mongo, **overrides) -> Settings:
    values = {
        "mongodb_uri": tls_mongo.uri,
        "mongodb_tls": True,
        "mongodb_tls_ca_file": pki.ca,
        "mongodb_username": MONGO_USER,
        "mongodb_password": MONGO_PASSWORD,
        "_env_file": None,
    }
    return Settings(**(values | overrides))


async def test_mongo_over_tls_with_credentials(pki, tls_mongo):
    settings = mongo_settings(pki, tls_mongo)
    client = mongo_client(settings, serverSelectionTimeoutMS=5000)
    try:
        await check_mongo(client, settings, timeout=10)
        collection = client[settings.mongodb_database][f"tls_{uuid.uuid4().hex[:8]}"]
        await collection.insert_one({"_id": "p-1", "name": "kettle"})
        assert await collection.find_one({"_id": "p-1"}) == {"_id": "p-1", "name": "kettle"}
    finally:
        await client.close()
    assert "accepted connection" in tls_mongo.tls.log_tail(), "traffic did not go through stunnel"


@pytest.mark.parametrize("wrong", ["MONGODB_TLS_CA_FILE", "MONGODB_PASSWORD"])
async def test_mongo_refusals_name_the_setting(pki, tls_mongo, wrong):
    override = {"MONGODB_TLS_CA_FILE": {"mongodb_tls_ca_file": pki.other_ca}, "MONGODB_PASSWORD": {"mongodb_password": "not-the-password"}}
    settings = mongo_settings(pki, tls_mongo, **override[wrong])
    client = mongo_client(settings, serverSelectionTimeoutMS=1000)
    try:
        with pytest.raises(StartupError) as err:
            await check_mongo(client, settings, timeout=10)
    finally:
        await client.close()
    assert wrong in str(err.value)
    assert "not-the-password" not in str(err.value) and MONGO_PASSWORD not in str(err.value)


async def test_broker_requiring_sasl_refuses_unknown_scram_credentials_at_start(sasl_broker, tiny_model):
    password = "scram-password-Lk3"
    settings = sasl_settings(sasl_broker, "SCRAM-SHA-512", password, clip_model=tiny_model, **topic_names("tls-"))
    message = await start_error(settings)
    assert "KAFKA_SASL_USERNAME" in message and "KAFKA_SASL_PASSWORD" in message
    assert password not in message


async def test_plaintext_client_against_a_sasl_broker_is_told_to_check_the_protocol(sasl_broker):
    settings = Settings(kafka_bootstrap_servers=sasl_broker.bootstrap, _env_file=None)
    producer = make_producer(settings, request_timeout_ms=3000)
    try:
        with pytest.raises(KafkaConnectionError) as err:
            await asyncio.wait_for(start_kafka_client(settings, producer), START_BOUND_S)
    finally:
        await producer.stop()
    assert "KAFKA_SECURITY_PROTOCOL=PLAINTEXT" in str(err.value)

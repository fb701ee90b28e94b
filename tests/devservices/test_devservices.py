"""Real-process checks of devservices: Tansu, noida-db (Kafka) and SecantusDB (Mongo)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import InvalidSessionTimeoutError, KafkaError
from aiokafka.structs import TopicPartition
from pymongo import WriteConcern

from devservices import MongoServer, NoidaBroker, ServiceError, TansuBroker, create_topics, free_port, kafka_ready

pytestmark = pytest.mark.integration  # starts Tansu, noida-db and SecantusDB processes

TOPIC = "products"
N = 10
Broker = TansuBroker | NoidaBroker


@pytest.fixture(params=[TansuBroker, NoidaBroker], ids=["tansu", "noida"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    with request.param() as b:
        yield b


async def produce(bootstrap: str, topic: str, n: int = N) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(n):
            await producer.send_and_wait(
                topic,
                f"v{i}".encode(),
                key=f"k{i}".encode(),
                partition=i % 3,
                headers=[("trace-id", f"t{i}".encode()), ("kind", b"test")],
            )
    finally:
        await producer.stop()


def group_consumer(b: Broker, *topics: str, group: str = "g1") -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=b.bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **b.consumer_group_config,
    )


async def drain(consumer: AIOKafkaConsumer, n: int, timeout: float = 15.0) -> list:
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < n:
        assert time.monotonic() < deadline, f"got {len(records)}/{n} records"
        batch = await consumer.getmany(timeout_ms=200)
        records.extend(r for rs in batch.values() for r in rs)
    return records


def check_records(records: list) -> None:
    assert sorted(r.value for r in records) == sorted(f"v{i}".encode() for i in range(N))
    for r in records:
        i = int(r.value[1:])
        assert r.key == f"k{i}".encode() and r.partition == i % 3
        assert dict(r.headers) == {"trace-id": f"t{i}".encode(), "kind": b"test"}


EXPECTED_COMMITTED = {p: len(range(p, N, 3)) for p in range(3)}


def test_free_port() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_start_failure_reports_log_tail() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        b = TansuBroker(port=s.getsockname()[1])
        with pytest.raises(ServiceError, match="tansu"):
            b.start(timeout=5)
        assert not b.running
        b.close()


@pytest.mark.asyncio
async def test_kafka_roundtrip(broker: Broker) -> None:
    assert kafka_ready("127.0.0.1", broker.port)
    await create_topics(broker.bootstrap, [TOPIC, "state"], partitions=3, compacted={"state"})
    await create_topics(broker.bootstrap, [TOPIC, "state"], partitions=3, compacted={"state"})
    await produce(broker.bootstrap, TOPIC)

    consumer = group_consumer(broker, TOPIC)
    t0 = time.monotonic()
    await consumer.start()
    try:
        records = await drain(consumer, N)
        join_s = time.monotonic() - t0
        assert {tp.partition for tp in consumer.assignment()} == {0, 1, 2}
        check_records(records)
        await consumer.commit()
        committed = {p: await consumer.committed(TopicPartition(TOPIC, p)) for p in range(3)}
        assert committed == EXPECTED_COMMITTED
    finally:
        await consumer.stop()
    assert join_s < 5, join_s


@pytest.mark.asyncio
async def test_noida_survives_sigkill(tmp_path) -> None:
    b = NoidaBroker(data_dir=tmp_path / "noida")
    with b.start():
        await create_topics(b.bootstrap, [TOPIC], partitions=3)
        await produce(b.bootstrap, TOPIC)
        consumer = group_consumer(b, TOPIC)
        await consumer.start()
        try:
            await drain(consumer, N)
            await consumer.commit()
        finally:
            await consumer.stop()
        b.wait_saved(since=time.time())
        port, pid = b.port, b.pid
        b.kill()
        b.start()
        assert b.port == port and b.pid != pid

        consumer = AIOKafkaConsumer(bootstrap_servers=b.bootstrap, group_id="g1", enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(TOPIC, p) for p in range(3)]
            consumer.assign(tps)
            assert {p: await consumer.committed(TopicPartition(TOPIC, p)) for p in range(3)} == EXPECTED_COMMITTED
            await consumer.seek_to_beginning(*tps)
            check_records(await drain(consumer, N))
        finally:
            await consumer.stop()

        b.restart()
        consumer = AIOKafkaConsumer(bootstrap_servers=b.bootstrap)
        await consumer.start()
        try:
            ends = await consumer.end_offsets([TopicPartition(TOPIC, p) for p in range(3)])
            assert sum(ends.values()) == N
        finally:
            await consumer.stop()


@pytest.mark.asyncio
async def test_noida_rejects_short_session_timeout() -> None:
    with NoidaBroker() as b:
        consumer = AIOKafkaConsumer(TOPIC, bootstrap_servers=b.bootstrap, group_id="g", session_timeout_ms=1500, heartbeat_interval_ms=250)
        with pytest.raises(InvalidSessionTimeoutError):
            await consumer.start()
        await consumer.stop()


@pytest.mark.asyncio
async def test_tansu_quirks() -> None:
    """Documents Tansu limits: no idempotent producer, memory-only storage."""
    with TansuBroker() as b:
        await produce(b.bootstrap, TOPIC, 1)
        producer = AIOKafkaProducer(bootstrap_servers=b.bootstrap, enable_idempotence=True)
        with pytest.raises(KafkaError):
            await asyncio.wait_for(producer.start(), 10)
        await producer.stop()
        b.restart()
        consumer = AIOKafkaConsumer(bootstrap_servers=b.bootstrap)
        await consumer.start()
        try:
            assert TOPIC not in await consumer.topics()
        finally:
            await consumer.stop()


def test_mongo_file_storage_survives_restart_and_kill(tmp_path) -> None:
    storage = tmp_path / "mongo-data"
    with MongoServer(storage_path=storage) as m:
        with m.client() as c:
            c.db.items.insert_many([{"_id": i, "name": f"item{i}"} for i in range(5)])
            assert c.db.items.find_one({"_id": 3})["name"] == "item3"
        m.restart()
        with m.client() as c:
            assert c.db.items.count_documents({}) == 5
            c.db.get_collection("items", write_concern=WriteConcern(j=True)).insert_one({"_id": 5, "name": "item5"})
        m.kill()
        m.start()
        with m.client() as c:
            assert sorted(d["_id"] for d in c.db.items.find()) == list(range(6))
    assert storage.exists()


def test_mongo_memory_is_ephemeral() -> None:
    with MongoServer(storage_path=":memory:") as m:
        assert m.uri == f"mongodb://127.0.0.1:{m.port}"
        with m.client() as c:
            c.db.items.insert_one({"_id": 1})
            assert c.db.items.find_one({"_id": 1}) == {"_id": 1}
        m.restart()
        with m.client() as c:
            assert c.db.items.count_documents({}) == 0

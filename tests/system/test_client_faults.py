"""A client's mistakes and the service's own failures never stop a replica.

Two ``python -m consumer`` replicas in one consumer group (separate processes) on the real Tansu
broker and MongoDB-wire store, as in ``tests/system/test_faults.py``, whose stream, tally and table this
module reuses: its rows are "client-error burst (70% invalid)", "poison record" and "reply to a
forbidden or undeliverable topic". Every request with a readable id gets exactly one reply, every
unreadable record exactly one dead letter, and both replicas stay up.
"""

from __future__ import annotations

import json
import signal
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from devservices import create_topics
from tests.conftest import create_stream_topics, topic_names, wait_for
from tests.kafka_tools import Tap, as_json, read_topics, send_raw, wait_committed
from tests.system.test_faults import TANSU_GROUP, ServiceProcess, make_stream, mongo_versions, process_env, record

pytestmark = pytest.mark.integration  # service processes on the real broker and store

POISON = "poison pill query"


async def start_replicas(tmp_path, env: dict[str, str], module: str = "consumer", n: int = 2) -> list[ServiceProcess]:
    replicas = [ServiceProcess(tmp_path, env | {"KAFKA_CLIENT_ID": f"replica-{i}"}, module=module) for i in range(n)]
    for replica in replicas:
        await replica.start()
    return replicas


def assert_alive(replicas: list[ServiceProcess]) -> None:
    for replica in replicas:
        assert replica.proc.poll() is None, f"a replica exited:\n{replica.log()[-3000:]}"


async def seconds_to_answer(bootstrap: str, names: dict[str, str], tap: Tap, prefix: str) -> dict[int, float]:
    """One valid search on each partition of the request topic (so every replica gets one): partition -> seconds until its reply."""
    topic, replies = names["search_requests_topic"], names["reply_topic"]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    sent: dict[str, tuple[int, float]] = {}
    try:
        for partition in sorted(await producer.partitions_for(topic)):
            rid = f"{prefix}-{partition}-{uuid.uuid4().hex[:6]}"
            request = {"request_id": rid, "query_text": "red cotton t-shirt", "top_k": 3, "reply_to": replies}
            started = time.monotonic()
            await (await producer.send(topic, as_json(request), key=rid.encode(), partition=partition))
            sent[rid] = (partition, started)
    finally:
        await producer.stop()
    answered: dict[int, float] = {}

    def all_answered() -> bool:
        ids = tap.reply_ids(replies)
        for rid, (partition, started) in sent.items():
            if rid in ids and partition not in answered:
                answered[partition] = time.monotonic() - started
        return len(answered) == len(sent)

    await wait_for(all_answered, timeout=30, what="a valid search on every partition answered")
    return answered


async def test_client_error_burst_two_replicas(broker, mongo, tiny_model, tmp_path, fault_table):
    """1,000 requests in one burst, 70% invalid in assorted ways (a third of those unreadable)."""
    names = topic_names()
    await create_stream_topics(broker.bootstrap, names)
    stream = make_stream("burst", names, valid=300, invalid=700)
    assert stream.requests == 1000
    replicas = await start_replicas(tmp_path, process_env(broker.bootstrap, names, tiny_model, mongo.uri, TANSU_GROUP))
    try:
        async with Tap(broker.bootstrap, names["reply_topic"], names["dead_letter_topic"]) as tap:
            acks = await send_raw(broker.bootstrap, stream.messages)
            await wait_for(lambda: stream.answered(tap), timeout=180, what="every request of the burst answered")
            await wait_committed(broker.bootstrap, names["consumer_group_id"], acks)
            assert_alive(replicas)
            after_burst = await seconds_to_answer(broker.bootstrap, names, tap, "after-burst")
            assert max(after_burst.values()) < 1.0, f"seconds to answer a valid search per partition after the burst: {after_burst}"

            replicas[0].signal(signal.SIGTERM)
            assert await replicas[0].wait() == 0, replicas[0].log()[-3000:]
            await replicas[0].start()
            await seconds_to_answer(broker.bootstrap, names, tap, "after-restart")
            assert_alive(replicas)
        versions = mongo_versions(mongo, names, stream)
        await record(fault_table, "client-error burst (70% invalid)", stream, broker.bootstrap, versions)
    finally:
        for replica in replicas:
            replica.kill()


def dead_letter_headers(got, names, needle: bytes) -> dict[str, bytes]:
    [dead] = [d for d in got[names["dead_letter_topic"]] if needle in d.value]
    return dict(dead.headers)


async def test_poison_record_is_isolated_and_dead_lettered(broker, mongo, tiny_model, tmp_path, fault_table):
    """The encoder raises for one query text (``tests/system/poison_consumer.py``): after ``POISON_MAX_ATTEMPTS`` that
    request is dead-lettered as internal_error and answered with that error; its batch mates are answered."""
    names = topic_names()
    await create_stream_topics(broker.bootstrap, names)
    stream = make_stream("poison", names, valid=80, invalid=12)
    poison = ("poison-1", {"request_id": "poison-1", "query_text": POISON, "top_k": 3, "reply_to": names["reply_topic"]})
    stream.first.insert(len(stream.first) // 2, (names["search_requests_topic"], as_json(poison[1]), poison[0].encode()))
    stream.invalid_ids.add(poison[0])
    env = process_env(broker.bootstrap, names, tiny_model, mongo.uri, TANSU_GROUP, POISON_QUERY_TEXT=POISON, POISON_MAX_ATTEMPTS="3")
    replicas = await start_replicas(tmp_path, env, module="tests.system.poison_consumer")
    try:
        async with Tap(broker.bootstrap, names["reply_topic"], names["dead_letter_topic"]) as tap:
            acks = await send_raw(broker.bootstrap, stream.messages)
            await wait_for(lambda: stream.answered(tap), timeout=120, what="every request answered, the poison one included")
            await wait_committed(broker.bootstrap, names["consumer_group_id"], acks)
            assert_alive(replicas)
            await seconds_to_answer(broker.bootstrap, names, tap, "after-poison")
        got = await read_topics(broker.bootstrap, [names["reply_topic"], names["dead_letter_topic"]])
        headers = dead_letter_headers(got, names, POISON.encode())
        assert headers["error.code"] == b"internal_error" and headers["error.owner"] == b"service", headers
        assert b"injected fault" in headers["error.message"], headers
        [reply] = [json.loads(r.value) for r in got[names["reply_topic"]] if dict(r.headers)["correlation_id"] == b"poison-1"]
        assert reply["error"]["code"] == "internal_error", reply
        logs = "".join(r.log() for r in replicas)
        assert "failed 3 times: dead-lettered as internal_error" in logs
        await record(fault_table, "poison record", stream, broker.bootstrap, mongo_versions(mongo, names, stream))
    finally:
        for replica in replicas:
            replica.kill()


def long_products(prefix: str, names: dict[str, str], n: int = 6) -> list[tuple[str, bytes, bytes]]:
    """Products whose 1,500-character descriptions make a reply with all of them larger than 8 KiB."""
    return [
        (
            names["product_updates_topic"],
            as_json({"product_id": f"{prefix}-long-{i}", "version": 1, "name": f"long {i}", "description": ("wool " * 300).strip()}),
            f"{prefix}-long-{i}".encode(),
        )
        for i in range(n)
    ]


async def test_replies_only_go_where_they_may(broker, mongo, tiny_model, tmp_path, fault_table):
    """``reply_to`` naming each of the service's own topics gets ``reply_topic_not_allowed`` on the default reply
    topic; a reply larger than the producer may send (KAFKA_MAX_REQUEST_SIZE=8192) is dead-lettered as
    ``reply_undeliverable``, on the default topic and on a client-named one; nothing reaches the service's own topics."""
    names = topic_names()
    await create_stream_topics(broker.bootstrap, names)
    client_topic = f"client-replies-{uuid.uuid4().hex[:8]}"
    await create_topics(broker.bootstrap, [client_topic], partitions=1)
    stream = make_stream("reply", names, valid=60, invalid=12)
    req = names["search_requests_topic"]
    catalog = long_products("reply", names)
    stream.first.extend(catalog)
    stream.newest.update({key.decode(): 1 for _, _, key in catalog})

    own = ["search_requests_topic", "product_updates_topic", "features_topic", "dead_letter_topic"]
    for field in own:
        rid = f"forbidden-{field}"
        stream.second.append((req, as_json({"request_id": rid, "query_text": "shoes", "reply_to": names[field]}), rid.encode()))
        stream.invalid_ids.add(rid)
    also_bad = {"request_id": "forbidden-and-bad", "query_text": "shoes", "top_k": 10**6, "reply_to": names["features_topic"]}
    stream.second.append((req, as_json(also_bad), b"forbidden-and-bad"))
    stream.invalid_ids.add("forbidden-and-bad")
    undeliverable = []
    for rid, reply_to in (("too-large-default", names["reply_topic"]), ("too-large-client", client_topic)):
        raw = as_json({"request_id": rid, "query_text": "wool", "top_k": 100, "similarity_threshold": -1.0, "reply_to": reply_to})
        stream.second.append((req, raw, rid.encode()))
        stream.invalid_raw.add(raw)
        undeliverable.append(raw)
    small_to_client = {"request_id": "small-client", "query_text": "wool", "top_k": 1, "reply_to": client_topic}
    stream.second.append((req, as_json(small_to_client), b"small-client"))

    env = process_env(broker.bootstrap, names, tiny_model, mongo.uri, TANSU_GROUP, KAFKA_MAX_REQUEST_SIZE="8192")
    replicas = await start_replicas(tmp_path, env)
    try:
        async with Tap(broker.bootstrap, names["reply_topic"], names["dead_letter_topic"], client_topic) as tap:
            acks = await send_raw(broker.bootstrap, stream.first)
            await wait_for(lambda: stream.answered(tap, stream.first), timeout=60, what="the first half answered")
            long_ids = {key.decode() for _, _, key in catalog}
            await wait_for(lambda: long_ids <= set(mongo_versions(mongo, names, stream)), what="the long products stored")
            acks += await send_raw(broker.bootstrap, stream.second)
            await wait_for(lambda: stream.answered(tap), timeout=60, what="every request answered or dead-lettered")
            await wait_for(lambda: "small-client" in tap.reply_ids(client_topic), what="the small reply on the client's topic")
            await wait_committed(broker.bootstrap, names["consumer_group_id"], acks)
            assert_alive(replicas)
            await seconds_to_answer(broker.bootstrap, names, tap, "after-replies")

        got = await read_topics(broker.bootstrap, [names[f] for f in own] + [names["reply_topic"], client_topic])
        for field in own:
            replies = [r for r in got[names[field]] if "event-type" in dict(r.headers)]
            assert not replies, f"replies reached {field}: {replies[:3]}"
        assert got[names["features_topic"]] == [], "something reached the features topic"
        assert len(got[names["product_updates_topic"]]) == sum(m[0] == names["product_updates_topic"] for m in stream.messages)
        for field in own:
            [reply] = [r for r in got[names["reply_topic"]] if dict(r.headers)["correlation_id"] == f"forbidden-{field}".encode()]
            assert json.loads(reply.value)["error"]["code"] == "reply_topic_not_allowed"
        for raw in undeliverable:
            headers = dead_letter_headers(got, names, raw)
            assert headers["error.code"] == b"reply_undeliverable" and headers["error.owner"] == b"client", headers
            assert b"MessageSizeTooLargeError" in headers["error.message"], headers
        assert not [r for r in got[names["reply_topic"]] + got[client_topic] if b"too-large" in dict(r.headers)["correlation_id"]]
        assert [json.loads(r.value)["request_id"] for r in got[client_topic]] == ["small-client"]
        await record(
            fault_table, "reply to a forbidden or undeliverable topic", stream, broker.bootstrap, mongo_versions(mongo, names, stream)
        )
    finally:
        for replica in replicas:
            replica.kill()

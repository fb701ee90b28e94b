"""Fault injection: a mixed stream of searches and product updates published around each fault.

For every fault: each valid request_id gets an ok reply (distinct request_ids are
counted; re-sent duplicates are counted separately and reported, split into identical
re-sends and recomputed answers), each invalid request an error reply and/or a dead
letter, each bad product update a dead letter, every product ends at its newest version,
and the consumer is still running (or was restarted by the test where the fault kills
it). The module prints a table of what each fault produced.

Exactly-once replies across a failure between publishing a batch and committing it are
not possible with at-least-once delivery: the batch is delivered again. In the same
process the reply cache answers it with the identical bytes (broker restart: the commit
is refused by the restarted broker); a SIGKILLed process's successor recomputes it.
Either way the duplicates are bounded by one batch, counted and reported, not hidden.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.app import build_service
from consumer.config.settings import Settings
from consumer.kafka.service import Service
from devservices import MongoServer, NoidaBroker, TansuBroker, free_port
from tests.conftest import REPO, create_stream_topics, replies_sent, running, topic_names, wait_for
from tests.kafka_tools import Message, Tap, as_json, committed_offsets, read_topics, send_raw, wait_committed

pytestmark = pytest.mark.integration  # faults around service processes, brokers and the store

QUERIES = ["red cotton t-shirt", "blue denim jeans", "ankle boots", "green ceramic mug", "electric kettle", "desk lamp"]
NOIDA_GROUP = NoidaBroker.consumer_group_config
TANSU_GROUP = TansuBroker.consumer_group_config
FAST_RETRIES = {"retry_backoff_s": 0.3, "retry_backoff_max_s": 1.0}


# --- the stream ---------------------------------------------------------------------------


_BAD_REQUESTS = [
    lambda rid: {"request_id": rid, "query_text": "shoes", "top_k": 10**6},
    lambda rid: {"request_id": rid, "query_text": "shoes", "filters": {"colour": "red"}},
    lambda rid: {"request_id": rid, "query_text": "   "},
    lambda rid: {"request_id": rid, "query_text": "shoes", "schema_version": 9},
    lambda rid: {"request_id": rid, "query_image_b64": "not base64!!"},
    lambda rid: {"request_id": rid, "query_image_b64": "bm90IGFuIGltYWdl"},  # base64 of b"not an image"
    lambda rid: {"request_id": rid, "query_text": "x" * 2000},
    lambda rid: {"request_id": rid, "query_text": "shoes", "deadline": "2001-01-01T00:00:00Z"},
    lambda rid: {"request_id": rid, "query_text": "shoes", "colour": "red"},
    lambda rid: {"request_id": rid, "query_text": 42},
]


@dataclass
class Stream:
    """One fault's input, in two halves published before and after (or during) the fault."""

    names: dict[str, str]
    first: list[Message]
    second: list[Message]
    valid: set[str] = field(default_factory=set)
    invalid_ids: set[str] = field(default_factory=set)
    invalid_raw: set[bytes] = field(default_factory=set)
    bad_updates: set[bytes] = field(default_factory=set)
    newest: dict[str, int] = field(default_factory=dict)

    @property
    def messages(self) -> list[Message]:
        return self.first + self.second

    @property
    def requests(self) -> int:
        return sum(m[0] == self.names["search_requests_topic"] for m in self.messages)

    @property
    def expected_dead_letters(self) -> int:
        return len(self.invalid_ids) + len(self.invalid_raw) + len(self.bad_updates)

    def answered(self, tap: Tap, messages: list[Message] | None = None) -> bool:
        """True once ``tap`` saw a reply for every request_id in ``messages`` (default: all) and all dead letters."""
        if messages is None:
            wanted = self.valid | self.invalid_ids
            dead_ok = len(tap.records(self.names["dead_letter_topic"])) >= self.expected_dead_letters
        else:
            wanted = {m[2].decode() for m in messages if m[2] is not None and m[0] == self.names["search_requests_topic"]}
            dead_ok = True
        return dead_ok and wanted <= tap.reply_ids(self.names["reply_topic"])


def make_stream(prefix: str, names: dict[str, str], valid: int = 200, invalid: int = 24, products: int = 4, seed: int = 0) -> Stream:
    """``valid`` searches, ``invalid`` bad ones (a third without a request_id), ``products`` x 3 versions
    (half the products reach their newest version in the second half, half receive stale versions there)
    and one bad update; shuffled within each half."""
    rng = random.Random(seed)
    req, upd, reply = names["search_requests_topic"], names["product_updates_topic"], names["reply_topic"]
    stream = Stream(names, [], [])
    searches: list[Message] = []
    for n in range(valid):
        rid = f"{prefix}-ok-{n}"
        stream.valid.add(rid)
        searches.append(
            (req, as_json({"request_id": rid, "query_text": QUERIES[n % len(QUERIES)], "top_k": 3, "reply_to": reply}), rid.encode())
        )
    for n in range(invalid):
        if n % 3 == 2:
            raw = f"{prefix} garbage {n}".encode()
            stream.invalid_raw.add(raw)
            searches.append((req, raw, None))
        else:
            rid = f"{prefix}-bad-{n}"
            stream.invalid_ids.add(rid)
            searches.append((req, as_json(_BAD_REQUESTS[n % len(_BAD_REQUESTS)](rid)), rid.encode()))
    rng.shuffle(searches)
    half = len(searches) // 2
    first, second = searches[:half], searches[half:]
    for p in range(products):
        pid = f"{prefix}-p{p}"
        stream.newest[pid] = 3
        versions = [
            (v, {"product_id": pid, "version": v, "name": f"{QUERIES[p % len(QUERIES)]} v{v}", "price": float(v)}) for v in (1, 2, 3)
        ]
        early, late = (versions[:2], versions[2:]) if p % 2 == 0 else (versions[2:], versions[:2])
        first.extend((upd, as_json(e), pid.encode()) for _, e in early)
        second.extend((upd, as_json(e), pid.encode()) for _, e in late)
    bad = as_json({"product_id": f"{prefix}-bad-product", "version": 1})
    stream.bad_updates.add(bad)
    second.append((upd, bad, f"{prefix}-bad-product".encode()))
    rng.shuffle(first)
    rng.shuffle(second)
    stream.first, stream.second = first, second
    return stream


# --- the verdict --------------------------------------------------------------------------


@dataclass
class Tally:
    fault: str
    sent: int
    replies: int
    identical: int
    recomputed: int
    lost: list[str]
    dead_letters: int

    @property
    def duplicates(self) -> int:
        return self.identical + self.recomputed


def tally(fault: str, stream: Stream, got: dict[str, list[ConsumerRecord]], versions: dict[str, int]) -> Tally:
    """What the broker holds for ``stream``: replies, duplicates (identical bytes vs recomputed), anything lost."""
    by_id: dict[str, list[bytes]] = defaultdict(list)
    replies = got[stream.names["reply_topic"]]
    for r in replies:
        by_id[dict(r.headers)["correlation_id"].decode()].append(r.value)
    dead = got[stream.names["dead_letter_topic"]]
    dead_values = {d.value for d in dead}
    lost = [rid for rid in sorted(stream.valid) if rid not in by_id]
    wrong = [rid for rid in stream.valid & set(by_id) if any(json.loads(v)["status"] != "ok" for v in by_id[rid])]
    assert not wrong, f"valid requests answered with errors: {wrong[:5]}"
    for rid in sorted(stream.invalid_ids):
        if rid not in by_id or not any(f'"request_id": "{rid}"'.encode() in v for v in dead_values):
            lost.append(rid)
        elif any(json.loads(v)["status"] != "error" for v in by_id[rid]):
            raise AssertionError(f"{rid} is invalid but was answered ok")
    lost += [raw.decode() for raw in sorted(stream.invalid_raw | stream.bad_updates) if raw not in dead_values]
    lost += [f"{pid} v{v} (holds {versions.get(pid)})" for pid, v in sorted(stream.newest.items()) if versions.get(pid) != v]
    return Tally(
        fault=fault,
        sent=stream.requests,
        replies=len(replies),
        identical=sum(len(v) - len(set(v)) for v in by_id.values()),
        recomputed=sum(len(set(v)) - 1 for v in by_id.values()),
        lost=lost,
        dead_letters=len(dead),
    )


async def record(
    fault_table: list[Tally], fault: str, stream: Stream, bootstrap: str, versions: dict[str, int], exact: bool = True
) -> Tally:
    """Tally ``stream`` into the table and fail on anything lost; ``exact``: also on any duplicate reply or dead letter."""
    got = await read_topics(bootstrap, [stream.names["reply_topic"], stream.names["dead_letter_topic"]])
    result = tally(fault, stream, got, versions)
    fault_table.append(result)
    assert not result.lost, f"{fault}: lost {result.lost[:10]}"
    if exact:
        assert result.duplicates == 0, f"{fault}: {result.duplicates} requests answered twice"
        assert result.dead_letters == stream.expected_dead_letters, (
            f"{fault}: {result.dead_letters} dead letters for {stream.expected_dead_letters} bad records"
        )
    return result


# --- running the service --------------------------------------------------------------------


def service_settings(bootstrap: str, names: dict[str, str], model: str, group: dict[str, int], **overrides) -> Settings:
    values = {
        "kafka_bootstrap_servers": bootstrap,
        "clip_model": model,
        "kafka_session_timeout_ms": group["session_timeout_ms"],
        "kafka_heartbeat_interval_ms": group["heartbeat_interval_ms"],
        "max_batch_wait_ms": 20,
    }
    return Settings(_env_file=None, **(values | FAST_RETRIES | names | overrides))


class PublishGate:
    """Replaces ``service.publish``: while closed, the next batch waits before publishing (it is in flight)."""

    def __init__(self, service: Service) -> None:
        self._publish = service.publish
        service.publish = self
        self.opened = asyncio.Event()
        self.opened.set()
        self.holding = asyncio.Event()
        self.forwarded = asyncio.Event()

    def close(self) -> None:
        self.opened.clear()
        self.holding.clear()
        self.forwarded.clear()

    async def __call__(self, messages):
        if not self.opened.is_set():
            self.holding.set()
            await self.opened.wait()
            self.forwarded.set()
        return await self._publish(messages)


def index_versions(service: Service, stream: Stream) -> dict[str, int]:
    return {pid: v for pid in stream.newest if (v := service.index.version_of(pid)) is not None}


async def store_versions(service: Service, stream: Stream) -> dict[str, int]:
    return {pid: v for pid, (v, _, _) in (await service.store.get_versions(list(stream.newest))).items()}


# --- in-process faults ----------------------------------------------------------------------


async def test_broker_unavailable_at_start(tmp_path, tiny_model, fault_table, caplog):
    """The service starts before the broker; it retries (warning per attempt) and connects once the broker is up."""
    broker = NoidaBroker(data_dir=tmp_path / "noida")
    names = topic_names()
    try:
        await asyncio.to_thread(broker.start)
        await create_stream_topics(broker.bootstrap, names)
        await asyncio.to_thread(broker.stop)
        service = build_service(service_settings(broker.bootstrap, names, tiny_model, NOIDA_GROUP))
        stream = make_stream("start", names)
        with caplog.at_level(logging.WARNING, logger="consumer"):
            starting = asyncio.create_task(service.start())
            try:
                await wait_for(
                    lambda: sum("could not connect" in r.getMessage() for r in caplog.records) >= 2, what="retries while the broker is down"
                )
                assert not starting.done()
                await asyncio.to_thread(broker.start)
                await asyncio.wait_for(starting, 60)
            except BaseException:
                starting.cancel()
                await service.close()
                raise
        async with (
            running(service, start=False, timeout=60) as task,
            Tap(broker.bootstrap, names["reply_topic"], names["dead_letter_topic"]) as tap,
        ):
            await send_raw(broker.bootstrap, stream.messages)
            await wait_for(lambda: stream.answered(tap), timeout=60, what="every request answered")
            await wait_for(lambda: index_versions(service, stream) == stream.newest, what="product updates applied")
            assert not task.done(), "the consumer stopped"
            versions = index_versions(service, stream)
        await record(fault_table, "broker unavailable at start", stream, broker.bootstrap, versions)
    finally:
        broker.close()


async def test_broker_restart_while_running(tmp_path, tiny_model, fault_table):
    """SIGKILL the broker while a batch is in flight, restart it on the same port and data: the service resumes."""
    broker = NoidaBroker(data_dir=tmp_path / "noida")
    names = topic_names()
    try:
        await asyncio.to_thread(broker.start)
        await create_stream_topics(broker.bootstrap, names)
        service = build_service(service_settings(broker.bootstrap, names, tiny_model, NOIDA_GROUP, max_batch_size=8))
        gate = PublishGate(service)
        stream = make_stream("restart", names)
        async with running(service, timeout=60) as task, Tap(broker.bootstrap, names["reply_topic"], names["dead_letter_topic"]) as tap:
            await send_raw(broker.bootstrap, stream.first)
            await wait_for(lambda: len(tap.reply_ids(names["reply_topic"])) >= 20, what="first replies")
            gate.close()
            await asyncio.wait_for(gate.holding.wait(), 30)
            assert not stream.answered(tap, stream.first), "no request was in flight at the crash"
            await asyncio.to_thread(broker.wait_saved, time.time())
            await asyncio.to_thread(broker.kill)
            gate.opened.set()
            await asyncio.wait_for(gate.forwarded.wait(), 5)
            await asyncio.to_thread(broker.start)
            await send_raw(broker.bootstrap, stream.second)
            await wait_for(lambda: stream.answered(tap), timeout=90, what="every request answered after the restart")
            await wait_for(lambda: all(service.index.version_of(p) == 3 for p in stream.newest), what="product updates applied")
            assert not task.done(), "the consumer stopped"
            versions = index_versions(service, stream)
        result = await record(fault_table, "broker restart (SIGKILL)", stream, broker.bootstrap, versions, exact=False)
        assert result.recomputed == 0, "a redelivered request was recomputed instead of answered from the reply cache"
        assert result.identical <= 8, "more than the batch in flight was answered twice"
    finally:
        broker.close()


async def test_store_unavailable_in_cached_mode(broker, tmp_path, tiny_model, fault_table):
    """With the store down, searches are answered from the in-memory index; updates wait and apply after it returns."""
    names = topic_names()
    await create_stream_topics(broker.bootstrap, names)
    mongo = MongoServer(storage_path=tmp_path / "mongo")
    try:
        await asyncio.to_thread(mongo.start)
        uri = f"{mongo.uri}/?serverSelectionTimeoutMS=1000&connectTimeoutMS=1000"
        service = build_service(
            service_settings(broker.bootstrap, names, tiny_model, TANSU_GROUP, mongodb_uri=uri, mongodb_database="faults")
        )
        stream = make_stream("store", names)
        async with running(service, timeout=60) as task, Tap(broker.bootstrap, names["reply_topic"], names["dead_letter_topic"]) as tap:
            await send_raw(broker.bootstrap, stream.first)
            await wait_for(lambda: stream.answered(tap, stream.first), what="first half answered")
            await wait_for(lambda: all(service.index.version_of(p) is not None for p in stream.newest), what="first updates applied")
            before = index_versions(service, stream)
            await asyncio.to_thread(mongo.stop)
            await send_raw(broker.bootstrap, stream.second)
            await wait_for(lambda: stream.answered(tap, stream.second), timeout=60, what="searches answered while the store is down")
            assert not mongo.running
            assert index_versions(service, stream) == before, "an update was applied without the store"
            await asyncio.to_thread(mongo.start)
            await wait_for(
                lambda: all(service.index.version_of(p) == 3 for p in stream.newest),
                timeout=60,
                what="updates applied after the store returned",
            )
            await wait_for(lambda: stream.answered(tap), what="the bad update dead-lettered once the retries pass it")
            assert not task.done(), "the consumer stopped"
            assert await store_versions(service, stream) == stream.newest
            versions = index_versions(service, stream)
        await record(fault_table, "store unavailable", stream, broker.bootstrap, versions)
    finally:
        mongo.close()


async def test_rebalance_mid_stream(broker, mongo, tiny_model, fault_table):
    """A second replica joins while a stream is being processed: no reply lost, none doubled."""
    names = topic_names()
    await create_stream_topics(broker.bootstrap, names)
    settings = service_settings(
        broker.bootstrap,
        names,
        tiny_model,
        TANSU_GROUP,
        max_batch_size=16,
        max_batch_wait_ms=100,
        mongodb_uri=mongo.uri,
        mongodb_database=f"faults_{names['consumer_group_id'][-8:]}",
    )
    first, second = build_service(settings), build_service(settings)
    stream = make_stream("rebalance", names)
    chunks = [stream.messages[i : i + 10] for i in range(0, len(stream.messages), 10)]
    acks = []
    async with running(first, timeout=60) as first_task, Tap(broker.bootstrap, names["reply_topic"], names["dead_letter_topic"]) as tap:
        joined_at = None
        second_task = None
        try:
            for n, chunk in enumerate(chunks):
                if n >= 3:
                    await wait_for(lambda done=chunks[n - 3]: stream.answered(tap, done), what=f"chunk {n - 3} answered")
                if n == len(chunks) // 4:
                    await second.start()
                    second_task = asyncio.create_task(second.run())
                if joined_at is None and second.assigned.is_set():
                    joined_at = n
                acks += await send_raw(broker.bootstrap, chunk)
            await wait_for(lambda: stream.answered(tap), timeout=60, what="every request answered")
            await wait_committed(broker.bootstrap, names["consumer_group_id"], acks)
            assert joined_at is not None and joined_at <= len(chunks) - 5, "the second replica joined after the stream"
            assert replies_sent(second) > 0 and replies_sent(first) > 0, "one replica answered everything"
            assert not first_task.done() and not second_task.done(), "a replica stopped"
            versions = await store_versions(first, stream)
        finally:
            second.request_stop()
            if second_task is not None:
                await asyncio.wait_for(second_task, 60)
            await second.close()
    await record(fault_table, "rebalance (replica joins)", stream, broker.bootstrap, versions)


async def test_rebalance_while_a_batch_is_being_collected(broker, mongo, tiny_model, fault_table):
    """A replica still collecting a batch (MAX_BATCH_WAIT_MS=10 s) when another joins answers it once:
    the rebalance cuts the collection short and waits for the records already handed out."""
    names = topic_names()
    await create_stream_topics(broker.bootstrap, names)
    settings = service_settings(
        broker.bootstrap,
        names,
        tiny_model,
        TANSU_GROUP,
        max_batch_size=1024,
        max_batch_wait_ms=10_000,
        mongodb_uri=mongo.uri,
        mongodb_database=f"faults_{names['consumer_group_id'][-8:]}",
    )
    first, second = build_service(settings), build_service(settings)
    stream = make_stream("collecting", names, valid=40, invalid=6, products=2)
    async with running(first, timeout=60), Tap(broker.bootstrap, names["reply_topic"], names["dead_letter_topic"]) as tap:
        acks = await send_raw(broker.bootstrap, stream.messages)
        consumed = {TopicPartition(a.topic, a.partition): 0 for a in acks}
        for a in acks:
            consumed[TopicPartition(a.topic, a.partition)] = max(consumed[TopicPartition(a.topic, a.partition)], a.offset + 1)
        deadline = time.monotonic() + 30
        while any([await first.consumer.position(tp) < end for tp, end in consumed.items()]):
            assert time.monotonic() < deadline, "the first replica did not fetch the stream"
            await asyncio.sleep(0.05)
        started = time.monotonic()
        assert not tap.records(names["reply_topic"]), "the batch was answered before the rebalance"
        async with running(second, timeout=60):
            assert time.monotonic() - started < 10, "the batch window ended before the rebalance"
            await wait_for(lambda: stream.answered(tap), timeout=60, what="every request answered")
            await wait_committed(broker.bootstrap, names["consumer_group_id"], acks)
            versions = await store_versions(first, stream)
    await record(fault_table, "rebalance while collecting", stream, broker.bootstrap, versions)


# --- the service as a process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def noida(tmp_path_factory):
    with NoidaBroker(data_dir=tmp_path_factory.mktemp("noida")) as b:
        yield b


ASSIGNED = "consumer.kafka.service: assigned partitions"


class ServiceProcess:
    """``python -m consumer`` (or ``module``) configured through environment variables, logging to a file per start."""

    def __init__(self, workdir: Path, env: dict[str, str], module: str = "consumer") -> None:
        self.workdir = workdir
        self.module = module
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **env}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.env.get('KAFKA_CLIENT_ID', 'service')}-{self.starts}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self) -> None:
        self.starts += 1
        self.env["METRICS_PORT"] = str(free_port())
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        await wait_for(
            lambda: ASSIGNED in self.log() or self.proc.poll() is not None, timeout=60, what="the service process to be assigned"
        )
        assert self.proc.poll() is None, f"the service exited early:\n{self.log()[-3000:]}"

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        await wait_for(lambda: self.proc.poll() is not None, timeout=timeout, what="the service process to exit")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def process_env(bootstrap: str, names: dict[str, str], model: str, mongo_uri: str, group: dict[str, int], **extra: str) -> dict[str, str]:
    values = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CLIP_MODEL": model,
        "KAFKA_SESSION_TIMEOUT_MS": str(group["session_timeout_ms"]),
        "KAFKA_HEARTBEAT_INTERVAL_MS": str(group["heartbeat_interval_ms"]),
        "MAX_BATCH_SIZE": "8",
        "MAX_BATCH_WAIT_MS": "20",
        "LAZY_LOAD_MODEL": "false",
        "RETRY_BACKOFF_S": str(FAST_RETRIES["retry_backoff_s"]),
        "RETRY_BACKOFF_MAX_S": str(FAST_RETRIES["retry_backoff_max_s"]),
        "METRICS_HOST": "127.0.0.1",
        "MONGODB_URI": mongo_uri,
        "MONGODB_DATABASE": f"faults_{names['consumer_group_id'][-8:]}",
        "LOG_LEVEL": "INFO",
    }
    return values | {k.upper(): v for k, v in names.items()} | extra


def mongo_versions(mongo: MongoServer, names: dict[str, str], stream: Stream) -> dict[str, int]:
    with mongo.client() as client:
        docs = client[f"faults_{names['consumer_group_id'][-8:]}"]["products"].find({"_id": {"$in": list(stream.newest)}})
        return {d["_id"]: d["version"] for d in docs}


async def test_process_killed_mid_batch(broker, mongo, tiny_model, tmp_path, fault_table):
    """SIGKILL the service while requests are in flight; a new process answers everything from the committed offsets.

    Runs on Tansu: noida never evicts the killed member, so a successor's join wedges (the known
    noida group bug); Tansu drops it after the session timeout.
    """
    names = topic_names()
    await create_stream_topics(broker.bootstrap, names)
    stream = make_stream("kill", names, valid=400, invalid=40)
    service = ServiceProcess(tmp_path, process_env(broker.bootstrap, names, tiny_model, mongo.uri, TANSU_GROUP))
    try:
        async with Tap(broker.bootstrap, names["reply_topic"], names["dead_letter_topic"]) as tap:
            await send_raw(broker.bootstrap, stream.first)
            await service.start()
            await wait_for(lambda: len(tap.reply_ids(names["reply_topic"])) >= 10, what="first replies")
            service.kill()
            assert not stream.answered(tap, stream.first), "no request was in flight at the kill"
            await send_raw(broker.bootstrap, stream.second)
            await service.start()
            await wait_for(lambda: stream.answered(tap), timeout=90, what="every request answered after the restart")
            await wait_for(lambda: mongo_versions(mongo, names, stream) == stream.newest, what="product updates stored")
            assert service.proc.poll() is None, "the restarted consumer stopped"
        service.signal(signal.SIGTERM)
        assert await service.wait() == 0
        result = await record(
            fault_table, "process SIGKILL mid-batch", stream, broker.bootstrap, mongo_versions(mongo, names, stream), exact=False
        )
        assert result.duplicates <= 8, "more than the batch in flight was answered twice"
    finally:
        service.kill()


async def test_graceful_sigterm(noida, mongo, tiny_model, tmp_path, fault_table):
    """SIGTERM while requests are in flight: exit 0 with everything consumed answered and committed; a restart answers the rest once."""
    names = topic_names()
    await create_stream_topics(noida.bootstrap, names)
    stream = make_stream("sigterm", names, valid=400, invalid=40)
    service = ServiceProcess(tmp_path, process_env(noida.bootstrap, names, tiny_model, mongo.uri, NOIDA_GROUP))
    req = names["search_requests_topic"]
    try:
        async with Tap(noida.bootstrap, names["reply_topic"], names["dead_letter_topic"]) as tap:
            acks = await send_raw(noida.bootstrap, stream.first)
            await service.start()
            await wait_for(lambda: len(tap.reply_ids(names["reply_topic"])) >= 10, what="first replies")
            service.signal(signal.SIGTERM)
            assert await service.wait() == 0, service.log()[-3000:]
            assert "stopped after" in service.log()

            got = await read_topics(noida.bootstrap, [names["reply_topic"], names["dead_letter_topic"]])
            answered = {dict(r.headers)["correlation_id"] for r in got[names["reply_topic"]]}
            dead = {d.value for d in got[names["dead_letter_topic"]]}
            committed = await committed_offsets(noida.bootstrap, names["consumer_group_id"], req)
            below, above = [], []
            for (topic, value, key), ack in zip(stream.first, acks, strict=True):
                if topic == req:
                    handled = (key in answered) if key is not None else value in dead
                    (below if ack.offset < committed[ack.partition] else above).append(handled)
            assert below and all(below), "a request consumed before SIGTERM was committed without an answer"
            assert above and not any(above), "a request was answered but not committed"

            await send_raw(noida.bootstrap, stream.second)
            await service.start()
            await wait_for(lambda: stream.answered(tap), timeout=60, what="the restarted process answers the rest")
            await wait_for(lambda: mongo_versions(mongo, names, stream) == stream.newest, what="product updates stored")
        service.signal(signal.SIGTERM)
        assert await service.wait() == 0
        await record(fault_table, "graceful SIGTERM + restart", stream, noida.bootstrap, mongo_versions(mongo, names, stream))
    finally:
        service.kill()

"""``python -m consumer`` as a process: one-line start failures, bounded shutdown, readable logs in an outage."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from consumer.app import EXIT_SHUTDOWN_TIMED_OUT
from devservices import NoidaBroker, free_port
from tests.conftest import REPO, create_stream_topics, topic_names, wait_for
from tests.system.test_faults import ServiceProcess, process_env

pytestmark = pytest.mark.integration  # ``python -m consumer`` as a process

SHUTDOWN_TIMEOUT_S = 5
EXIT_MARGIN_S = 2.5
"""Interpreter teardown after the shutdown budget, plus the test's polling."""
AIOKAFKA_LINE = re.compile(r"^\S+ \S+ [A-Z]+ aiokafka(\.\S+)?: ", re.MULTILINE)


class LaunchedProcess(ServiceProcess):
    """A ``ServiceProcess`` that can also be launched without waiting for a partition assignment."""

    async def launch(self, until: str, timeout: float = 60.0) -> None:
        self.starts += 1
        self.env["METRICS_PORT"] = str(free_port())
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "consumer"],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        await wait_for(lambda: until in self.log() or self.proc.poll() is not None, timeout=timeout, what=repr(until))
        assert self.proc.poll() is None, f"the service exited early:\n{self.log()[-3000:]}"

    async def exits_within(self, seconds: float) -> tuple[int, float]:
        """SIGTERM, then the exit code and the seconds it took (fails after ``seconds`` + 20)."""
        signalled = time.monotonic()
        self.signal(signal.SIGTERM)
        code = await self.wait(timeout=seconds + 20)
        return code, time.monotonic() - signalled


def test_a_wrong_mongodb_password_stops_the_start_with_one_line_naming_the_setting(broker, mongo, tiny_model, tmp_path):
    user, password = f"clip-{uuid.uuid4().hex[:6]}", "right-password-Vb2"
    with mongo.client() as admin:
        admin.admin.command("createUser", user, pwd=password, roles=["readWrite"])
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "CLIP_MODEL": tiny_model,
        "MONGODB_URI": f"mongodb://{user}:wrong-password-Qz9@127.0.0.1:{mongo.port}/?directConnection=true",
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(free_port()),
        **{k.upper(): v for k, v in topic_names().items()},
    }
    proc = subprocess.run([sys.executable, "-m", "consumer"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "clip-search could not start: MongoDB refused the credentials: check the user info of MONGODB_URI"
    )
    assert "wrong-password-Qz9" not in proc.stderr and password not in proc.stderr


async def test_sigterm_while_start_waits_for_an_unreachable_broker_exits_at_once(tiny_model, tmp_path):
    names = topic_names()
    nowhere = f"127.0.0.1:{free_port()}"
    env = process_env(
        nowhere,
        names,
        tiny_model,
        "",
        NoidaBroker.consumer_group_config,
        LAZY_LOAD_MODEL="true",
        SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S),
    )
    service = LaunchedProcess(tmp_path, env)
    try:
        await service.launch(until="could not connect the producer")
        code, took = await service.exits_within(SHUTDOWN_TIMEOUT_S)
        log = service.log()
        assert code == 0, log[-3000:]
        assert took < SHUTDOWN_TIMEOUT_S, f"took {took:.1f} s"
        assert "stop requested while starting: abandoning the start" in log and "Traceback" not in log
    finally:
        service.kill()


def noida_replica_env(broker: NoidaBroker, names: dict[str, str], model: str, mongo_uri: str) -> dict[str, str]:
    """A lazily loading replica on ``broker`` with this module's ``SHUTDOWN_TIMEOUT_S``."""
    group = NoidaBroker.consumer_group_config
    return process_env(broker.bootstrap, names, model, mongo_uri, group, LAZY_LOAD_MODEL="true", SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S))


async def test_sigterm_with_the_broker_gone_exits_within_the_shutdown_timeout_with_a_readable_log(mongo, tiny_model, tmp_path):
    """The broker dies under a running replica; while aiokafka retries, the log stays short; SIGTERM is bounded."""
    broker = NoidaBroker(data_dir=tmp_path / "noida")
    names = topic_names()
    try:
        await asyncio.to_thread(broker.start)
        await create_stream_topics(broker.bootstrap, names)
        service = LaunchedProcess(tmp_path, noida_replica_env(broker, names, tiny_model, mongo.uri))
        try:
            await service.start()
            await asyncio.to_thread(broker.kill)
            outage_from = len(service.log())
            await wait_for(
                lambda: "more like this in the last" in service.log()[outage_from:], timeout=30, what="aiokafka's errors summarised"
            )
            code, took = await service.exits_within(SHUTDOWN_TIMEOUT_S)
            outage = service.log()[outage_from:]
        finally:
            service.kill()
    finally:
        broker.close()
    assert took <= SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S, (
        f"exit took {took:.1f} s with SHUTDOWN_TIMEOUT_S={SHUTDOWN_TIMEOUT_S}:\n{outage[-3000:]}"
    )
    aiokafka_lines = AIOKAFKA_LINE.findall(outage)
    assert len(aiokafka_lines) <= 40, f"{len(aiokafka_lines)} aiokafka lines during the outage:\n{outage[-5000:]}"
    assert "Traceback" not in outage
    assert "stopped after" in outage
    if code != 0:
        assert code == EXIT_SHUTDOWN_TIMED_OUT, outage[-3000:]
        assert f"shutdown timed out after {SHUTDOWN_TIMEOUT_S} s (SHUTDOWN_TIMEOUT_S): could not " in outage


async def test_sigterm_with_a_frozen_broker_abandons_what_cannot_finish_and_says_what(mongo, tiny_model, tmp_path):
    """A broker that accepts connections but never answers (SIGSTOPped, like a black-holed network) holds
    aiokafka's leave-group for its 40 s request timeout: the shutdown budget ends it and names it."""
    broker = NoidaBroker(data_dir=tmp_path / "noida")
    names = topic_names()
    try:
        await asyncio.to_thread(broker.start)
        await create_stream_topics(broker.bootstrap, names)
        service = LaunchedProcess(tmp_path, noida_replica_env(broker, names, tiny_model, mongo.uri))
        try:
            await service.start()
            os.kill(broker.pid, signal.SIGSTOP)
            code, took = await service.exits_within(SHUTDOWN_TIMEOUT_S)
            log = service.log()
        finally:
            os.kill(broker.pid, signal.SIGCONT)
            service.kill()
    finally:
        broker.close()
    assert code == EXIT_SHUTDOWN_TIMED_OUT, log[-3000:]
    assert SHUTDOWN_TIMEOUT_S - 0.5 <= took <= SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S, f"exit took {took:.1f} s"
    [line] = [line for line in log.splitlines() if "shutdown timed out" in line]
    assert f"ERROR consumer: shutdown timed out after {SHUTDOWN_TIMEOUT_S} s (SHUTDOWN_TIMEOUT_S): could not " in line
    assert "close the consumer (leave the group)" in line and line.endswith(f"; exiting with code {EXIT_SHUTDOWN_TIMED_OUT}"), line
    assert "Traceback" not in log and "stopped after" in log

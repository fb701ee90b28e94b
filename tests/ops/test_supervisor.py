"""The background-task supervisor: no task ends silently; restart with capped backoff, or stop the process."""

from __future__ import annotations

import asyncio
import itertools
import logging

from prometheus_client import CollectorRegistry, Counter

from consumer.app import build_service, readiness
from consumer.config.settings import Settings
from consumer.domain.retry import RetryPolicy
from consumer.ops.health import HealthServer
from consumer.ops.supervisor import EXIT_TASK_FAILED, Policy, Supervisor
from tests.conftest import wait_for

FAILURES = "clip_search_background_task_failures_total"


def failure_counter() -> tuple[CollectorRegistry, Counter]:
    registry = CollectorRegistry()
    return registry, Counter("clip_search_background_task_failures", "failures", ["task"], registry=registry)


def supervisor_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "consumer.ops.supervisor" and r.levelno >= logging.ERROR]


async def test_a_task_under_the_exit_policy_that_dies_requests_a_stop_with_its_exit_code(caplog):
    registry, failures = failure_counter()
    codes: list[int] = []
    supervisor = Supervisor(codes.append, failures)

    async def dies() -> None:
        raise RuntimeError("boom")

    supervisor.start("health-server", dies, Policy.EXIT)
    await wait_for(lambda: codes, timeout=5, what="a stop request")
    assert codes == [EXIT_TASK_FAILED]
    assert (
        supervisor.reason
        == f"background task health-server failed: RuntimeError('boom'); stopping the replica (exit code {EXIT_TASK_FAILED})"
    )
    assert registry.get_sample_value(FAILURES, {"task": "health-server"}) == 1
    [record] = supervisor_errors(caplog)
    assert record.exc_info[0] is RuntimeError and record.getMessage() == supervisor.reason
    await supervisor.cancel()


async def test_a_health_server_whose_listener_closes_stops_the_service_with_the_exit_code(tiny_model):
    """The real wiring: a Service's supervisor, its request_stop, readiness, and a HealthServer that stops listening."""
    service = build_service(Settings(_env_file=None, clip_model=tiny_model))
    health = await HealthServer(service.metrics.registry, lambda: None, "127.0.0.1", 0).start()
    service.supervisor.start("health-server", health.serve_forever, Policy.EXIT)
    try:
        health._server.close()
        await asyncio.wait_for(service._stopping.wait(), 5)
        assert service.exit_code == EXIT_TASK_FAILED
        reason = await readiness(service)
        assert reason.startswith("background task health-server failed: ") and reason.endswith(f"(exit code {EXIT_TASK_FAILED})")
        assert service.metrics.registry.get_sample_value(FAILURES, {"task": "health-server"}) == 1
    finally:
        await service.supervisor.cancel()
        await health.close()
        await service.close()


async def test_a_task_that_returns_is_restarted_with_capped_backoff_and_ready_again_once_restarted(caplog):
    registry, failures = failure_counter()
    supervisor = Supervisor(lambda code: None, failures, RetryPolicy(0.05, 0.1))
    runs: list[float] = []
    reasons: list[str | None] = []
    settled = asyncio.Event()

    async def flaky() -> None:
        reasons.append(supervisor.reason)
        runs.append(asyncio.get_running_loop().time())
        if len(runs) == 1:
            raise ValueError("first")
        if len(runs) <= 3:
            return
        settled.set()
        await asyncio.Event().wait()

    supervisor.start("index-snapshot-writer", flaky, Policy.RESTART)
    await asyncio.wait_for(settled.wait(), 5)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.1, f"backoff not doubled up to the cap: {gaps}"
    assert reasons == [None] * 4, "the reason outlived the restart of a task that does not report recovery"
    assert supervisor.reason is None
    assert registry.get_sample_value(FAILURES, {"task": "index-snapshot-writer"}) == 3
    messages = [r.getMessage() for r in supervisor_errors(caplog)]
    assert messages == [
        "background task index-snapshot-writer failed: ValueError('first'); restarting in 0.1 s",
        "background task index-snapshot-writer ended; restarting in 0.1 s",
        "background task index-snapshot-writer ended; restarting in 0.1 s",
    ]
    await supervisor.cancel()
    assert registry.get_sample_value(FAILURES, {"task": "index-snapshot-writer"}) == 3, "a cancel counted as a failure"


async def test_a_task_reporting_recovery_stays_not_ready_until_it_says_so():
    supervisor = Supervisor(lambda code: None, policy=RetryPolicy(0.01, 10.0))
    restarted, go = asyncio.Event(), asyncio.Event()
    runs = 0

    async def follower() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("boom")
        restarted.set()
        await go.wait()
        supervisor.recovered("feature-follower")
        await asyncio.Event().wait()

    supervisor.start("feature-follower", follower, Policy.RESTART, reports_recovery=True)
    await asyncio.wait_for(restarted.wait(), 5)
    assert supervisor.reason == "background task feature-follower failed: RuntimeError('boom'); restarting in 0.0 s"
    go.set()
    await wait_for(lambda: supervisor.reason is None, timeout=5, what="recovery")
    await supervisor.cancel()


async def test_cancel_is_not_a_failure():
    registry, failures = failure_counter()
    codes: list[int] = []
    supervisor = Supervisor(codes.append, failures)
    running = asyncio.Event()

    async def forever() -> None:
        running.set()
        await asyncio.Event().wait()

    supervisor.start("health-server", forever, Policy.EXIT)
    await asyncio.wait_for(running.wait(), 5)
    await supervisor.cancel("health-server")
    assert codes == [] and supervisor.reason is None
    assert registry.get_sample_value(FAILURES, {"task": "health-server"}) == 0

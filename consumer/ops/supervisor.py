"""Supervision of the replica's background tasks: none of them may end silently.

``Supervisor.start(name, factory, policy)`` runs ``await factory()`` in a task. When that ends
without the supervisor having cancelled it (an exception, a cancellation from inside, or a
plain return), the supervisor

1. logs one ERROR record with the traceback,
2. increments ``clip_search_background_task_failures_total{task=name}``,
3. records a not-ready reason, which ``/readyz`` reports (``reason``), e.g.
   ``background task feature-follower failed: RuntimeError('boom'); restarting in 2.0 s``,
4. applies the task's policy:

   - ``RESTART``: ``factory()`` is called again after ``policy.delay(failures)`` (the service's
     ``RetryPolicy``; a run that lasted the policy's longest delay resets the count).
     The reason is cleared when the task calls ``recovered(name)`` if it was started with
     ``reports_recovery=True``, else as soon as it is restarted.
   - ``EXIT``: ``on_exit(EXIT_TASK_FAILED)`` asks the process to stop with that exit code,
     so the orchestrator replaces the replica.

The replica's tasks and their policies:

=====================  ========  ============================================================
task                   policy    why
=====================  ========  ============================================================
feature-follower       RESTART   re-seeks to the offsets after the last applied record, so
                                 nothing is skipped or applied twice; ready again after its
                                 next successful poll
index-snapshot-writer  RESTART   a failed write (disk full) is handled and counted inside;
                                 anything else costs at most one interval of progress
health-server          EXIT      a replica that cannot be probed must be replaced
=====================  ========  ============================================================

The consumer-lag refresher and the idle model unloader are not tasks: they run inline in
``Service.run``, so a failure there is the run loop's and ends the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum

from prometheus_client import Counter

from consumer.domain.retry import RetryPolicy

log = logging.getLogger(__name__)

EXIT_TASK_FAILED = 3
"""Process exit code after a task with the ``EXIT`` policy failed."""


class Policy(Enum):
    RESTART = "restart"
    EXIT = "exit"


@dataclass
class _Supervised:
    name: str
    factory: Callable[[], Awaitable[object]]
    policy: Policy
    reports_recovery: bool
    task: asyncio.Task[None] = field(init=False)
    """Set by ``Supervisor.start`` right after the entry is made."""
    failures: int = 0


class Supervisor:
    """Runs named background tasks and applies their failure policy (see the module docstring).

    ``on_exit(code)`` is called once per failed ``EXIT`` task; ``failures`` is the counter
    labelled by task name (a series is created at 0 for every started task).
    """

    def __init__(
        self,
        on_exit: Callable[[int], None],
        failures: Counter | None = None,
        policy: RetryPolicy = RetryPolicy(2.0, 10.0),
    ) -> None:
        self.on_exit = on_exit
        self.failures = failures
        self.policy = policy
        self._tasks: dict[str, _Supervised] = {}
        self._reasons: dict[str, str] = {}

    @property
    def reason(self) -> str | None:
        """Why the replica is not ready because of a background task (the oldest such failure), or None."""
        return next(iter(self._reasons.values()), None)

    def start(self, name: str, factory: Callable[[], Awaitable[object]], policy: Policy, *, reports_recovery: bool = False) -> None:
        """Run ``await factory()`` as task ``name`` under ``policy`` (call from a running event loop)."""
        if name in self._tasks:
            raise ValueError(f"background task {name!r} is already supervised")
        if self.failures is not None:
            self.failures.labels(name)
        entry = _Supervised(name, factory, policy, reports_recovery)
        entry.task = asyncio.create_task(self._supervise(entry), name=name)
        self._tasks[name] = entry

    def recovered(self, name: str) -> None:
        """Task ``name`` works again: clear its not-ready reason (cheap; call after each success)."""
        if self._reasons.pop(name, None) is not None:
            log.info("background task %s recovered", name)

    async def cancel(self, *names: str) -> None:
        """Cancel the named tasks (all when none are named) and wait for them; this is not a failure."""
        entries = [self._tasks.pop(n) for n in (names or list(self._tasks)) if n in self._tasks]
        for entry in entries:
            self._reasons.pop(entry.name, None)
            entry.task.cancel()
        await asyncio.gather(*(e.task for e in entries), return_exceptions=True)

    async def _supervise(self, entry: _Supervised) -> None:
        while True:
            started = time.monotonic()
            error: BaseException | None = None
            try:
                await entry.factory()
            except asyncio.CancelledError as exc:
                if (current := asyncio.current_task()) is not None and current.cancelling():
                    raise
                error = exc
            except Exception as exc:  # noqa: BLE001 - every failure is logged, counted and acted on below
                error = exc
            if time.monotonic() - started >= self.policy.longest_s:
                entry.failures = 0
            entry.failures += 1
            ended = f"background task {entry.name} " + (f"failed: {error!r}" if error is not None else "ended")
            if entry.policy is Policy.EXIT:
                self._failed(entry, f"{ended}; stopping the replica (exit code {EXIT_TASK_FAILED})", error)
                self.on_exit(EXIT_TASK_FAILED)
                return
            delay = self.policy.delay(entry.failures)
            self._failed(entry, f"{ended}; restarting in {delay:.1f} s", error)
            await asyncio.sleep(delay)
            if not entry.reports_recovery:
                self._reasons.pop(entry.name, None)

    def _failed(self, entry: _Supervised, reason: str, error: BaseException | None) -> None:
        log.error("%s", reason, exc_info=error)
        if self.failures is not None:
            self.failures.labels(entry.name).inc()
        self._reasons[entry.name] = reason

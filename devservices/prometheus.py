"""A real Prometheus server (Debian's ``prometheus`` package) on loopback, with a small HTTP API client."""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from typing import Any

from .process import ManagedProcess


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def promtool_binary() -> str | None:
    return shutil.which("promtool")


class PrometheusServer(ManagedProcess):
    """Prometheus on 127.0.0.1:`port` with ``config`` (YAML text) written to its work dir.

    Storage is a fresh TSDB under the work dir. Ready when ``/-/ready`` answers 200.
    """

    name = "prometheus"
    start_timeout = 60.0

    def __init__(self, config: str, port: int | None = None) -> None:
        super().__init__(port)
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(config)

    def command(self) -> list[str]:
        return [
            prometheus_binary() or "prometheus",
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def probe(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
            status: int = r.status
        return status == 200

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; returns ``data``, raises RuntimeError when Prometheus reports an error."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (or a one-element list for a scalar)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        vector: list[dict[str, Any]] = data["result"]
        return vector

    def targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return targets

"""A tiny asyncio HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``.

It runs on the service's event loop, so a liveness probe also proves the loop
is not stuck. One request per connection (``Connection: close``), GET and HEAD only.

- ``/metrics``: the registry in Prometheus text or OpenMetrics format (``Accept`` negotiated).
- ``/healthz``: 200 while the process serves requests.
- ``/readyz``: 200 ``{"ready": true}`` when ``readiness()`` returns None, otherwise
  503 ``{"ready": false, "reason": ...}``. ``readiness`` may be sync or async; if
  it raises or takes longer than ``readiness_timeout_s`` the answer is 503.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from consumer.domain.wire import JSON_CONTENT_TYPE

log = logging.getLogger(__name__)

Readiness = Callable[[], "str | Awaitable[str | None] | None"]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_MAX_HEAD = 16 * 1024


class HealthServer:
    """Serves one registry and one readiness check on ``host:port`` (port 0: any free port, see ``port``)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Readiness,
        host: str = "0.0.0.0",  # nosec B104  # all interfaces so Prometheus can scrape a container; METRICS_HOST narrows it (README: Security)
        port: int = 9100,
        *,
        readiness_timeout_s: float = 5.0,
        read_timeout_s: float = 5.0,
    ) -> None:
        self.registry = registry
        self.readiness = readiness
        self.host = host
        self.requested_port = port
        self.readiness_timeout_s = readiness_timeout_s
        self.read_timeout_s = read_timeout_s
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (only after ``start``)."""
        assert self._server is not None, "not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> HealthServer:
        """Bind and start serving; raises OSError if the address is taken."""
        self._server = await asyncio.start_server(self._handle, self.host, self.requested_port, limit=_MAX_HEAD)
        log.info("metrics and health on http://%s:%d/metrics", self.host, self.port)
        return self

    async def serve_forever(self) -> None:
        """Serve until cancelled (which closes the listener); returns or raises only if the listener fails."""
        assert self._server is not None, "not started"
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HealthServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout_s)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        try:
            status, ctype, body, method = await self._respond(head)
            headers = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            writer.write(headers.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, head: bytes) -> tuple[int, str, bytes, str]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request\n", "GET"
        method, target = parts[0], parts[1].split("?", 1)[0]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n", method
        if target == "/metrics":
            encode, ctype = choose_encoder(headers.get("accept", ""))
            return 200, ctype, encode(self.registry), method
        if target == "/healthz":
            return 200, JSON_CONTENT_TYPE, b'{"status": "ok"}\n', method
        if target == "/readyz":
            reason = await self._readiness()
            if reason is None:
                return 200, JSON_CONTENT_TYPE, b'{"ready": true}\n', method
            return 503, JSON_CONTENT_TYPE, (json.dumps({"ready": False, "reason": reason}) + "\n").encode(), method
        return 404, "text/plain", b"not found: try /metrics, /healthz, /readyz\n", method

    async def _readiness(self) -> str | None:
        try:
            result = self.readiness()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, self.readiness_timeout_s)
            return result
        except TimeoutError:
            return f"readiness check took longer than {self.readiness_timeout_s}s"
        except Exception as exc:  # noqa: BLE001 - a failing check is reported as the not-ready reason
            return f"readiness check failed: {exc!r}"

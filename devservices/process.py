"""Base class for a locally launched service process (tests, demo, benchmarks)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from .ports import free_port

_LIVE: set[subprocess.Popen[bytes]] = set()
_OWNED_DIRS: set[Path] = set()


@atexit.register
def _cleanup() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for d in list(_OWNED_DIRS):
        shutil.rmtree(d, ignore_errors=True)


class ServiceError(RuntimeError):
    """A service failed to start, exited early, or did not become ready in time."""


class ManagedProcess:
    """One subprocess bound to a fixed port and work dir, surviving restarts.

    Subclasses implement `command()` and `probe()`. Output goes to
    `<workdir>/<name>.log` (appended across restarts). A work dir created here
    is deleted by `close()`; a caller-supplied one is kept. Every live process
    is SIGKILLed (and owned work dirs removed) at interpreter exit as a safety net.
    """

    name = "process"
    poll_interval = 0.02
    start_timeout = 30.0

    def __init__(self, port: int | None = None, workdir: str | os.PathLike[str] | None = None) -> None:
        self.port = port or free_port()
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._owns_workdir:
            _OWNED_DIRS.add(self.workdir)
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.last_start_seconds: float | None = None

    def command(self) -> list[str]:
        """Argv that runs the service in the foreground."""
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        """Environment for the child; None inherits ours."""
        return None

    def probe(self) -> bool:
        """Return True once the service answers requests; must not block long."""
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float | None = None) -> Self:
        """Launch the process and block until `probe()` succeeds. No-op if running."""
        if self.running:
            return self
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE.add(self._proc)
        try:
            self.wait_ready(self.start_timeout if timeout is None else timeout)
        except BaseException:
            self.kill()
            raise
        self.last_start_seconds = time.monotonic() - t0
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll `probe()` until it succeeds; raise ServiceError (with log tail) on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise ServiceError(f"{self.name} exited (code {code}) before ready; log tail:\n{self.log_tail()}")
            try:
                if self.probe():
                    return
            except Exception:  # noqa: BLE001 - any probe failure means "not ready yet"; the deadline bounds the wait
                pass
            if time.monotonic() >= deadline:
                raise ServiceError(f"{self.name} on port {self.port} not ready after {timeout:.1f}s; log tail:\n{self.log_tail()}")
            time.sleep(self.poll_interval)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send `sig`, wait up to `timeout` s, then SIGKILL. Returns the exit code (None if never started)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            except ProcessLookupError:
                pass
        _LIVE.discard(proc)
        return proc.wait()

    def kill(self) -> int | None:
        """SIGKILL the process (simulated crash); data dir and port are kept."""
        return self.stop(signal.SIGKILL)

    def restart(self, timeout: float | None = None) -> Self:
        """Graceful stop, then start again on the same port and data."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop the process and delete the work dir if it was created here."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            _OWNED_DIRS.discard(self.workdir)

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return "<no log>"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(port={self.port}, pid={self.pid}, workdir={str(self.workdir)!r})"

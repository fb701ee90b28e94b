"""Memory sampling for the benchmark: one process over time (``RssSampler``), or a process tree's peak (``TreePeak``).

Both read VmRSS and RssAnon from ``/proc/<pid>/status`` (MiB) in a background thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import psutil


def read_status(pid: int) -> tuple[float, float] | None:
    """(VmRSS, RssAnon) of ``pid`` in MiB, or None when it has gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            values[key] = int(rest.split()[0]) / 1024
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], values.get("RssAnon", 0.0)


class RssSampler:
    """Samples VmRSS and RssAnon (MiB) of one pid every ``interval`` seconds in a thread; ``mark`` names a phase start."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.started = time.monotonic()
        self.samples: list[tuple[float, float, float]] = []
        self._marks: dict[str, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            reading = read_status(self.pid)
            if reading:
                self.samples.append((time.monotonic(), *reading))

    def mark(self, name: str) -> None:
        self._marks[name] = (len(self.samples), time.monotonic())

    def peak(self, since: str | None = None, until: str | None = None) -> dict:
        start = self._marks[since][0] if since in self._marks else 0
        stop = self._marks[until][0] if until in self._marks else None
        rows = self.samples[start:stop]
        if not rows:
            return {"rss_mb": None, "anon_mb": None}
        return {"rss_mb": round(max(r[1] for r in rows), 1), "anon_mb": round(max(r[2] for r in rows), 1)}

    def timeline(self, max_points: int = 1500) -> dict:
        """Seconds since the sampler started, RSS and anon per point, and the marks' times.

        Longer runs are reduced to ``max_points`` by keeping each window's maximum, so peaks survive.
        """
        step = max(1, -(-len(self.samples) // max_points))
        t, rss, anon = [], [], []
        for i in range(0, len(self.samples), step):
            window = self.samples[i : i + step]
            t.append(round(window[0][0] - self.started, 3))
            rss.append(round(max(w[1] for w in window), 1))
            anon.append(round(max(w[2] for w in window), 1))
        marks = {name: round(at - self.started, 3) for name, (_, at) in self._marks.items()}
        return {"t_s": t, "rss_mb": rss, "anon_mb": anon, "marks": marks}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class TreePeak:
    """Peak summed RSS and RssAnon (MiB) of the processes this process starts while the context is open.

    Children that already existed on entry (a broker, a store) are not counted; grandchildren of new
    children are. ``sample()`` takes one reading at once (the thread also samples every ``interval``).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.rss_mb = 0.0
        self.anon_mb = 0.0
        self.seconds = 0.0
        self._me = psutil.Process()
        self._existing: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list[int]:
        pids = []
        for child in self._me.children():
            if child.pid in self._existing:
                continue
            pids.append(child.pid)
            with contextlib.suppress(psutil.NoSuchProcess):
                pids += [p.pid for p in child.children(recursive=True)]
        return pids

    def sample(self) -> None:
        readings = [r for pid in self._tree() if (r := read_status(pid))]
        with self._lock:
            self.rss_mb = max(self.rss_mb, sum(r[0] for r in readings))
            self.anon_mb = max(self.anon_mb, sum(r[1] for r in readings))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreePeak:
        self._existing = {c.pid for c in self._me.children()}
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.monotonic() - self._started

    def result(self) -> dict:
        return {"rss_mb": round(self.rss_mb, 1), "anon_mb": round(self.anon_mb, 1), "seconds": round(self.seconds, 1)}

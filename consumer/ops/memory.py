"""Process and cgroup memory readings (Linux), read fresh on every call.

Pure readers with no caching: each function opens its source file, so a value is
the kernel's view at call time. On other platforms, or when a source is missing,
readers return None instead of raising. Used by the metrics collector and by
memory backpressure.

Sources:
- ``/proc/self/status``: ``VmRSS`` (resident), ``RssAnon`` (resident anonymous:
  heap, arenas, tensors; excludes file-backed pages such as mapped weights and
  shared libraries), ``VmHWM`` (peak resident since start).
- cgroup v2 ``memory.current`` / ``memory.max``; cgroup v1
  ``memory.usage_in_bytes`` / ``memory.limit_in_bytes``, for the memory cgroup
  named in ``/proc/self/cgroup`` (falling back to the mount root, which is the
  container's own cgroup when the cgroup namespace hides the host path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _ctypes import CFuncPtr

__all__ = [
    "ProcMemory",
    "anon_bytes",
    "cgroup_limit_bytes",
    "cgroup_usage_bytes",
    "peak_rss_bytes",
    "proc_memory",
    "release_memory",
    "rss_bytes",
]

PROC_STATUS = Path("/proc/self/status")
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")

# cgroup v1 reports "no limit" as a page-aligned LONG_MAX; anything this large is unlimited.
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class ProcMemory:
    """One consistent sample of ``/proc/self/status`` (bytes; None when the field is absent)."""

    rss: int | None
    anon: int | None
    peak_rss: int | None


def _status_fields(text: str) -> dict[str, int]:
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    return fields


def proc_memory(status: Path = PROC_STATUS) -> ProcMemory:
    """RSS, anonymous RSS and peak RSS from one read of ``status``."""
    try:
        fields = _status_fields(status.read_text())
    except OSError:
        return ProcMemory(None, None, None)
    return ProcMemory(fields.get("VmRSS"), fields.get("RssAnon"), fields.get("VmHWM"))


def rss_bytes(status: Path = PROC_STATUS) -> int | None:
    """Resident set size (``VmRSS``)."""
    return proc_memory(status).rss


def anon_bytes(status: Path = PROC_STATUS) -> int | None:
    """Resident anonymous memory (``RssAnon``)."""
    return proc_memory(status).anon


def peak_rss_bytes(status: Path = PROC_STATUS) -> int | None:
    """Peak resident set size since process start (``VmHWM``)."""
    return proc_memory(status).peak_rss


def _read_int(path: Path) -> int | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    if raw == "max":
        return _UNLIMITED
    return int(raw) if raw.isdigit() else None


def _cgroup_dirs(proc_cgroup: Path, root: Path) -> list[tuple[str, Path, str]]:
    """Candidate (version, directory, cgroup path) for this process's memory cgroup, best first.

    A v1 memory controller wins over the v2 entry (hybrid hosts keep memory on v1).
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    v1, v2 = [], []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 += [("v2", root / path.lstrip("/"), path), ("v2", root, path)]
        elif "memory" in controllers.split(","):
            v1 += [("v1", root / "memory" / path.lstrip("/"), path), ("v1", root / "memory", path)]
    return v1 or v2


def _cgroup(proc_cgroup: Path, root: Path) -> tuple[int | None, int | None]:
    """(usage, limit) of this process's memory cgroup; limit None when unlimited; both None when not confined."""
    for version, directory, path in _cgroup_dirs(proc_cgroup, root):
        usage_file, limit_file = ("memory.current", "memory.max") if version == "v2" else ("memory.usage_in_bytes", "memory.limit_in_bytes")
        usage = _read_int(directory / usage_file)
        if usage is None:
            continue
        limit = _read_int(directory / limit_file)
        limit = None if limit is None or limit >= _UNLIMITED else limit
        if version == "v1" and path == "/" and limit is None:
            return None, None  # the host's root memory cgroup: not a container
        return usage, limit
    return None, None


def cgroup_usage_bytes(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> int | None:
    """Memory charged to this process's cgroup (page cache included); None outside a memory cgroup."""
    return _cgroup(proc_cgroup, root)[0]


def cgroup_limit_bytes(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> int | None:
    """The cgroup's hard memory limit; None when unlimited or outside a memory cgroup."""
    return _cgroup(proc_cgroup, root)[1]


@lru_cache(maxsize=1)
def _malloc_trim() -> CFuncPtr | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> bool:
    """Return freed heap pages to the OS with glibc ``malloc_trim(0)``; False where unavailable (musl, macOS)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True

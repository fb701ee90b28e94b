"""Feature index snapshots: a search replica's index and the features-topic offsets it reflects.

A replica that restarts loads its snapshot and reads only the features-topic records after
those offsets, instead of the whole topic. One uncompressed ``.npz`` file per
(features topic, model id, storage dtype, dim): numpy arrays, and JSON text stored as
bytes for the strings, read back with ``allow_pickle=False`` (a snapshot holds data,
never code). Files are written to a temporary name, fsynced and renamed into place, so a
reader never sees half a snapshot and replicas may share one directory: any complete
snapshot is a consistent (index, offsets) pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from consumer.index.feature_index import FeatureIndex, IndexState

__all__ = ["FORMAT_VERSION", "Snapshot", "SnapshotError", "SnapshotFile"]

FORMAT_VERSION = 1


class SnapshotError(Exception):
    """A snapshot exists but cannot be used (unreadable, corrupt, or made for something else)."""


@dataclass(frozen=True)
class Snapshot:
    state: IndexState
    offsets: dict[int, int]
    """Next features-topic offset to read, per partition."""
    created: str


def _json_bytes(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(), dtype=np.uint8)


def _from_json_bytes(array: np.ndarray) -> Any:
    return json.loads(array.tobytes().decode())


def _write_npy(out: IO[bytes], array: np.ndarray, chunk: int = 1 << 20) -> None:
    """``array`` in .npy format, streamed from its own memory (``np.save`` copies 16 MB at a time)."""
    array = np.ascontiguousarray(array)
    np.lib.format.write_array_header_2_0(out, np.lib.format.header_data_from_array_1_0(array))
    data = array.data.cast("B") if array.size else memoryview(b"")
    for start in range(0, data.nbytes, chunk):
        out.write(data[start : start + chunk])


class SnapshotFile:
    """The snapshot of one features topic for one model and index layout, in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str], topic: str, model_id: str, dtype: str, dim: int) -> None:
        self.directory = Path(directory)
        self.header = {"format": FORMAT_VERSION, "topic": topic, "model_id": model_id, "dtype": dtype, "dim": dim}
        digest = hashlib.sha256(json.dumps(self.header, sort_keys=True).encode()).hexdigest()[:16]
        safe_topic = "".join(c if c.isalnum() or c in "-_." else "_" for c in topic)
        self.path = self.directory / f"{safe_topic}.{digest}.npz"

    def save(self, index: FeatureIndex, offsets: dict[int, int]) -> int:
        """Write ``index`` and ``offsets`` atomically; the file's size in bytes. The index must not change meanwhile.

        The layout of ``numpy.savez`` (uncompressed), written member by member and straight from
        the index's arrays, so that only one member's JSON text (a few MB at 100k products)
        exists besides the index itself.
        """
        state = index.state()
        if (state.dim, state.dtype) != (self.header["dim"], self.header["dtype"]):
            raise ValueError(f"index is {state.dtype}[{state.dim}], snapshot file is for {self.header}")
        header = self.header | {
            "offsets": {str(p): int(o) for p, o in offsets.items()},
            "products": len(state.ids),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        members: dict[str, Callable[[], np.ndarray]] = {
            "header": lambda: _json_bytes(header),
            "matrix": lambda: state.matrix,
            "categories": lambda: state.categories,
            "prices": lambda: state.prices,
            "live_slots": lambda: state.live_slots,
            "versions": lambda: state.versions,
            "ids": lambda: _json_bytes(state.ids),
            "names": lambda: _json_bytes(state.names),
            "descriptions": lambda: _json_bytes(state.descriptions),
            "category_names": lambda: _json_bytes(state.category_names),
            "tombstones": lambda: _json_bytes(state.tombstones),
        }
        if (scales := state.scales) is not None:
            members["scales"] = lambda: scales
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as out:
                with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                    for name, make in members.items():
                        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                            _write_npy(member, make())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path.stat().st_size

    def load(self) -> Snapshot | None:
        """The snapshot, None if there is none; SnapshotError if it is unreadable or for something else."""
        try:
            archive = np.load(self.path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            raise SnapshotError(f"cannot read {self.path}: {exc}") from exc
        try:
            with archive:
                header = _from_json_bytes(archive["header"])
                mismatched = {k: header.get(k) for k, v in self.header.items() if header.get(k) != v}
                if mismatched:
                    raise SnapshotError(f"{self.path} was made for {mismatched}, not {self.header}")
                state = IndexState(
                    dim=header["dim"],
                    dtype=header["dtype"],
                    matrix=archive["matrix"],
                    scales=archive["scales"] if "scales" in archive.files else None,
                    categories=archive["categories"],
                    prices=archive["prices"],
                    category_names=_from_json_bytes(archive["category_names"]),
                    live_slots=archive["live_slots"],
                    ids=_from_json_bytes(archive["ids"]),
                    versions=archive["versions"],
                    names=_from_json_bytes(archive["names"]),
                    descriptions=_from_json_bytes(archive["descriptions"]),
                    tombstones=_from_json_bytes(archive["tombstones"]),
                )
                offsets = {int(p): int(o) for p, o in header["offsets"].items()}
                return Snapshot(state, offsets, header["created"])
        except SnapshotError:
            raise
        except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise SnapshotError(f"corrupt snapshot {self.path}: {exc!r}") from exc

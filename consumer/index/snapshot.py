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
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from consumer.index.feature_index import FeatureIndex, IndexState

__all__ = ["FORMAT_VERSION", "Snapshot", "SnapshotError", "SnapshotFile"]

FORMAT_VERSION = 2
"""2: product text as one UTF-8 array with per-slot offsets, versions per slot (1: JSON lists of names and descriptions)."""


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


def _read_npy(archive: zipfile.ZipFile, name: str, chunk: int = 1 << 20) -> np.ndarray:
    """Member ``name`` (.npy, C order, no objects) read into a new array that owns its memory; CRC checked."""
    with archive.open(name) as member:
        version = np.lib.format.read_magic(member)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"{name}: .npy format {version} is not supported")
        shape, fortran_order, dtype = readers[version](member)
        if fortran_order or dtype.hasobject:
            raise ValueError(f"{name}: unsupported array layout")
        array = np.empty(shape, dtype=dtype)
        data = array.data.cast("B") if array.size else memoryview(bytearray())
        for start in range(0, data.nbytes, chunk):
            part = data[start : start + chunk]
            if cast(io.BufferedIOBase, member).readinto(part) != part.nbytes:
                raise EOFError(f"{name}: truncated")
        if member.read(1):
            raise ValueError(f"{name}: longer than its header says")
    return array


class SnapshotFile:
    """The snapshot of one features topic for one model and index layout, in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str], topic: str, model_id: str, dtype: str, dim: int) -> None:
        self.directory = Path(directory)
        self.header = {"format": FORMAT_VERSION, "topic": topic, "model_id": model_id, "dtype": dtype, "dim": dim}
        named_by = {k: v for k, v in self.header.items() if k != "format"}
        digest = hashlib.sha256(json.dumps(named_by, sort_keys=True).encode()).hexdigest()[:16]
        safe_topic = "".join(c if c.isalnum() or c in "-_." else "_" for c in topic)
        self.path = self.directory / f"{safe_topic}.{digest}.npz"

    def save(self, index: FeatureIndex, offsets: dict[int, int]) -> int:
        """Write ``index`` and ``offsets`` atomically; the file's size in bytes. The index must not change meanwhile.

        The layout of ``numpy.savez`` (uncompressed), written member by member and straight from
        the index's arrays (product text included), so that only the ids' JSON text (about 1 MB
        at 100k products) exists besides the index itself.
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
            "versions": lambda: state.versions,
            "text_starts": lambda: state.text_starts,
            "name_bytes": lambda: state.name_bytes,
            "description_bytes": lambda: state.description_bytes,
            "text": lambda: state.text,
            "live_slots": lambda: state.live_slots,
            "ids": lambda: _json_bytes(state.ids),
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
        """The snapshot, None if there is none; SnapshotError if it is unreadable or for something else.

        Every array is read straight into an array of its own (no second copy while loading), which
        ``FeatureIndex.restore`` then takes over.
        """
        try:
            archive = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            return None
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            raise SnapshotError(f"cannot read {self.path}: {exc}") from exc
        try:
            with archive:
                members = {name.removesuffix(".npy") for name in archive.namelist()}

                def read(name: str) -> np.ndarray:
                    return _read_npy(archive, f"{name}.npy")

                header = _from_json_bytes(read("header"))
                mismatched = {k: header.get(k) for k, v in self.header.items() if header.get(k) != v}
                if mismatched:
                    raise SnapshotError(f"{self.path} was made for {mismatched}, not {self.header}")
                state = IndexState(
                    dim=header["dim"],
                    dtype=header["dtype"],
                    matrix=read("matrix"),
                    scales=read("scales") if "scales" in members else None,
                    categories=read("categories"),
                    prices=read("prices"),
                    versions=read("versions"),
                    text_starts=read("text_starts"),
                    name_bytes=read("name_bytes"),
                    description_bytes=read("description_bytes"),
                    text=read("text"),
                    category_names=_from_json_bytes(read("category_names")),
                    live_slots=read("live_slots"),
                    ids=_from_json_bytes(read("ids")),
                    tombstones=_from_json_bytes(read("tombstones")),
                )
                offsets = {int(p): int(o) for p, o in header["offsets"].items()}
                return Snapshot(state, offsets, header["created"])
        except SnapshotError:
            raise
        except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise SnapshotError(f"corrupt snapshot {self.path}: {exc!r}") from exc

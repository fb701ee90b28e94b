"""Exact int8 dot products on ONNX Runtime's u8 x s8 ``MatMulInteger`` kernel.

numpy has no int8 BLAS: ranking an int8 feature matrix in numpy means up-casting every
row to float32 first (about 20 ms for 100k x 512 rows per search on 2 cores). ONNX
Runtime's MLAS kernel multiplies uint8 by int8 directly with SIMD (about 7 ms for one
query, 12 ms for 32). Features are stored as uint8 = int8 + 128, so

    f_int8 . q_int8 = (f_uint8 . q_int8) - 128 * sum(q_int8)

exactly, in int32. Queries are quantised per row to 7 bits (symmetric, scale = max|q| / 63):
on CPUs without VNNI (AVX2 only, e.g. AMD EPYC Zen 2/3) the kernel adds u8 x s8 pairs in
saturating int16 (``vpmaddubsw``), and 255 * 63 * 2 = 32130 stays below 32767, so the result
is exact there too; with 8-bit queries it silently saturates.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

_OFFSET = 128
QUERY_LEVELS = 63


# The one-node graph ``scores = MatMulInteger(features uint8 [n, d], queries int8 [d, q])`` (int32 [n, q]),
# opset 17, IR version 8, serialised once so that serving needs onnxruntime but not the onnx package (in the
# export extra). It is what this onnx.helper recipe writes (tests/deploy/test_serving_without_torch.py checks that):
#     a = helper.make_tensor_value_info("features", TensorProto.UINT8, ["n", "d"])
#     b = helper.make_tensor_value_info("queries", TensorProto.INT8, ["d", "q"])
#     y = helper.make_tensor_value_info("scores", TensorProto.INT32, ["n", "q"])
#     node = helper.make_node("MatMulInteger", ["features", "queries"], ["scores"])
#     graph = helper.make_graph([node], "int8_scores", [a, b], [y])
#     helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
MODEL_BYTES = (
    b'\x08\x08:\x90\x01\n*\n\x08features\n\x07queries\x12\x06scores"\rMatMulInteger\x12\x0bint8_scores'
    b"Z\x1c\n\x08features\x12\x10\n\x0e\x08\x02\x12\n\n\x03\x12\x01n\n\x03\x12\x01d"
    b"Z\x1b\n\x07queries\x12\x10\n\x0e\x08\x03\x12\n\n\x03\x12\x01d\n\x03\x12\x01q"
    b"b\x1a\n\x06scores\x12\x10\n\x0e\x08\x06\x12\n\n\x03\x12\x01n\n\x03\x12\x01q"
    b"B\x04\n\x00\x10\x11"
)


def quantise_rows(x: np.ndarray, levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 in [-levels, levels]: (values, scales) with x ~= values * scales[:, None]."""
    peak = np.max(np.abs(x), axis=1)
    scales = np.where(peak > 0, peak / levels, 1.0).astype(np.float32)
    values = np.clip(np.rint(x / scales[:, None]), -levels, levels).astype(np.int8)
    return values, scales


class Int8Scorer:
    """Scores ``queries`` [q, d] float32 against uint8-offset features [n, d]; thread-safe after first use."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._session: Any = None  # an onnxruntime.InferenceSession (onnxruntime ships no type information)
        self._lock = threading.Lock()

    def _get_session(self) -> Any:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    import onnxruntime as ort

                    options = ort.SessionOptions()
                    if self.threads:
                        options.intra_op_num_threads = self.threads
                    options.inter_op_num_threads = 1
                    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                    self._session = ort.InferenceSession(MODEL_BYTES, options, providers=["CPUExecutionProvider"])
        return self._session

    def scores(self, features_u8: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """float32 [q, n] = (features - 128) . quantised(queries), before the features' own scales."""
        q_values, q_scales = quantise_rows(np.asarray(queries, dtype=np.float32), QUERY_LEVELS)
        b = np.ascontiguousarray(q_values.T)
        raw: np.ndarray = self._get_session().run(None, {"features": np.ascontiguousarray(features_u8), "queries": b})[0]
        raw -= _OFFSET * b.sum(axis=0, dtype=np.int32)
        scores: np.ndarray = raw.T.astype(np.float32) * q_scales[:, None]
        return scores


def to_offset_uint8(values: np.ndarray) -> np.ndarray:
    """int8 -> the uint8 storage of this module (value + 128)."""
    return (values.astype(np.int16) + _OFFSET).astype(np.uint8)

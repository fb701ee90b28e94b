"""Inline images to embeddings with decoding overlapped with encoding, in bounded memory.

``encode_images`` decodes base64 images into pixel tensors on a small dedicated thread pool
(so a catalog burst never queues searches' own worker threads behind it) and encodes them in
chunks of ``chunk`` rows: while chunk k is being encoded (ONNX Runtime releases the GIL), chunk
k+1 is being decoded. At most two chunks of pixels exist at once (at ``chunk=8`` and 224 px,
2 x 8 x 3 x 224 x 224 float32 = 9.6 MB), however many images the batch holds. Results keep
the input order; an unusable image is its row's ``InputError``, never an exception.
Nothing here knows about Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from consumer.domain.errors import InputError
from consumer.encoder.encoder import Encoder

DEFAULT_CHUNK = 8
"""Rows per vision-tower call: the ONNX backend's own ``max_batch``, so a chunk is one session run."""

DEFAULT_DECODE_THREADS = 2

Decode = Callable[[str], np.ndarray]
"""Base64 image to a pixel tensor [3, S, S]; raises ``InputError`` for an unusable one."""

ChunkDone = Callable[[list[tuple[int, "np.ndarray | InputError"]]], Awaitable[None]]
"""Told each chunk's results as soon as they exist; the next chunk's encode waits for it to return."""


def image_pool(threads: int = DEFAULT_DECODE_THREADS, nice: int = 0) -> ThreadPoolExecutor:
    """The executor image decodes and encodes run on: ``threads`` workers (idle ones cost nothing but their stacks),
    each at ``nice`` (Linux: a thread's own priority; the OS then runs search threads first when both want a core)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="image-work", initializer=_lower_priority, initargs=(nice,))


def _lower_priority(nice: int) -> None:
    if nice > 0 and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def _decode_or_error(decode: Decode, data: str) -> np.ndarray | InputError:
    try:
        return decode(data)
    except InputError as err:
        return err


async def _decode_chunk(executor: Executor, decode: Decode, chunk: Sequence[tuple[int, str]]) -> list[tuple[int, np.ndarray | InputError]]:
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(*(loop.run_in_executor(executor, _decode_or_error, decode, data) for _, data in chunk))
    return [(row, result) for (row, _), result in zip(chunk, results, strict=True)]


async def encode_images(
    encoder: Encoder,
    images: Sequence[tuple[int, str]],
    decode: Decode,
    executor: Executor,
    chunk: int = DEFAULT_CHUNK,
    on_chunk: ChunkDone | None = None,
    encode_executor: Executor | None = None,
) -> list[tuple[int, np.ndarray | InputError]]:
    """``(row, embedding or InputError)`` for every ``(row, base64)`` of ``images``, in their order.

    Decoding of the next chunk overlaps encoding of the current one; the decodes of one chunk
    run in parallel on ``executor``. ``on_chunk`` gets each chunk's results (in order) before
    the next chunk is encoded; it should only start work, not wait for it. Encodes run on
    ``encode_executor`` (None: the loop's default executor). Cancellation waits
    for nothing: a decode or encode already running in a thread finishes there and its result
    is dropped.
    """
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    chunks = [images[i : i + chunk] for i in range(0, len(images), chunk)]
    out: list[tuple[int, np.ndarray | InputError]] = []
    if not chunks:
        return out
    decoding = asyncio.ensure_future(_decode_chunk(executor, decode, chunks[0]))
    try:
        for k in range(len(chunks)):
            decoded = await decoding
            if k + 1 < len(chunks):
                decoding = asyncio.ensure_future(_decode_chunk(executor, decode, chunks[k + 1]))
            rows = [row for row, p in decoded if not isinstance(p, InputError)]
            embedded: dict[int, np.ndarray] = {}
            if rows:
                stacked = np.stack([p for _, p in decoded if not isinstance(p, InputError)])
                errors: list[tuple[int, np.ndarray | InputError]] = [(row, p) for row, p in decoded if isinstance(p, InputError)]
                del decoded
                emb = await asyncio.get_running_loop().run_in_executor(encode_executor, encoder.encode_images, stacked)
                del stacked
                embedded = dict(zip(rows, emb, strict=True))
                decoded = errors
            failed = dict(decoded)
            done = [(row, embedded[row] if row in embedded else failed[row]) for row, _ in chunks[k]]
            out.extend(done)
            if on_chunk is not None:
                await on_chunk(done)
    finally:
        if not decoding.done():
            decoding.cancel()
    return out

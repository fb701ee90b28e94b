"""CLIP encoder with lazily loaded, independently loaded towers.

``Encoder`` loads the text tower on the first text and the vision tower on the
first image, each exactly once even when first calls race (loads happen in
worker threads). Outputs are float32, L2-normalised, one row per input. Heavy
imports (torch, transformers) happen inside the backend's load, never at import.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from consumer.encoder.images import OPENAI_CLIP, ImagePreprocess

log = logging.getLogger(__name__)


Inputs = TypeVar("Inputs", contravariant=True)


class Tower(Protocol[Inputs]):
    """One loaded tower: texts (``list[str]``) or pixels (``np.ndarray``) to raw embeddings, one row per input."""

    nbytes: int

    def encode(self, inputs: Inputs) -> np.ndarray: ...


class Backend(Protocol):
    """Builds towers for one model; ``load_text`` / ``load_vision`` may be slow and run in threads.

    A backend may also expose ``preprocess`` (an ``ImagePreprocess``), the image recipe its vision tower expects.
    """

    name: str

    def load_text(self) -> Tower[list[str]]: ...

    def load_vision(self) -> Tower[np.ndarray]: ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit: np.ndarray = x / np.maximum(norms, 1e-12)
    return unit


@dataclass
class _Slot:
    tower: Tower[Any] | None = None
    loads: int = 0
    load_seconds: float = 0.0
    last_used: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Encoder:
    """Text and image embeddings for one CLIP model.

    ``load_counts`` counts completed tower loads (a test can prove a single load);
    ``tower_bytes`` reports the parameter bytes of each loaded tower.
    """

    def __init__(self, backend: Backend, model_id: str, random_weights: bool = False) -> None:
        self.backend = backend
        self.model_id = model_id
        self.random_weights = random_weights
        self._slots = {"text": _Slot(), "vision": _Slot()}
        if random_weights:
            log.warning("MODEL %s HAS RANDOM WEIGHTS: rankings are meaningless except for exact matches", model_id)

    @property
    def preprocess(self) -> ImagePreprocess:
        """The image recipe the vision tower expects (the backend's; ``OPENAI_CLIP`` if it names none)."""
        recipe = getattr(self.backend, "preprocess", OPENAI_CLIP)
        return recipe if isinstance(recipe, ImagePreprocess) else OPENAI_CLIP

    def _tower(self, name: str) -> Tower[Any]:
        slot = self._slots[name]
        tower = slot.tower
        if tower is None:
            with slot.lock:
                if slot.tower is None:
                    start = time.perf_counter()
                    loader = self.backend.load_text if name == "text" else self.backend.load_vision
                    slot.tower = loader()
                    slot.load_seconds = time.perf_counter() - start
                    slot.loads += 1
                    log.info("loaded %s tower of %s in %.2fs (%s)", name, self.model_id, slot.load_seconds, self.backend.name)
                tower = slot.tower
        slot.last_used = time.monotonic()
        return tower

    def ensure_loaded(self, *towers: str) -> None:
        for name in towers:
            self._tower(name)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return l2_normalise(self._tower("text").encode(texts))

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels``: float32 [n, 3, S, S] from ``consumer.encoder.images.clip_pixels`` with ``self.preprocess``."""
        if len(pixels) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return l2_normalise(self._tower("vision").encode(pixels))

    def unload(self, name: str) -> bool:
        """Drop a loaded tower (it reloads on next use); True if one was loaded."""
        slot = self._slots[name]
        with slot.lock:
            loaded = slot.tower is not None
            slot.tower = None
        return loaded

    def idle_seconds(self, name: str) -> float | None:
        slot = self._slots[name]
        return None if slot.tower is None else time.monotonic() - slot.last_used

    @property
    def load_counts(self) -> dict[str, int]:
        return {name: slot.loads for name, slot in self._slots.items()}

    @property
    def load_seconds(self) -> dict[str, float]:
        return {name: slot.load_seconds for name, slot in self._slots.items() if slot.loads}

    @property
    def tower_bytes(self) -> dict[str, int]:
        return {name: (slot.tower.nbytes if slot.tower is not None else 0) for name, slot in self._slots.items()}

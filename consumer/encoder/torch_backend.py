"""The torch backend: transformers' CLIP towers in fp32 (needs the ``export`` extra: torch, transformers)."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from consumer.encoder.encoder import Tower
from consumer.encoder.images import ImagePreprocess
from consumer.encoder.manifest import source_preprocess


def _import_torch(threads: int | None) -> ModuleType:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    return torch


class _TorchText:
    def __init__(self, model_dir: str, threads: int | None) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        self._torch = _import_torch(threads)
        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir)  # nosec B615  # CLIP_MODEL is operator configuration; pin it with a local snapshot directory (README: Security)
        self.model = CLIPTextModelWithProjection.from_pretrained(model_dir).eval()  # nosec B615  # CLIP_MODEL is operator configuration; pin it with a local snapshot directory (README: Security)
        self.nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def encode(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with self._torch.inference_mode():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        embeds: np.ndarray = out.text_embeds.float().numpy()
        return embeds


class _TorchVision:
    def __init__(self, model_dir: str, threads: int | None) -> None:
        from transformers import CLIPVisionModelWithProjection

        self._torch = _import_torch(threads)
        self.model = CLIPVisionModelWithProjection.from_pretrained(model_dir).eval()  # nosec B615  # CLIP_MODEL is operator configuration; pin it with a local snapshot directory (README: Security)
        self.nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.model(pixel_values=self._torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)))
        embeds: np.ndarray = out.image_embeds.float().numpy()
        return embeds


class TorchBackend:
    """transformers + torch, fp32; ``model`` is a hub id or a local directory (``HF_HUB_OFFLINE`` honoured)."""

    name = "torch"

    def __init__(self, model: str, threads: int | None = None) -> None:
        self.model = model
        self.threads = threads
        self._preprocess: ImagePreprocess | None = None

    @property
    def preprocess(self) -> ImagePreprocess:
        """The source's ``preprocessor_config.json`` recipe (read once, on first use)."""
        if self._preprocess is None:
            self._preprocess = source_preprocess(self.model)
        return self._preprocess

    def load_text(self) -> Tower[list[str]]:
        return _TorchText(self.model, self.threads)

    def load_vision(self) -> Tower[np.ndarray]:
        return _TorchVision(self.model, self.threads)

"""Build a random-weights CLIP model directory loadable by ``transformers``.

(One tool, a little over 300 lines, most of it the CLIP tokenizer files it must write.)

Usage::

    python -m consumer.tools.model_builder --out DIR --size tiny|vit-b-32 [--seed N] [--force]

The directory holds ``config.json`` + ``model.safetensors`` (a ``CLIPModel``), the real
CLIP BPE tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``,
``merges.txt``), CLIP's ``preprocessor_config.json`` and a ``random_weights.json`` marker.
It loads with ``CLIPModel``, ``CLIPTextModelWithProjection``,
``CLIPVisionModelWithProjection``, ``CLIPTokenizerFast`` and ``CLIPImageProcessor``
``.from_pretrained(DIR)``. Token ids are the real CLIP ids; embeddings are meaningless
except that identical inputs give identical vectors.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from consumer.encoder.extras import TORCH_BACKEND_MODULES, missing_extra

BUILDER_VERSION = 1
SIZES: tuple[str, ...] = ("tiny", "vit-b-32")
MARKER_FILE = "random_weights.json"
BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
PAD_TOKEN_ID = EOS_TOKEN_ID

IMAGE_SIZE = 224
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

KNOWN_TOKENIZATIONS: dict[str, list[int]] = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "Hello World!": [49406, 3306, 1002, 256, 49407],
}

REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    MARKER_FILE,
)


def bytes_to_unicode() -> dict[int, str]:
    """Return CLIP/GPT-2's reversible byte -> printable-unicode-char table (256 entries, fixed order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges(bpe_path: Path = BPE_PATH) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Rebuild OpenAI CLIP's 49,408-token vocab and 48,894 BPE merges from the gzipped merges file.

    Same construction as OpenAI CLIP / open_clip ``SimpleTokenizer``: byte alphabet, the alphabet
    with ``</w>``, every merge joined, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    with gzip.open(bpe_path) as merges_file:
        lines = merges_file.read().decode("utf-8").split("\n")
    pairs = [line.split() for line in lines[1 : 49152 - 256 - 2 + 1]]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"malformed BPE merges file: {bpe_path}")
    merges = tuple((first, second) for first, second in pairs)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[BOS_TOKEN] != BOS_TOKEN_ID or vocab[EOS_TOKEN] != EOS_TOKEN_ID:
        raise ValueError(f"rebuilt CLIP vocab is inconsistent ({len(vocab)} tokens) from {bpe_path}")
    return vocab, merges


def write_vocab_files(directory: Path, bpe_path: Path = BPE_PATH) -> tuple[Path, Path]:
    """Write HF-format ``vocab.json`` and ``merges.txt`` (``#version: 0.2`` header) into ``directory``."""
    vocab, merges = clip_vocab_and_merges(bpe_path)
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def check_tokenizer(tokenizer: Any) -> None:
    """Raise ``ValueError`` unless ``tokenizer`` reproduces the well-known CLIP ids in ``KNOWN_TOKENIZATIONS``."""
    for text, expected in KNOWN_TOKENIZATIONS.items():
        got = list(tokenizer(text)["input_ids"])
        if got != expected:
            raise ValueError(f"tokenizer mismatch for {text!r}: got {got}, expected {expected}")


def build_tokenizer(bpe_path: Path = BPE_PATH) -> Any:
    """Return a verified ``CLIPTokenizer`` (the fast, ``tokenizers``-backed one) (real CLIP BPE, bos/eos/pad ids 49406/49407/49407, max length 77)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="clip-vocab-") as tmp:
        write_vocab_files(Path(tmp), bpe_path)
        tokenizer = CLIPTokenizer.from_pretrained(  # nosec B615  # a temporary local directory, never the hub
            tmp,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            model_max_length=CONTEXT_LENGTH,
        )
    check_tokenizer(tokenizer)
    return tokenizer


def clip_config(size: str) -> Any:
    """Return the ``CLIPConfig`` for ``size`` (``tiny`` or ``vit-b-32``) with the real CLIP token ids."""
    from transformers import CLIPConfig

    token_ids = {
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": CONTEXT_LENGTH,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
    }
    if size == "tiny":
        text_config = {
            **token_ids,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
        }
        vision_config = {
            "image_size": IMAGE_SIZE,
            "patch_size": 32,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
        }
        return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)
    if size == "vit-b-32":
        return CLIPConfig(text_config=token_ids)
    raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_random_model(path_or_id: str | os.PathLike[str]) -> bool:
    """True iff ``path_or_id`` is a local directory holding a ``random_weights.json`` marker with ``random_weights: true``.

    Hub ids and missing paths return False; never raises.
    """
    try:
        directory = Path(path_or_id)
        if not directory.is_dir():
            return False
    except (OSError, TypeError, ValueError):
        return False
    marker = _read_marker(directory)
    return bool(marker and marker.get("random_weights") is True)


def _is_complete(directory: Path, size: str, seed: int) -> bool:
    marker = _read_marker(directory)
    if not marker or marker.get("random_weights") is not True:
        return False
    if (marker.get("size"), marker.get("seed"), marker.get("builder_version")) != (size, seed, BUILDER_VERSION):
        return False
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def _save_image_processor(directory: Path) -> None:
    """Save CLIP's preprocessor config; uses the PIL backend class since torchvision may be absent."""
    processor_cls: type[Any]
    try:
        from transformers import CLIPImageProcessorPil

        processor_cls = CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        processor_cls = CLIPImageProcessor
    processor = processor_cls(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=3,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        do_convert_rgb=True,
    )
    processor.save_pretrained(str(directory))


def _write_model_files(directory: Path, size: str, seed: int) -> None:
    import torch
    from transformers import CLIPModel

    config = clip_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.eval()
    model.save_pretrained(str(directory))

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(directory))
    write_vocab_files(directory)
    _save_image_processor(directory)


def _apply_umask(directory: Path) -> None:
    """Give every file the mode of the freshly written marker (save_pretrained leaves model.safetensors 0600)."""
    file_mode = (directory / MARKER_FILE).stat().st_mode & 0o777
    directory.chmod(file_mode | (file_mode & 0o444) >> 2)
    for path in directory.iterdir():
        path.chmod(file_mode)


def _marker_payload(size: str, seed: int) -> dict[str, Any]:
    return {
        "random_weights": True,
        "size": size,
        "seed": seed,
        "builder_version": BUILDER_VERSION,
        "note": "random weights: rankings are meaningless except exact matches",
    }


def build_random_clip(out_dir: Path | str, size: str = "tiny", seed: int = 0, *, force: bool = False) -> Path:
    """Write a seeded random-weights CLIP model of ``size`` to ``out_dir`` and return ``out_dir``.

    Idempotent: if ``out_dir`` already holds a complete model with the same size, seed and builder
    version, nothing is written. The model is built in a sibling temp dir and moved into place with
    the marker written last, so an interrupted build is never mistaken for a complete one.
    ``force=True`` rebuilds unconditionally. Same ``(size, seed)`` gives bit-identical weights.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    out = Path(out_dir)
    if not force and _is_complete(out, size, seed):
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.building-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_model_files(staging, size, seed)
        (staging / MARKER_FILE).write_text(json.dumps(_marker_payload(size, seed), indent=2) + "\n", encoding="utf-8")
        _apply_umask(staging)
        if not out.exists():
            try:
                staging.rename(out)
                return out
            except OSError:
                if _is_complete(out, size, seed):
                    return out
        out.mkdir(exist_ok=True)
        (out / MARKER_FILE).unlink(missing_ok=True)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == MARKER_FILE):
            os.replace(item, out / item.name)
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the output directory, build time and size."""
    parser = argparse.ArgumentParser(prog="python -m consumer.tools.model_builder", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete model exists")
    args = parser.parse_args(argv)
    if (args.force or not _is_complete(args.out, args.size, args.seed)) and (
        missing := missing_extra("clip-search-build-model", TORCH_BACKEND_MODULES)
    ):
        parser.exit(1, missing + "\n")

    started = time.perf_counter()
    out = build_random_clip(args.out, args.size, args.seed, force=args.force)
    elapsed = time.perf_counter() - started
    print(f"{out} size={args.size} seed={args.seed} {elapsed:.1f}s {_dir_size(out) / 1e6:.1f}MB random_weights=true")
    return 0


if __name__ == "__main__":
    sys.exit(main())

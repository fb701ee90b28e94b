"""Build a random-weights CLIP model directory loadable by ``transformers``.

(One tool, a little over 300 lines, most of it the CLIP tokenizer files it must write.)

Usage::

    python -m consumer.tools.model_builder --out DIR --size NAME [--seed N] [--force]

NAME is ``tiny``, a family in ``FAMILIES`` (full size: ``vit-b-32`` is OpenAI's shapes,
``laion-vit-b-32``, ``metaclip-vit-b-32``, ``tinyclip-vit-40m-32``) or ``<family>-small``: the
family's activation, patch size, image size and image recipe with 2-layer, 32-wide towers.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumer.encoder.extras import TORCH_BACKEND_MODULES, missing_extra

BUILDER_VERSION = 1
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
OPENAI_PREPROCESS: dict[str, Any] = {
    "shortest_edge": IMAGE_SIZE,
    "crop_size": IMAGE_SIZE,
    "image_mean": IMAGE_MEAN,
    "image_std": IMAGE_STD,
    "resample": 3,
}


@dataclass(frozen=True)
class Family:
    """One published CLIP checkpoint's architecture, image recipe and quality, reproduced with random weights.

    ``text`` / ``vision``: ``CLIPTextConfig`` / ``CLIPVisionConfig`` fields as the hub's ``config.json``
    states them; ``preprocess``: its ``preprocessor_config.json`` (``size.shortest_edge``, ``crop_size``,
    ``image_mean``, ``image_std``, ``resample``). Quality figures are the publisher's, never measured here.
    """

    hub_id: str
    hidden_act: str
    projection_dim: int
    text: dict[str, int]
    vision: dict[str, int]
    imagenet_zero_shot_top1: float | None
    coco_text_to_image_r1: float | None
    quality_source: str
    parameters: str
    preprocess: dict[str, Any] = field(default_factory=lambda: dict(OPENAI_PREPROCESS))


_B32_TEXT = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8}
_B32_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 32,
    "image_size": 224,
}

FAMILIES: dict[str, Family] = {
    # config.json / preprocessor_config.json of each hub id (the transformers CLIPModel checkpoints).
    "vit-b-32": Family(
        hub_id="openai/clip-vit-base-patch32",
        hidden_act="quick_gelu",
        projection_dim=512,
        text=_B32_TEXT,
        vision=_B32_VISION,
        imagenet_zero_shot_top1=63.2,
        coco_text_to_image_r1=None,
        quality_source="ImageNet: OpenCLIP README (OpenAI ViT-B/32, 63.2%); COCO R@1 for B/32 not in the CLIP paper",
        parameters="151M (text 63M, vision 88M)",
    ),
    "laion-vit-b-32": Family(
        hub_id="laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        hidden_act="gelu",
        projection_dim=512,
        text=_B32_TEXT,
        vision=_B32_VISION,
        imagenet_zero_shot_top1=66.6,
        coco_text_to_image_r1=None,
        quality_source="ImageNet: model card / OpenCLIP README (LAION-2B ViT-B/32, 66.6%)",
        parameters="151M (text 63M, vision 88M)",
    ),
    "metaclip-vit-b-32": Family(
        hub_id="facebook/metaclip-b32-400m",
        hidden_act="quick_gelu",
        projection_dim=512,
        text=_B32_TEXT,
        vision=_B32_VISION,
        imagenet_zero_shot_top1=65.5,
        coco_text_to_image_r1=None,
        quality_source="ImageNet: MetaCLIP paper (Xu et al. 2023, arXiv:2309.16671), ViT-B/32 400M, 65.5%",
        parameters="151M (text 63M, vision 88M)",
    ),
    "tinyclip-vit-40m-32": Family(
        hub_id="wkcn/TinyCLIP-ViT-40M-32-Text-19M-LAION400M",
        # open_clip's TinyCLIP-ViT-40M-32-Text-19M config: width 512 both towers, 12 vision / 6 text
        # layers, head width 64, MLP ratio 4, no QuickGELU (so nn.GELU).
        hidden_act="gelu",
        projection_dim=512,
        text={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 8},
        vision={
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "patch_size": 32,
            "image_size": 224,
        },
        imagenet_zero_shot_top1=59.8,
        coco_text_to_image_r1=None,
        quality_source="ImageNet: TinyCLIP README (Wu et al. ICCV 2023), ViT-40M/32 Text-19M LAION-400M, 59.8%",
        parameters="~84M (text 19M + 25M token embeddings, vision 40M)",
    ),
}
"""Full-size families by builder NAME; values from each hub id's config files and publications (see ``quality_source``)."""

SMALL_SUFFIX = "-small"
SIZES: tuple[str, ...] = ("tiny", *FAMILIES, *(name + SMALL_SUFFIX for name in FAMILIES))


def family_of(size: str) -> Family | None:
    """The ``Family`` a builder NAME reproduces (``None`` for ``tiny``); raises ValueError for an unknown NAME."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    return FAMILIES.get(size.removesuffix(SMALL_SUFFIX))


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
    """Return the ``CLIPConfig`` for builder NAME ``size`` with the real CLIP token ids."""
    from transformers import CLIPConfig

    family = family_of(size)
    token_ids: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": CONTEXT_LENGTH,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
    }
    small: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 32,
    }
    if family is None:
        vision = {"image_size": IMAGE_SIZE, "patch_size": 32, **small}
        return CLIPConfig(text_config={**token_ids, **small}, vision_config=vision, projection_dim=32)
    act: dict[str, Any] = {"hidden_act": family.hidden_act}
    if size.endswith(SMALL_SUFFIX):
        vision = {"image_size": family.vision["image_size"], "patch_size": family.vision["patch_size"], **small, **act}
        return CLIPConfig(text_config={**token_ids, **small, **act}, vision_config=vision, projection_dim=32)
    proj = {"projection_dim": family.projection_dim}
    return CLIPConfig(
        text_config={**token_ids, **family.text, **act, **proj},
        vision_config={**family.vision, **act, **proj},
        projection_dim=family.projection_dim,
    )


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


def _save_image_processor(directory: Path, family: Family | None) -> None:
    """Save the family's preprocessor config; uses the PIL backend class since torchvision may be absent."""
    processor_cls: type[Any]
    try:
        from transformers import CLIPImageProcessorPil

        processor_cls = CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        processor_cls = CLIPImageProcessor
    recipe = family.preprocess if family else OPENAI_PREPROCESS
    processor = processor_cls(
        do_resize=True,
        size={"shortest_edge": recipe["shortest_edge"]},
        resample=recipe["resample"],
        do_center_crop=True,
        crop_size={"height": recipe["crop_size"], "width": recipe["crop_size"]},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=recipe["image_mean"],
        image_std=recipe["image_std"],
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
    _save_image_processor(directory, family_of(size))


def _apply_umask(directory: Path) -> None:
    """Give every file the mode of the freshly written marker (save_pretrained leaves model.safetensors 0600)."""
    file_mode = (directory / MARKER_FILE).stat().st_mode & 0o777
    directory.chmod(file_mode | (file_mode & 0o444) >> 2)
    for path in directory.iterdir():
        path.chmod(file_mode)


def _marker_payload(size: str, seed: int) -> dict[str, Any]:
    family = family_of(size)
    return {
        "random_weights": True,
        "size": size,
        "family": family.hub_id if family else None,
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
    family_of(size)
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

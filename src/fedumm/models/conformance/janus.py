"""A Janus-Pro folder (transformers' ``JanusForConditionalGeneration`` layout) against what the
janus backbone needs: its files, its dimensions against the presets, the special tokens and
role markers of its prompts, and its VQ codebook's row norms (see
:mod:`fedumm.models.janus.targets`: DeepSeek's tokenizer l2-normalises latents and codebook rows
before the lookup, transformers' ``JanusVQVAE.encode`` does not; the two agree only where the
rows have equal norms)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedumm.models.conformance.common import (
    FAIL,
    OK,
    WARN,
    Check,
    WeightIndex,
    flat,
    guarded,
    listing,
    preset_check,
    read_json,
    template_check,
    tokens_check,
    vocabulary,
    weight_index,
    weights_check,
)
from fedumm.models.janus.assembly import ASSISTANT, BOI, EOI, IMAGE, USER
from fedumm.models.janus.checkpoint import check_folder
from fedumm.models.janus.presets import PRESETS, preset_dims

CODEBOOK = "vqmodel.quantize.embedding.weight"  # the VQ codebook's tensor name ends so
EQUAL_NORMS = 1e-3  # relative spread below which the rows count as equal


def checks(path: Path) -> Iterator[Check]:
    index: list[WeightIndex | None] = [None]

    def files() -> Iterator[Check]:
        index[0] = weight_index(path)
        try:
            check_folder(path)
        except (FileNotFoundError, ValueError) as exc:
            yield Check("files", FAIL, str(exc))
        else:
            yield Check("files", OK, listing(path, index[0]))

    yield from guarded("files", files)
    if not (path / "config.json").is_file():
        return
    weights = index[0]
    if weights is None and not any((path / n).is_file() for n in (
            "pytorch_model.bin", "pytorch_model.bin.index.json")):
        yield weights_check(None, "the model has no weights")
    elif weights is None:
        yield Check("weights", WARN, "pytorch_model.bin only: tensor names and the codebook "
                    "are not checked (save the folder as safetensors to check them)")
    else:
        yield weights_check(weights, "")
    config: dict[str, Any] = {}

    def dims() -> Iterator[Check]:
        config.update(_full_config(path))
        actual = flat({part: config[f"{part}_config"] for part in ("text", "vision", "vq")})
        yield preset_check(actual, {n: flat(preset_dims(n)) for n in PRESETS}, "janus")

    yield from guarded("config", dims)
    yield from guarded("tokenizer", lambda: _tokens(path, config))
    yield from guarded("chat template", lambda: [template_check(
        path, (USER, ASSISTANT, IMAGE), f"DeepSeek's conversation ({USER}: ... {ASSISTANT}:)")])
    yield from guarded("processor", lambda: _processor(path, config))
    if weights is not None:
        yield from guarded("codebook", lambda: _codebook(weights, config))


def _full_config(path: Path) -> dict[str, Any]:
    """config.json with transformers' defaults filled in (no weights read)."""
    from transformers import JanusConfig

    return JanusConfig.from_dict(read_json(path / "config.json")).to_dict()


def _tokens(path: Path, config: dict[str, Any]) -> Iterator[Check]:
    vocab = vocabulary(path)
    if vocab is None and (path / "tokenizer.model").is_file():
        yield Check("tokenizer", WARN, "tokenizer.model only (sentencepiece): the special "
                    "tokens are not checked")
        return
    size = (config.get("text_config") or {}).get("vocab_size")
    yield tokens_check(vocab, {IMAGE: "image placeholder", BOI: "begin of image",
                               EOI: "end of image"}, size)
    image_id = config.get("image_token_id")
    if vocab is not None and IMAGE in vocab and image_id is not None \
            and vocab[IMAGE] != image_id:
        yield Check("tokenizer", FAIL, f"config image_token_id={image_id}, but the tokenizer's "
                    f"{IMAGE} is {vocab[IMAGE]}: images would not be placed")


def _processor(path: Path, config: dict[str, Any]) -> Iterator[Check]:
    name = next((n for n in ("processor_config.json", "preprocessor_config.json")
                 if (path / n).is_file()), None)
    vision = config.get("vision_config") or {}
    if name is None or not vision:
        return
    proc = read_json(path / name)
    images = proc.get("image_processor", proc)
    size = images.get("size") or {}
    side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    tokens = proc.get("num_image_tokens")
    bad = []
    if side is not None and side != vision.get("image_size"):
        bad.append(f"image size {side} (vision_config.image_size {vision.get('image_size')})")
    if tokens is not None and tokens != vision.get("num_image_tokens"):
        bad.append(f"num_image_tokens {tokens} (vision_config: "
                   f"{vision.get('num_image_tokens')})")
    if bad:
        yield Check("processor", WARN, f"{name}: " + "; ".join(bad))
    else:
        yield Check("processor", OK, f"{name}: {side} px images, "
                    f"{tokens or vision.get('num_image_tokens')} image tokens")


def _codebook(weights: WeightIndex, config: dict[str, Any]) -> Iterator[Check]:
    keys = [k for k in weights.where if k.endswith(CODEBOOK)]
    if not keys:
        yield Check("codebook", FAIL, f"the weights have no *{CODEBOOK} (the VQ codebook)")
        return
    vq = config.get("vq_config") or {}
    want = [vq.get("num_embeddings"), vq.get("embed_dim")]
    shape = weights.shape(keys[0])
    if None not in want and shape != want:
        yield Check("codebook", FAIL, f"{keys[0]} has shape {shape}, vq_config says {want} "
                    "(num_embeddings, embed_dim)")
        return
    norms = weights.tensor(keys[0]).float().norm(dim=-1)
    lo, hi = float(norms.min()), float(norms.max())
    zero = int((norms == 0).sum())
    if zero:
        yield Check("codebook", WARN, f"{zero} of {len(norms)} codebook rows are zero: the "
                    "normalised lookup never picks them")
        return
    spread = hi / lo - 1
    if spread < EQUAL_NORMS:
        yield Check("codebook", OK, f"{len(norms)} rows, equal norms ({lo:.4g}): DeepSeek's "
                    "normalised lookup and transformers' JanusVQVAE.encode agree")
    else:
        yield Check("codebook", OK, f"{len(norms)} rows whose norms differ by up to "
                    f"{spread:.1%} ({lo:.4g} to {hi:.4g}): transformers' JanusVQVAE.encode "
                    "would pick other codes than DeepSeek's tokenizer; fedumm uses the "
                    "official normalised lookup")

"""A BLIP3o folder (the published layout, :mod:`fedumm.models.blip3o.checkpoint`) against what
the blip3o backbone needs: its files, which parts it has (Qwen2.5-VL for understanding; the
queries, DiT and fedumm's target encoder and patch decoder for generation), its dimensions
against the presets, the tokens its prompts use and Qwen's chat template."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fedumm.models.blip3o.assembly import IMAGE_PAD, IMG_START, SPECIALS
from fedumm.models.blip3o.checkpoint import (
    DECODER_FILE,
    DIT_PREFIX,
    QUERIES_KEY,
    TARGET_DIR,
    check_folder,
    folder_dims,
)
from fedumm.models.blip3o.presets import PRESETS, preset_dims
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
    template_check,
    tokens_check,
    vocabulary,
    weight_index,
    weights_check,
)

# the Qwen2.5-VL parts, by the first part of their published names
_QWEN_PARTS = {"visual.": "the vision tower (visual.*)",
               "model.layers.": "the language model (model.layers.*)"}
UNDERSTANDING_ONLY = ("understanding-only: generation clients cannot train (add fedumm's "
                      f"{TARGET_DIR}/ and {DECODER_FILE}, see fedumm.models.blip3o.checkpoint)")


def checks(path: Path) -> Iterator[Check]:
    state: dict[str, Any] = {}

    def files() -> Iterator[Check]:
        state["weights"] = weight_index(path)
        try:
            state["config"] = check_folder(path)
        except (FileNotFoundError, ValueError) as exc:
            yield Check("files", FAIL, str(exc))
        else:
            yield Check("files", OK, listing(path, state["weights"],
                                             (f"{TARGET_DIR}/", DECODER_FILE)))

    yield from guarded("files", files)
    weights: WeightIndex | None = state.get("weights")
    config: dict[str, Any] | None = state.get("config")
    if not (path / "config.json").is_file():
        return
    yield weights_check(weights, "BLIP3o's weights are safetensors")
    if weights is None or config is None:
        return
    parts: list[Check] = list(guarded("parts", lambda: _parts(path, weights, config)))
    yield from parts
    if not any(c.status == FAIL for c in parts):
        yield from guarded("config", lambda: _dims(path, weights, config))
    text = config.get("text_config") or config
    yield from guarded("tokenizer", lambda: [tokens_check(
        vocabulary(path), {t: "BLIP3o's, before the queries" if t == IMG_START
                           else "Qwen2.5-VL's" for t in SPECIALS}, text.get("vocab_size"))])
    qwen_roles = [t for t in SPECIALS if t.startswith("<|im_")]
    yield from guarded("chat template", lambda: [template_check(
        path, (*qwen_roles, IMAGE_PAD), "Qwen's chat template")])


def _parts(path: Path, weights: WeightIndex, config: dict[str, Any]) -> Iterator[Check]:
    keys = weights.where
    lacking = [what for prefix, what in _QWEN_PARTS.items()
               if not any(k.startswith(prefix) for k in keys)]
    if lacking:
        yield Check("parts", FAIL, f"the weights lack {' and '.join(lacking)} (Qwen2.5-VL in "
                    "the published layout)")
        return
    dit = [k for k in keys if k.startswith(DIT_PREFIX)]
    if QUERIES_KEY not in keys or not dit:
        yield Check("parts", FAIL, f"the weights have no {QUERIES_KEY!r} or no {DIT_PREFIX}* "
                    "tensors (a Qwen2.5-VL checkpoint, not BLIP3o?)")
        return
    n_query = weights.shape(QUERIES_KEY)[-2]
    if config.get("n_query") != n_query:
        yield Check("parts", WARN, f"config n_query={config.get('n_query')}, but "
                    f"{QUERIES_KEY} holds {n_query} queries (the weights' count is used)")
    target = (path / TARGET_DIR / "config.json").is_file()
    decoder = (path / DECODER_FILE).is_file()
    found = f"Qwen2.5-VL, {n_query} queries, the DiT ({len(dit)} tensors)"
    if target and decoder:
        yield Check("parts", OK, f"understanding and generation: {found}, {TARGET_DIR}/, "
                    f"{DECODER_FILE}")
    else:
        absent = [n for n, there in ((f"{TARGET_DIR}/", target), (DECODER_FILE, decoder))
                  if not there]
        yield Check("parts", WARN, f"{UNDERSTANDING_ONLY}; has {found}, lacks "
                    + ", ".join(absent))


def _dims(path: Path, weights: WeightIndex, config: dict[str, Any]) -> Iterator[Check]:
    # folder_dims reads names and shapes only: meta tensors stand for the weights
    keys = [k for k in weights.where if k.startswith(DIT_PREFIX) or k == QUERIES_KEY]
    shapes = weights.shapes(keys)
    tensors = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    actual = _comparable(asdict(folder_dims(path, config, tensors)))
    yield preset_check(actual, {n: _comparable(asdict(preset_dims(n))) for n in PRESETS},
                       "blip3o")


def _comparable(dims: dict[str, Any]) -> dict[str, Any]:
    """Flat dimensions, without the rotary settings (spelled differently across transformers
    versions)."""
    return {k: v for k, v in flat(dims).items() if not k.startswith("text.rope")}

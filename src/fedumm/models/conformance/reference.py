"""A reference checkpoint folder (fedumm's own UMM, :mod:`fedumm.models.reference`): its four
files and their checksums, its config, its tokenizer against the model's vocabulary and its
image codebook against the config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open

from fedumm.models.checksums import SUMS, verify_checksums
from fedumm.models.conformance.common import (
    FAIL,
    OK,
    Check,
    guarded,
    listing,
    read_json,
    tokens_check,
    vocabulary,
    weight_index,
    weights_check,
)
from fedumm.models.reference.backbone import (
    CODEBOOK,
    CONFIG,
    SHIPPED_BASE,
    TOKENIZER,
    WEIGHTS,
    resolve_checkpoint,
)
from fedumm.models.reference.text_tokenizer import SPECIALS
from fedumm.models.reference.umm import UMMConfig


def checks(path: Path) -> Iterator[Check]:
    try:
        resolve_checkpoint(path)
    except FileNotFoundError as exc:
        yield Check("files", FAIL, str(exc))
        return
    yield from guarded("files", lambda: [Check("files", OK, listing(
        path, weight_index(path), (CODEBOOK,)))])
    yield from guarded("checksums", lambda: _checksums(path))
    yield from guarded("weights", lambda: [weights_check(weight_index(path), "")])
    config: list[UMMConfig] = []

    def model_config() -> Iterator[Check]:
        info = read_json(path / CONFIG)
        if "fingerprint" not in info:
            yield Check("config", FAIL, f"{CONFIG} has no fingerprint of the weights")
        config.append(UMMConfig(**info["model"]))
        c = config[0]
        base = read_json(SHIPPED_BASE / CONFIG)["model"]
        same = " (the shipped base's dimensions)" if c.to_dict() == base else ""
        yield Check("config", OK, f"hidden {c.hidden}, {c.layers} layers, {c.image_size} px "
                    f"images, {c.image_codes} image codes, text vocab {c.text_vocab}{same}")

    yield from guarded("config", model_config)
    vocab_size = config[0].text_vocab if config else None
    yield from guarded("tokenizer", lambda: [tokens_check(
        vocabulary(path), dict.fromkeys(SPECIALS, "reference special"), vocab_size)])
    if config:
        yield from guarded("codebook", lambda: _codebook(path, config[0]))


def _checksums(path: Path) -> Iterator[Check]:
    try:
        verify_checksums(path, (WEIGHTS, CONFIG, TOKENIZER, CODEBOOK))
    except ValueError as exc:
        yield Check("checksums", FAIL, str(exc))
        return
    yield Check("checksums", OK, f"every file {SUMS} lists is unchanged")


def _codebook(path: Path, config: UMMConfig) -> Iterator[Check]:
    with safe_open(str(path / CODEBOOK), framework="pt") as st:
        shape = list(st.get_slice("codebook").get_shape())
        patch = int((st.metadata() or {}).get("patch", 0))
    want = [config.image_codes, config.gen_patch ** 2 * 3]
    if shape != want or patch != config.gen_patch:
        yield Check("codebook", FAIL, f"{CODEBOOK} holds {shape} codes of {patch} px patches; "
                    f"the config wants {want} of {config.gen_patch} px")
    else:
        yield Check("codebook", OK, f"{shape[0]} codes of {patch} x {patch} px patches")

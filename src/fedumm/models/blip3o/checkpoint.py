"""BLIP3o checkpoint folders: what loads, and how the published weight names map.

A published BLIP3o folder (BLIP3o-Model-8B / 4B) holds one set of weights in transformers
4.51's Qwen2.5-VL layout, with BLIP3o's parts beside it:

=================================  =======================================================
published name                     here
=================================  =======================================================
``visual.*``                       ``qwen.model.visual.*`` (transformers converts the
``model.{embed_tokens,layers,norm}.*``  legacy Qwen2.5-VL names itself when it loads them)
``lm_head.weight``                 ``qwen.lm_head.weight``
``model.latent_queries`` (1, Q, H)  ``queries.weight`` (Q, H)
``model.dit.model.caption_projection.*``  ``caption_projection.*``
``model.dit.model.*``              ``dit.*`` (diffusers' ``LuminaNextDiT2DModel`` names)
=================================  =======================================================

plus ``config.json`` (Qwen2.5-VL's config and ``n_query`` / ``gen_pooling``), the tokenizer
(with BLIP3o's added ``[IMG]`` token, which precedes the queries) and
``preprocessor_config.json``. Understanding images are resized by that processor to between
``min_pixels`` and ``max_pixels`` of ``config.json`` (fedumm's keys; a folder without them gets
the bounds BLIP3o evaluates at, 200,704 to 1,605,632 pixels). What does not load: BLIP3o's
target encoder (EVA-CLIP-E-14-plus, not in transformers) and its ``diffusion-decoder/`` (a
custom SDXL-style pipeline). fedumm reads a transformers vision model from
``target_encoder/`` and a patch decoder from ``patch_decoder.safetensors`` instead; a folder
without them loads for understanding only, and generation (training or sampling) then stops
with a message saying so. The DiT's head count is not in BLIP3o's config:
``dit_num_attention_heads`` (default 28, BLIP3o's) and ``dit_num_kv_heads`` are read when
present. :func:`save_folder` writes this layout (with the fedumm parts), and
:func:`load_folder` reads it.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedumm.models.blip3o.assembly import Blip3oModel, PatchDecoder
from fedumm.models.blip3o.presets import EVAL_MAX_PIXELS, EVAL_MIN_PIXELS, Blip3oDims
from fedumm.models.checksums import verify_checksums, write_folder_checksums

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json")
TARGET_DIR, DECODER_FILE = "target_encoder", "patch_decoder.safetensors"
DIT_PREFIX, QUERIES_KEY = "model.dit.model.", "model.latent_queries"
_BLIP3O_KEYS = ("n_query", "gen_pooling", "gen_vision_tower", "gen_hidden_size",
                "dit_num_attention_heads", "dit_num_kv_heads", "min_pixels", "max_pixels",
                "rope_len")


def check_folder(path: Path) -> dict[str, Any]:
    """The folder's config; a clear error naming what a BLIP3o folder lacks."""
    if not path.is_dir():
        raise FileNotFoundError(f"backbone.path={str(path)!r} is not a folder (expected a "
                                "BLIP3o checkpoint folder)")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    for what, names in (("the weights", WEIGHTS), ("the tokenizer", TOKENIZER),
                        ("the image processor config", ("preprocessor_config.json",))):
        if not any((path / n).is_file() for n in names):
            missing.append(f"{what} (one of {', '.join(names)})")
    if missing:
        raise FileNotFoundError(f"{path} is not a BLIP3o checkpoint folder: missing "
                                + "; ".join(missing))
    config = json.loads((path / "config.json").read_text())
    if "n_query" not in config or not str(config.get("model_type", "")).startswith(
            ("qwen2_5_vl", "blip3o")):
        raise ValueError(f"{path}/config.json is not a BLIP3o config (expected model_type "
                         f"qwen2_5_vl or blip3o_qwen and an n_query key; got model_type="
                         f"{config.get('model_type')!r})")
    return config


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [path / "model.safetensors"]


def _blip3o_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The published tensors that are not Qwen2.5-VL's: queries and the DiT."""
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if k.startswith(DIT_PREFIX) or k == QUERIES_KEY:
                    out[k] = st.get_tensor(k)
    if QUERIES_KEY not in out or not any(k.startswith(DIT_PREFIX) for k in out):
        raise ValueError(f"{path}: the weights have no {QUERIES_KEY!r} or no {DIT_PREFIX}* "
                         "tensors (a Qwen2.5-VL checkpoint, not BLIP3o?)")
    return out


def folder_dims(path: Path, config: dict[str, Any] | None = None,
                tensors: dict[str, torch.Tensor] | None = None) -> Blip3oDims:
    """The architecture of a checkpoint folder (from its config and tensor shapes)."""
    config = config or check_folder(path)
    tensors = tensors if tensors is not None else _blip3o_tensors(path)
    text = config.get("text_config") or {k: v for k, v in config.items()
                                         if k not in ("vision_config", *_BLIP3O_KEYS)}
    text = {k: v for k, v in text.items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
        "rope_parameters", "rope_scaling", "rope_theta")}
    layers = {int(m.group(1)) for k in tensors if (m := re.match(
        rf"{re.escape(DIT_PREFIX)}layers\.(\d+)\.", k))}
    width, features = tensors[DIT_PREFIX + "patch_embedder.proj.weight"].shape
    heads = int(config.get("dit_num_attention_heads", 28))
    target_cfg = path / TARGET_DIR / "config.json"
    if target_cfg.is_file():
        t = json.loads(target_cfg.read_text())
        t = t.get("vision_config", t)
        target = {k: t[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "image_size", "patch_size")}
    else:  # BLIP3o's EVA-CLIP-E-14-plus: the dimensions only (its weights do not load)
        target = dict(hidden_size=int(features), intermediate_size=15360, num_hidden_layers=64,
                      num_attention_heads=16, image_size=448, patch_size=14)
    pool = int(str(config.get("gen_pooling", "early_pool2d_4")).rsplit("_", 1)[-1])
    vision = {k: v for k, v in config["vision_config"].items() if k in (
        "depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
        "spatial_merge_size", "temporal_patch_size", "window_size", "fullatt_block_indexes")}
    return Blip3oDims(
        text=text, vision=vision, tie_word_embeddings=bool(config.get("tie_word_embeddings")),
        n_query=int(tensors[QUERIES_KEY].shape[-2]),
        dit=dict(hidden_size=int(width), num_layers=len(layers), num_attention_heads=heads,
                 num_kv_heads=int(config.get("dit_num_kv_heads", heads))),
        target=target, pool=pool, rope_len=int(config.get("rope_len", 384)),
        min_pixels=int(config.get("min_pixels", EVAL_MIN_PIXELS)),
        max_pixels=int(config.get("max_pixels", EVAL_MAX_PIXELS)))


def load_folder(path: Path) -> tuple[Blip3oModel, Any, Any]:
    """(model, tokenizer, image processor) from a BLIP3o folder (see the module doc)."""
    from diffusers import LuminaNextDiT2DModel
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        SiglipVisionModel,
    )

    config = check_folder(path)
    verify_checksums(path, (), optional=True)  # a folder fedumm wrote lists its files
    tensors = _blip3o_tensors(path)
    dims = folder_dims(path, config, tensors)
    qcfg = Qwen2_5_VLConfig(**{k: v for k, v in config.items()
                               if k not in ("model_type", "architectures", *_BLIP3O_KEYS)})
    with _quiet_transformers():  # it lists the DiT tensors as unexpected: they are ours
        qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(path), config=qcfg, local_files_only=True)
    d = dims.dit
    with torch.device("meta"):
        dit = LuminaNextDiT2DModel(
            sample_size=dims.grid, patch_size=1, in_channels=dims.feature_dim,
            hidden_size=d["hidden_size"], num_layers=d["num_layers"],
            num_attention_heads=d["num_attention_heads"], num_kv_heads=d["num_kv_heads"],
            learn_sigma=False, qk_norm=True, cross_attention_dim=d["hidden_size"])
    target = decoder = None
    if (path / TARGET_DIR).is_dir():
        target = SiglipVisionModel.from_pretrained(str(path / TARGET_DIR), local_files_only=True)
    if (path / DECODER_FILE).is_file():
        decoder = PatchDecoder(dims.feature_dim, dims.target["image_size"] // dims.grid)
        with safe_open(str(path / DECODER_FILE), framework="pt") as st:
            decoder.load_state_dict({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    with torch.device("meta"):
        model = Blip3oModel(qwen=torch.nn.Identity(), dit=dit, dims=dims,
                            target_encoder=torch.nn.Identity(), decoder=PatchDecoder(1, 1))
    model.qwen, model.target_encoder, model.decoder = qwen, target, decoder
    rest = {("queries.weight" if k == QUERIES_KEY else
             k[len(DIT_PREFIX):] if k.startswith(DIT_PREFIX + "caption_projection.") else
             "dit." + k[len(DIT_PREFIX):]): (v[0] if k == QUERIES_KEY else v)
            for k, v in tensors.items()}
    # diffusers' DiT has a pad_token that its forward never uses and BLIP3o's copy lacks
    rest.setdefault("dit.pad_token", torch.zeros(dims.dit["hidden_size"],
                                                 dtype=rest["queries.weight"].dtype))
    own = {k for k in model.state_dict() if k.startswith(("dit.", "queries.",
                                                           "caption_projection."))}
    missing, extra = sorted(own - set(rest)), sorted(set(rest) - own)
    if missing or extra:
        raise ValueError(f"{path}: BLIP3o tensors do not match the architecture: missing "
                         f"{missing[:5]}, unexpected {extra[:5]}")
    model.load_state_dict(rest, strict=False, assign=True)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # the folder's processor, with the understanding pixel bounds of the folder's config
    processor = Qwen2VLImageProcessorPil.from_pretrained(
        str(path), local_files_only=True, min_pixels=dims.min_pixels, max_pixels=dims.max_pixels)
    return model, tok, processor


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _published_name(name: str) -> str | None:
    """A Qwen2.5-VL state-dict name in the legacy layout BLIP3o's weights use."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name if name == "lm_head.weight" else None


def save_folder(model: Blip3oModel, tokenizer, processor, path: Path) -> Path:
    """Write ``model`` as a BLIP3o folder in the published layout (+ fedumm's target encoder
    and patch decoder), which :func:`load_folder` reads back."""
    path.mkdir(parents=True, exist_ok=True)
    qwen = model.qwen
    state: dict[str, torch.Tensor] = {}
    for name, t in qwen.state_dict().items():
        out = _published_name(name)
        if out is not None and not (out == "lm_head.weight" and
                                    qwen.config.tie_word_embeddings):
            state[out] = t
    state[QUERIES_KEY] = model.queries.weight[None]
    for name, t in model.caption_projection.state_dict().items():
        state[f"{DIT_PREFIX}caption_projection.{name}"] = t
    for name, t in model.dit.state_dict().items():
        state[DIT_PREFIX + name] = t
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    config = qwen.config.to_dict()
    dims = model.dims
    config.update(n_query=dims.n_query, gen_pooling=f"early_pool2d_{dims.pool}",
                  gen_hidden_size=dims.feature_dim,
                  dit_num_attention_heads=dims.dit["num_attention_heads"],
                  dit_num_kv_heads=dims.dit["num_kv_heads"], rope_len=dims.rope_len,
                  min_pixels=dims.min_pixels, max_pixels=dims.max_pixels)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    if model.target_encoder is not None:
        model.target_encoder.save_pretrained(str(path / TARGET_DIR))
    if model.decoder is not None:
        save_file({k: v.contiguous().cpu() for k, v in model.decoder.state_dict().items()},
                  str(path / DECODER_FILE))
    write_folder_checksums(path)
    return path

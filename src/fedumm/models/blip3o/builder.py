"""``backbone.kind=blip3o`` from a config: the ``tiny`` preset built in code (random weights,
the same model everywhere, its patch decoder fitted to ShapesWorld scenes), or a checkpoint
folder; and the architecture alone on the meta device for ``fedumm backbone info``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedumm.models.blip3o.assembly import (
    TARGET_MEAN,
    TARGET_STD,
    Blip3oModel,
    build_parts,
    fit_patch_decoder,
    flow_scheduler,
    image_processor,
    special_token_ids,
    tiny_tokenizer,
)
from fedumm.models.blip3o.backbone import GROUPS, Blip3oBackbone
from fedumm.models.blip3o.presets import PRESETS, preset_dims
from fedumm.models.dtypes import DTYPES
from fedumm.models.groups import AdapterGroup
from fedumm.models.kinds import check_trainable_preset
from fedumm.models.placement import resolve_device

if TYPE_CHECKING:
    from fedumm.config import BackboneConfig


def _shapes_images(size: int, n: int) -> torch.Tensor:
    """ShapesWorld scenes (both splits) as (n, 3, size, size) in [0, 1]: what the tiny preset's
    patch decoder is fitted on."""
    from fedumm.data.readers.shapes import generate_shapes

    arrays = []
    for split in ("base", "downstream"):
        data = generate_shapes(split, n // 2, seed=12345, role="train", image_size=size)
        arrays += list(data.images[: n // 2])
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def build_tiny() -> tuple[Blip3oModel, Any, Any]:
    """(model, tokenizer, image processor) of the ``tiny`` preset."""
    dims = preset_dims("tiny")
    tok = tiny_tokenizer()
    torch.manual_seed(0)  # the tiny preset is the same random model everywhere
    model = build_parts(dims, special_token_ids(tok), vocab_size=len(tok))
    images = _shapes_images(dims.target["image_size"], 256)
    fit_patch_decoder(model, images, (images - TARGET_MEAN) / TARGET_STD)
    return model, tok, image_processor(dims)


def build(cfg: BackboneConfig) -> Blip3oBackbone:
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    if cfg.preset:
        check_trainable_preset("blip3o", cfg.preset, PRESETS)
        model, tok, processor = build_tiny()
    else:
        from fedumm.models.blip3o.checkpoint import load_folder

        model, tok, processor = load_folder(Path(cfg.path))
    model.to(device=device, dtype=dtype)
    model.eval()
    return Blip3oBackbone(model, tok, processor, scheduler=flow_scheduler())


def skeleton(cfg: BackboneConfig) -> tuple[nn.Module, tuple[AdapterGroup, ...]]:
    """The architecture on the meta device (no memory, no weights) and its groups."""
    if not cfg.preset:
        from fedumm.models.blip3o.checkpoint import folder_dims

        dims = folder_dims(Path(cfg.path))
    else:
        dims = preset_dims(cfg.preset)
    ids = {k: i for i, k in enumerate(("image", "video", "vision_start", "vision_end", "eos",
                                       "pad"))}
    with torch.device("meta"):
        model = build_parts(dims, ids)
    return model, GROUPS

"""``backbone.kind=janus`` from a config: the ``tiny`` preset built in code (a small processor
and random weights, the same model everywhere), or a checkpoint folder; and the architecture
alone on the meta device for ``fedumm backbone info``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedumm.models.dtypes import DTYPES
from fedumm.models.groups import AdapterGroup
from fedumm.models.janus.assembly import IMAGE, set_generation_config, tiny_processor
from fedumm.models.janus.backbone import JanusBackbone, janus_groups
from fedumm.models.janus.checkpoint import folder_config, load_folder
from fedumm.models.janus.presets import PRESETS, preset_config, tiny_dims
from fedumm.models.kinds import check_trainable_preset
from fedumm.models.placement import resolve_device

if TYPE_CHECKING:
    from fedumm.config import BackboneConfig


def build_tiny():
    """(model, processor) of the ``tiny`` preset: random weights seeded, so the same model
    everywhere (every client and test builds it independently)."""
    from transformers import JanusForConditionalGeneration

    dims = tiny_dims()["vision"]
    processor = tiny_processor(dims["image_size"], dims["num_image_tokens"])
    tok = processor.tokenizer
    config = preset_config("tiny", len(tok), tok.convert_tokens_to_ids(IMAGE))
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config)
    set_generation_config(model, tok)
    return model, processor


def build(cfg: BackboneConfig) -> JanusBackbone:
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    if cfg.preset:
        check_trainable_preset("janus", cfg.preset, PRESETS)
        model, processor = build_tiny()
    else:
        model, processor = load_folder(Path(cfg.path), dtype)
    model.to(device=device, dtype=dtype)
    model.eval()
    return JanusBackbone(model, processor)


def skeleton(cfg: BackboneConfig) -> tuple[nn.Module, tuple[AdapterGroup, ...]]:
    """The architecture on the meta device (no memory, no weights) and its groups."""
    from transformers import JanusForConditionalGeneration

    config = preset_config(cfg.preset) if cfg.preset else folder_config(Path(cfg.path))
    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    # BOI / EOI ids do not change the parameter count of the alignment group
    return model, janus_groups(0, 1)

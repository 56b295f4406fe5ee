"""The BLIP3o-style backbone (``backbone.kind=blip3o``): Qwen2.5-VL + learnable queries + a
flow-matching diffusion transformer (see :mod:`fedumm.models.blip3o.backbone`)."""

from fedumm.models.blip3o.backbone import GROUPS, Blip3oBackbone

__all__ = ["GROUPS", "Blip3oBackbone"]

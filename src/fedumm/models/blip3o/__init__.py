"""The BLIP3o-style backbone (``backbone.kind=blip3o``): Qwen2.5-VL + learnable queries + a
flow-matching diffusion transformer (see :mod:`fedumm.models.blip3o.backbone`). Importing this
package registers the kind."""

from fedumm.models.blip3o.backbone import GROUPS, Blip3oBackbone
from fedumm.models.blip3o.builder import build, skeleton
from fedumm.models.kinds import register_backbone

register_backbone("blip3o", build, skeleton)

__all__ = ["GROUPS", "Blip3oBackbone", "build", "skeleton"]

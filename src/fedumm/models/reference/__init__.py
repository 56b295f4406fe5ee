"""The reference backbone (``backbone.kind=reference``): fedumm's own small UMM on ShapesWorld.

``backbone.path`` is a checkpoint folder or ``base`` (the shipped foundation model);
``backbone.preset=micro`` builds the random-weight micro configuration used by tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from fedumm.models.dtypes import DTYPES
from fedumm.models.kinds import register_backbone
from fedumm.models.placement import resolve_device
from fedumm.models.reference.backbone import (
    REFERENCE_GROUPS,
    SHIPPED_BASE,
    ReferenceBackbone,
    resolve_checkpoint,
)

if TYPE_CHECKING:
    from fedumm.config import BackboneConfig

PRESETS = ("micro",)


def build(cfg: BackboneConfig) -> ReferenceBackbone:
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ValueError(f"backbone.preset={cfg.preset!r}: the reference backbone has "
                             f"presets {list(PRESETS)}")
        from fedumm.models.reference.micro import micro_backbone

        bb = micro_backbone(0)
    else:
        bb = ReferenceBackbone.load(cfg.path)
    return bb.to(resolve_device(cfg.device), DTYPES[cfg.dtype])


def skeleton(cfg: BackboneConfig) -> tuple[nn.Module, tuple]:
    """The model and its adapter groups for ``fedumm backbone info`` (small: built for real)."""
    bb = build(cfg)
    return bb.model, bb.groups


register_backbone("reference", build, skeleton)

__all__ = ["PRESETS", "REFERENCE_GROUPS", "SHIPPED_BASE", "ReferenceBackbone", "build",
           "resolve_checkpoint"]

"""Backbone kinds by name (``backbone.kind``): entries of :data:`fedumm.registry.BACKBONES`.

A kind registers a builder (config -> backbone) and optionally a skeleton (config -> the model,
on the meta device where it is large, and its adapter groups, for ``fedumm backbone info``).
The built-in kinds register when their packages are imported; the registry imports them
(:mod:`fedumm.models.builtin`) the first time it is asked, so nothing here imports a backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from fedumm.models.groups import AdapterGroup
from fedumm.registry import BACKBONES

if TYPE_CHECKING:
    from fedumm.config import BackboneConfig
    from fedumm.models.protocol import Backbone

Builder = Callable[["BackboneConfig"], "Backbone"]
Skeleton = Callable[["BackboneConfig"], tuple[nn.Module, tuple[AdapterGroup, ...]]]


@dataclass(frozen=True)
class BackboneEntry:
    """What one kind registers: how to build it, and how to describe it without weights."""

    build: Builder
    skeleton: Skeleton | None = None


def register_backbone(kind: str, builder: Builder, skeleton: Skeleton | None = None) -> None:
    """Make ``backbone.kind=<kind>`` build a backbone with ``builder(cfg.backbone)``.

    ``skeleton`` (optional) gives the model (on the meta device where it is large: no memory,
    no weights) and its adapter groups, for ``fedumm backbone info``. A kind taken by another
    entry is an error (the registry's rule for every kind of name)."""
    BACKBONES.register(kind, BackboneEntry(builder, skeleton))


def backbone_kinds() -> list[str]:
    return BACKBONES.names()


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """The backbone ``cfg.kind`` names, built from ``cfg`` (path or preset, device, dtype)."""
    if cfg.kind not in BACKBONES:
        raise ValueError(f"backbone.kind={cfg.kind!r} is not registered; known kinds: "
                         f"{BACKBONES.names()}")
    return BACKBONES.get(cfg.kind).build(cfg)


def backbone_skeleton(cfg: BackboneConfig) -> tuple[nn.Module, tuple[AdapterGroup, ...]]:
    entry = BACKBONES.get(cfg.kind) if cfg.kind in BACKBONES else None
    if entry is None or entry.skeleton is None:
        raise ValueError(f"backbone.kind={cfg.kind!r} cannot be described without weights")
    return entry.skeleton(cfg)


def check_trainable_preset(kind: str, preset: str, presets: Sequence[str]) -> None:
    """A preset name a backbone knows, and one small enough to train (the published sizes
    have random weights: they are for `fedumm backbone info`)."""
    if preset not in presets:
        raise ValueError(f"backbone.preset={preset!r}: the {kind} backbone has presets "
                         f"{list(presets)}")
    if preset != "tiny":
        raise ValueError(f"backbone.preset={preset!r} has real dimensions and random weights: "
                         "use it with `fedumm backbone info`; train with backbone.preset=tiny "
                         "or a checkpoint in backbone.path")

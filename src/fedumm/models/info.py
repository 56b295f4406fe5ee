"""``fedumm backbone info``: parameter counts and per-round traffic of a backbone, from its
architecture alone (the model is built on the meta device where it is large: no memory, no
weights), so the adapter-vs-full-model traffic of a real model is known without downloading it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from torch import nn

from fedumm.models.dtypes import DTYPES
from fedumm.models.groups import AdapterGroup
from fedumm.models.kinds import backbone_skeleton

if TYPE_CHECKING:
    from fedumm.config import BackboneConfig


def lora_parameters(module: nn.Module, r: int) -> int:
    """Parameters PEFT's LoRA adds to one module: A (r x in) + B (out x r)."""
    if isinstance(module, nn.Linear):
        return r * (module.in_features + module.out_features)
    if isinstance(module, nn.Embedding):
        return r * (module.num_embeddings + module.embedding_dim)
    raise TypeError(f"LoRA target of type {type(module).__name__} is not counted here")


def adapter_parameters(model: nn.Module, groups: tuple[AdapterGroup, ...], r: int,
                       names: list[str] | None = None) -> dict[str, int]:
    """Trainable adapter parameters per group for LoRA rank ``r`` (what a client sends)."""
    modules = dict(model.named_modules())
    out = {}
    for g in groups:
        if names is not None and g.name not in names:
            continue
        n = 0
        if g.target is not None:
            n += sum(lora_parameters(m, r) for name, m in modules.items()
                     if re.fullmatch(g.target, name))
        for name in g.modules_to_save:
            hits = [m for path, m in modules.items() if path.split(".")[-1] == name]
            n += sum(p.numel() for m in hits for p in m.parameters())
        for name, ids in g.trainable_tokens:
            hits = [m for path, m in modules.items()
                    if path.split(".")[-1] == name and isinstance(m, nn.Embedding)]
            n += sum(len(ids) * m.embedding_dim for m in hits)
        out[g.name] = n
    return out


def backbone_info(cfg: BackboneConfig, r: int = 16, groups: list[str] | None = None
                  ) -> dict[str, Any]:
    """The ``backbone info --json`` record (bytes are tensor bytes; a payload adds a header of
    a few kB for the tensor names)."""
    model, all_groups = backbone_skeleton(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    adapters = adapter_parameters(model, all_groups, r, groups)
    n_adapters = sum(adapters.values())
    dtypes = {name: dt.itemsize for name, dt in DTYPES.items()}
    return {
        "kind": cfg.kind, "preset": cfg.preset, "path": "" if cfg.preset else cfg.path,
        "params_total": total, "lora_r": r,
        "adapter_params": adapters, "adapter_params_total": n_adapters,
        "adapter_bytes_per_round": {d: n_adapters * size for d, size in dtypes.items()},
        "adapter_bytes_per_group": {g: {d: n * size for d, size in dtypes.items()}
                                    for g, n in adapters.items()},
        "full_model_bytes": {d: total * size for d, size in dtypes.items()},
        "full_over_adapter": round(total / n_adapters, 1) if n_adapters else None,
    }

"""Per-modality LoRA adapter groups on the reference UMM, through PEFT.

Groups (each switchable, extractable and loadable on its own):

* ``vision``     LoRA on the SigLIP encoder's attention / MLP and on the aligner
* ``language``   LoRA on the decoder's attention and MLP projections
* ``generation`` LoRA on the image-code embedding and head
* ``alignment``  a trainable copy of the alignment tokens (PEFT ``modules_to_save``)
"""

from __future__ import annotations

import re

import torch
from torch import nn

GROUPS = ("vision", "language", "generation", "alignment")
_TARGETS = {
    "vision": r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
              r"|aligner\.fc[12]",
    "language": r"language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
    "generation": r"gen_embed|gen_head",
}
_GROUP_OF_KEY = (
    ("vision", re.compile(r"(^|\.)(vision_model|aligner)\.")),
    ("language", re.compile(r"(^|\.)language_model\.")),
    ("generation", re.compile(r"(^|\.)gen_(embed|head)\.")),
    ("alignment", re.compile(r"(^|\.)alignment\.")),
)


def check_groups(groups: list[str] | tuple[str, ...]) -> list[str]:
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise ValueError(f"lora.groups: expected a non-empty subset of {list(GROUPS)}, got "
                         f"{list(groups)}")
    return [g for g in GROUPS if g in groups]


def group_of(key: str) -> str:
    """The adapter group an adapter tensor name belongs to."""
    for group, pattern in _GROUP_OF_KEY:
        if pattern.search(key):
            return group
    raise KeyError(f"adapter tensor {key!r} belongs to no adapter group")


def target_regex(groups: list[str]) -> str | None:
    parts = [f"(?:{_TARGETS[g]})" for g in groups if g in _TARGETS]
    return rf"^(?:{'|'.join(parts)})$" if parts else None


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights, named as in the plain model, whether or not PEFT wraps it."""
    base = model
    if hasattr(model, "get_base_model"):
        base = model.get_base_model()
    out = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out


class LoraAdapters:
    """PEFT LoRA on a backbone's model, with per-group access to the adapter tensors.

    Tensor names are those of ``peft.get_peft_model_state_dict`` (what PEFT saves), so a
    group's state can go on the wire and come back into any other client's adapters.
    """

    def __init__(self, backbone, r: int = 16, alpha: int = 32, groups=GROUPS,
                 dropout: float = 0.0, seed: int = 0) -> None:
        from peft import LoraConfig, get_peft_model

        self.groups = check_groups(list(groups))
        regex = target_regex(self.groups)
        if regex is None and "alignment" not in self.groups:
            raise ValueError("no adapter targets selected")
        self.peft_config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout,
            target_modules=regex if regex is not None else [],
            modules_to_save=["alignment"] if "alignment" in self.groups else None,
        )
        torch.manual_seed(seed)  # LoRA A matrices are drawn at random: same seed, same start
        self.backbone = backbone
        self.model = get_peft_model(backbone.model, self.peft_config)
        self.params: dict[str, nn.Parameter] = {}
        for name, p in self.model.named_parameters():
            if "lora_" in name or ".modules_to_save." in name:
                key = name.replace(".default", "").replace(".modules_to_save", "")
                self.params[key] = p
        self.set_trainable(self.groups)

    def keys(self, group: str | None = None) -> list[str]:
        return [k for k in self.params if group is None or group_of(k) == group]

    def state(self, groups=None) -> dict[str, torch.Tensor]:
        """Copies of the adapter tensors of ``groups`` (all groups by default)."""
        groups = self.groups if groups is None else groups
        return {k: p.detach().clone() for k, p in self.params.items() if group_of(k) in groups}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set adapter tensors in place (a subset of groups is fine); names must be known."""
        unknown = sorted(set(state) - set(self.params))
        if unknown:
            more = " ..." if len(unknown) > 3 else ""
            raise KeyError(f"unknown adapter tensors: {unknown[:3]}{more}")
        with torch.no_grad():
            for k, v in state.items():
                want = tuple(self.params[k].shape)
                if tuple(v.shape) != want:
                    raise ValueError(f"{k}: shape {tuple(v.shape)}, expected {want}")
                self.params[k].copy_(v)

    def set_trainable(self, groups) -> None:
        """Only the adapter tensors of ``groups`` receive gradients; the backbone is frozen."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for k, p in self.params.items():
            p.requires_grad_(group_of(k) in groups)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.params.values() if p.requires_grad]

    def num_parameters(self) -> dict[str, int]:
        out = {g: sum(self.params[k].numel() for k in self.keys(g)) for g in self.groups}
        out["total_adapters"] = sum(out.values())
        out["model"] = sum(t.numel() for t in base_state_dict(self.model).values())
        return out

    def export(self, path) -> None:
        """A PEFT-loadable folder: ``adapter_config.json`` + ``adapter_model.safetensors``."""
        self.model.save_pretrained(str(path))

"""Per-group LoRA adapters on any backbone's declared adapter groups, through PEFT.

Each group a backbone declares (:class:`~fedumm.models.groups.AdapterGroup`) is switchable,
extractable and loadable on its own: LoRA on the modules its target regex matches, plus full
trainable copies of its ``modules_to_save`` (PEFT's mechanism for e.g. alignment tokens).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedumm.models.checksums import check_tensor_file
from fedumm.models.groups import AdapterLayout

if TYPE_CHECKING:
    from fedumm.config import LoraSettings

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's
RESIDUAL_FILE = "base_residual.safetensors"  # beside the adapters: exact aggregation's residual


def _is_adapter(name: str) -> bool:
    return "lora_" in name or ".modules_to_save." in name or "trainable_tokens_delta" in name


def target_regex(groups) -> str | None:
    """One PEFT target regex for the LoRA targets of ``groups`` (None when none has one)."""
    parts = [f"(?:{g.target})" for g in groups if g.target is not None]
    return rf"^(?:{'|'.join(parts)})$" if parts else None


class LoraAdapters:
    """PEFT LoRA on a backbone's model, with per-group access to the adapter tensors.

    Tensor names are those of ``peft.get_peft_model_state_dict`` (what PEFT saves), so a
    group's state can go on the wire and come back into any other client's adapters.
    """

    def __init__(self, backbone, r: int = 16, alpha: int = 32, groups=None,
                 dropout: float = 0.0, seed: int = 0) -> None:
        from peft import LoraConfig, get_peft_model

        self.layout = AdapterLayout(backbone.groups)
        chosen = self.layout.select(list(groups) if groups is not None else self.layout.names)
        self.groups = [g.name for g in chosen]
        regex = target_regex(chosen)
        to_save = [m for g in chosen for m in g.modules_to_save]
        tokens = {name: list(ids) for g in chosen for name, ids in g.trainable_tokens}
        self.peft_config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout,
            target_modules=regex if regex is not None else [],
            modules_to_save=to_save or None, trainable_token_indices=tokens or None,
        )
        torch.manual_seed(seed)  # LoRA A matrices are drawn at random: same seed, same start
        self.backbone = backbone
        with warnings.catch_warnings():
            # PEFT probes transformers' deprecated ``is_gradient_checkpointing`` (not our call)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            self.model = get_peft_model(backbone.model, self.peft_config)
        self.params: dict[str, nn.Parameter] = {}
        for name, p in self.model.named_parameters():
            if _is_adapter(name):
                key = name.replace(".default", "").replace(".modules_to_save", "")
                self.params[key] = p
        self._group = {k: self.layout.group_of(k) for k in self.params}
        self._original: dict[str, torch.Tensor] = {}  # module -> its weight before any fold
        self.set_trainable(self.groups)

    @classmethod
    def from_config(cls, backbone, lora: LoraSettings, seed: int) -> LoraAdapters:
        """The adapters a run's ``lora`` settings describe, initialised from ``seed``."""
        return cls(backbone, lora.r, lora.alpha, lora.groups, lora.dropout, seed=seed)

    def group_of(self, key: str) -> str:
        return self._group[key]

    def keys(self, group: str | None = None) -> list[str]:
        return [k for k in self.params if group is None or self._group[k] == group]

    def state(self, groups=None) -> dict[str, torch.Tensor]:
        """CPU copies of the adapter tensors of ``groups`` (all groups by default)."""
        groups = self.groups if groups is None else groups
        return {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()
                if self._group[k] in groups}

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

    def fold_residuals(self, cumulative: dict[str, torch.Tensor]) -> None:
        """Make each adapted layer's frozen weight its original value plus
        ``cumulative[module]`` (exact LoRA aggregation folds the residual of the mean product
        there). The sum is taken from the original weight each time (in float32, kept on the
        CPU from the first fold on), so the weights after any sequence of calls are bit for bit
        those of one call with the last residuals: calling it again with the same residuals
        (another client on the same shared backbone) changes nothing, and a saved run folded
        once at load time has exactly the weights its final evaluation used."""
        with torch.no_grad():
            for module, residual in cumulative.items():
                weight = self.model.get_submodule(module).base_layer.weight
                if module not in self._original:
                    if not torch.count_nonzero(residual):
                        continue  # nothing folded yet, nothing to fold
                    self._original[module] = weight.detach().to("cpu", copy=True)
                if tuple(residual.shape) != tuple(weight.shape):
                    raise ValueError(f"{module}: residual of shape {tuple(residual.shape)}, "
                                     f"the weight is {tuple(weight.shape)}")
                total = self._original[module].to(weight.device, torch.float32) + \
                    residual.to(weight.device, torch.float32)
                weight.copy_(total.to(weight.dtype))

    def load_folder(self, folder: str | Path) -> dict[str, torch.Tensor]:
        """Load what :meth:`export` wrote (and, with exact aggregation, the residual saved
        beside it as ``base_residual.safetensors``, folded into the frozen weights). The
        tensors are read with PEFT's own reader; each file is checked first (an empty,
        truncated or non-finite file, a different LoRA rank or scale, or a missing adapter
        tensor is a ValueError naming the folder). Returns the residual (empty without one)."""
        from peft.utils import load_peft_weights
        from safetensors.torch import load_file

        folder = Path(folder)
        check_tensor_file(folder / ADAPTER_WEIGHTS)  # before PEFT reads it: named errors
        try:
            saved = json.loads((folder / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder / ADAPTER_CONFIG} cannot be read ({exc})") from None
        want = {"r": self.peft_config.r, "lora_alpha": self.peft_config.lora_alpha}
        got = {k: saved.get(k) for k in want}
        if got != want:
            raise ValueError(f"{folder}: adapters saved with {got}, the run's config says "
                             f"{want}")
        state = load_peft_weights(str(folder), device="cpu")
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS} lacks {len(missing)} adapter "
                             f"tensor(s), e.g. {missing[0]}")
        self.load_state(state)
        residual: dict[str, torch.Tensor] = {}
        if (folder / RESIDUAL_FILE).is_file():
            check_tensor_file(folder / RESIDUAL_FILE)
            residual = load_file(str(folder / RESIDUAL_FILE))
            known = set(self.adapted_modules())
            unknown = [m for m in residual if m not in known]
            if unknown:
                raise ValueError(f"{folder / RESIDUAL_FILE}: {unknown[0]} is not an adapted "
                                 "module of this backbone")
            self.fold_residuals(residual)
        return residual

    def adapted_modules(self) -> list[str]:
        """The names of the modules LoRA adapts (those a residual may be folded into)."""
        from peft.tuners.lora import LoraLayer

        return [name for name, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def merge_and_unload(self) -> nn.Module:
        """The backbone's model with the adapters merged into its weights by PEFT's
        ``merge_and_unload`` (``W + scaling * B A`` per LoRA module, the trained copies of
        ``modules_to_save`` and trainable tokens in place of the originals); a residual folded
        before stays in the base weights. The backbone's ``model`` becomes this plain model
        (no PEFT wrapper); these adapters cannot be used afterwards."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            merged = self.model.merge_and_unload()
        self.backbone.model = merged
        self.params, self._group, self._original = {}, {}, {}
        return merged

    def set_trainable(self, groups) -> None:
        """Only the adapter tensors of ``groups`` receive gradients; the backbone is frozen."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for k, p in self.params.items():
            p.requires_grad_(self._group[k] in groups)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.params.values() if p.requires_grad]

    def num_parameters(self) -> dict[str, int]:
        out = {g: sum(self.params[k].numel() for k in self.keys(g)) for g in self.groups}
        out["total_adapters"] = sum(out.values())
        base = self.model.get_base_model()  # parameters once each (tied weights too)
        out["model"] = sum(p.numel() for n, p in base.named_parameters() if not _is_adapter(n))
        return out

    def export(self, path) -> None:
        """A PEFT-loadable folder: ``adapter_config.json`` + ``adapter_model.safetensors``."""
        self.model.save_pretrained(str(path))

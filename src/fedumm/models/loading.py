"""Load a model for evaluation: a reference checkpoint (or ``base``), or a run directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedumm.models.checksums import check_finite, check_tensor_file
from fedumm.models.kinds import build_backbone
from fedumm.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapters
from fedumm.models.protocol import Backbone

if TYPE_CHECKING:
    from fedumm.config import Config

RUN_CONFIG, RUN_ADAPTERS = "config.yaml", "adapters"  # a run directory's (RunDirectory's) names


@dataclass
class RunModel:
    """A run's backbone with its saved adapters on it (PEFT, not merged) and, with exact
    aggregation, the saved residual folded into the frozen weights: the model its final
    evaluation scored."""

    cfg: Config
    backbone: Backbone
    adapters: LoraAdapters


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a run's saved adapters (``adapters/adapter_config.json``)."""
    return (Path(path) / RUN_ADAPTERS / ADAPTER_CONFIG).is_file()


def load_run_model(path: str | Path,
                   build_adapters: Callable[[Config, Backbone], LoraAdapters] | None = None
                   ) -> RunModel:
    """The backbone a run's ``config.yaml`` names, with the adapters of its ``adapters/``
    folder (:meth:`LoraAdapters.load_folder`: PEFT's reader, the residual folded). An empty,
    truncated or non-finite file is a ValueError naming it. ``build_adapters(cfg, backbone)``
    makes the adapters before they are loaded (default: from ``cfg.lora``; the runtime passes
    the builder its runs use, so a run is rebuilt as it was built)."""
    from fedumm.config import load_config

    path = Path(path)
    check_tensor_file(path / RUN_ADAPTERS / ADAPTER_WEIGHTS)  # before anything is built
    cfg = load_config(path / RUN_CONFIG)
    backbone = build_backbone(cfg.backbone)
    check_finite(dict(backbone.model.state_dict()), cfg.backbone.path, floats=False)
    adapters = build_adapters(cfg, backbone) if build_adapters else \
        LoraAdapters.from_config(backbone, cfg.lora, cfg.seed)
    adapters.load_folder(path / RUN_ADAPTERS)
    backbone.model.eval()
    return RunModel(cfg, backbone, adapters)


def load_for_eval(name: str | Path) -> Backbone:
    """A run directory -> its backbone (as its config says) with the run's global adapters
    and residual (:func:`load_run_model`); ``"base"`` or a folder -> that reference
    checkpoint. An empty, truncated or non-finite weights file is a ValueError naming it."""
    if is_run_folder(name):
        return load_run_model(name).backbone
    from fedumm.models.reference import ReferenceBackbone
    from fedumm.models.reference.backbone import resolve_checkpoint

    folder = resolve_checkpoint(name)
    for file in sorted(folder.glob("*.safetensors")):  # weights and codebook
        check_tensor_file(file)
    return ReferenceBackbone.load(name)

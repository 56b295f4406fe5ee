"""Load a model for evaluation: a reference checkpoint (or ``base``), or a run directory."""

from __future__ import annotations

from pathlib import Path

from fedumm.models.checksums import check_finite, check_tensor_file
from fedumm.models.kinds import build_backbone
from fedumm.models.protocol import Backbone

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file name


def load_for_eval(name: str | Path) -> Backbone:
    """A run directory -> its backbone (as its config says) with the run's global adapters
    (``adapters/``, PEFT format) merged in; ``"base"`` or a folder -> that reference
    checkpoint. An empty, truncated or non-finite weights file is a ValueError naming it."""
    path = Path(name)
    if (path / "adapters" / "adapter_config.json").is_file():
        from fedumm.config import load_config

        adapters = path / "adapters"
        check_tensor_file(adapters / ADAPTER_WEIGHTS)  # before PEFT reads it: named errors
        cfg = load_config(path / "config.yaml")
        backbone = build_backbone(cfg.backbone)
        check_finite(dict(backbone.model.state_dict()), cfg.backbone.path, floats=False)
        backbone.model = _merged(backbone.model, adapters)
        backbone.model.eval()
        return backbone
    from fedumm.models.reference import ReferenceBackbone
    from fedumm.models.reference.backbone import resolve_checkpoint

    folder = resolve_checkpoint(name)
    for file in sorted(folder.glob("*.safetensors")):  # weights and codebook
        check_tensor_file(file)
    return ReferenceBackbone.load(name)


def _merged(model, adapters: Path):
    """``model`` with the PEFT adapters of ``adapters`` merged in; a folder PEFT cannot load
    is a ValueError naming it."""
    from peft import PeftModel

    try:
        peft = PeftModel.from_pretrained(model, str(adapters))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # config or shapes mismatch
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(f"{adapters}: cannot load the PEFT adapters ({reason})") from None
    return peft.merge_and_unload()

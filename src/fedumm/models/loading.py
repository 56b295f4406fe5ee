"""Load a model for evaluation: a reference checkpoint (or ``base``), or a run directory."""

from __future__ import annotations

from pathlib import Path

from fedumm.models.kinds import build_backbone
from fedumm.models.protocol import Backbone


def load_for_eval(name: str | Path) -> Backbone:
    """A run directory -> its backbone (as its config says) with the run's global adapters
    (``adapters/``, PEFT format) merged in; ``"base"`` or a folder -> that reference
    checkpoint."""
    path = Path(name)
    if (path / "adapters" / "adapter_config.json").is_file():
        from peft import PeftModel

        from fedumm.config import load_config

        backbone = build_backbone(load_config(path / "config.yaml").backbone)
        peft = PeftModel.from_pretrained(backbone.model, str(path / "adapters"))
        backbone.model = peft.merge_and_unload()
        backbone.model.eval()
        return backbone
    from fedumm.models.reference import ReferenceBackbone

    return ReferenceBackbone.load(name)

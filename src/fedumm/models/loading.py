"""Load a model for evaluation: the shipped base, a checkpoint folder, or a run directory."""

from __future__ import annotations

from pathlib import Path

from fedumm.models.backbone import Backbone


def load_for_eval(name: str | Path) -> Backbone:
    """``"base"`` or a checkpoint folder -> that backbone; a run directory -> its backbone with
    the run's global adapters (``adapters/``, PEFT format) merged in."""
    path = Path(name)
    if (path / "adapters" / "adapter_config.json").is_file():
        from peft import PeftModel

        from fedumm.config import load_config

        backbone = Backbone.load(load_config(path / "config.yaml").model)
        peft = PeftModel.from_pretrained(backbone.model, str(path / "adapters"))
        backbone.model = peft.merge_and_unload()
        backbone.model.eval()
        return backbone
    return Backbone.load(name)

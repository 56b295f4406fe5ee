"""Janus-Pro (``backbone.kind=janus``) through transformers: ``backbone.path`` is a local folder
in the Hugging Face layout (:mod:`.checkpoint`); ``backbone.preset`` builds an architecture with
random weights instead: ``tiny`` (seconds on a CPU, with a small word-level tokenizer built in
code), ``janus-pro-1b`` and ``janus-pro-7b`` (the published dimensions, :mod:`.presets`).
The backbone itself is :mod:`.backbone`. Importing this package registers the kind."""

from fedumm.models.janus.assembly import BOI, EOI, IMAGE, tiny_processor
from fedumm.models.janus.backbone import JanusBackbone, janus_groups
from fedumm.models.janus.builder import build, skeleton
from fedumm.models.janus.checkpoint import check_folder
from fedumm.models.janus.presets import PRESETS, preset_config
from fedumm.models.kinds import register_backbone

register_backbone("janus", build, skeleton)

__all__ = ["BOI", "EOI", "IMAGE", "PRESETS", "JanusBackbone", "build", "check_folder",
           "janus_groups", "preset_config", "skeleton", "tiny_processor"]

"""Backbone kinds live on the registry: the protocol imports no backbone, and building by name
goes through BACKBONES (the layer rule itself is the import-linter contract in pyproject)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedumm.config import BackboneConfig
from fedumm.models.kinds import (
    BackboneEntry,
    backbone_kinds,
    backbone_skeleton,
    build_backbone,
    register_backbone,
)
from fedumm.registry import BACKBONES


def test_the_protocol_imports_no_backbone():
    code = ("import sys, fedumm.models.protocol; "
            "print([m for m in sys.modules if m.startswith(('fedumm.models.blip3o', "
            "'fedumm.models.janus', 'fedumm.models.reference', 'fedumm.fl', 'fedumm.eval'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_kinds_are_entries_of_the_registry():
    assert backbone_kinds() == BACKBONES.names() == ["blip3o", "janus", "reference"]
    entry = BACKBONES.get("janus")
    assert isinstance(entry, BackboneEntry) and entry.skeleton is not None
    with pytest.raises(ValueError, match="is not registered; known kinds"):
        build_backbone(BackboneConfig(kind="nope"))
    with pytest.raises(ValueError, match="cannot be described without weights"):
        backbone_skeleton(BackboneConfig(kind="nope"))


def test_a_users_kind_registers_and_builds_by_name():
    built = []

    def build(cfg):
        built.append(cfg.preset)
        return "a backbone"

    register_backbone("toy", build)
    try:
        assert "toy" in backbone_kinds()
        assert build_backbone(BackboneConfig(kind="toy", preset="p")) == "a backbone"
        assert built == ["p"]
        with pytest.raises(ValueError, match="without weights"):
            backbone_skeleton(BackboneConfig(kind="toy"))
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("toy", lambda cfg: None)
    finally:
        BACKBONES.unregister("toy")
    assert "toy" not in backbone_kinds()

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from fedumm.models.reference.backbone import SHIPPED_BASE, ReferenceBackbone
from fedumm.models.reference.pretrain import PretrainConfig


def test_shipped_base_matches_its_recorded_hashes_and_loads():
    sums = json.loads((SHIPPED_BASE / "SHA256SUMS.json").read_text())
    assert set(sums) >= {"model.safetensors", "config.json", "tokenizer.json",
                         "codebook.safetensors"}
    for name, digest in sums.items():
        assert hashlib.sha256((SHIPPED_BASE / name).read_bytes()).hexdigest() == digest, name
    total = sum((SHIPPED_BASE / n).stat().st_size for n in sums)
    assert total <= 15 * 2**20
    bb = ReferenceBackbone.load("base")  # also checks the weights against the recorded fingerprint
    info = json.loads((SHIPPED_BASE / "config.json").read_text())
    assert bb.fingerprint() == info["fingerprint"]
    assert info["pretrain"]["seed"] == 0 and info["steps_done"] == info["pretrain"]["steps"]
    # made by `fedumm pretrain` with today's recipe: a changed default needs a re-shipped base
    assert info["pretrain"] == asdict(PretrainConfig())

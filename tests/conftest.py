"""Shared fixtures. Tests run single-threaded: CI has 2 cores and pytest runs one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from fedumm.models.reference.micro import MICRO_IMAGE_SIZE, micro_backbone

torch.set_num_threads(1)

# Property tests (tests/properties): the same examples on every run (CI reproducible), no
# example database written into the checkout, and a deadline per example (a hang is a failure;
# generous, since a loaded 2-core machine took 6.4 s for one example that usually takes 0.1 s)
settings.register_profile("fedumm", derandomize=True, database=None, deadline=20000,
                          max_examples=40, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fedumm")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def geneval_metadata_path() -> Path:
    path = SHARED / "data" / "geneval" / "evaluation_metadata.jsonl"
    if not path.is_file():
        pytest.fail(f"the real GenEval file is expected at {path} (../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("micro") / "ck"
    micro_backbone(0).save(path)
    return path


@pytest.fixture()
def tiny_overrides(micro_checkpoint):
    """A federated run that takes seconds: micro model, few samples, 2 steps per client."""
    return [f"backbone.path={micro_checkpoint}", f"data.image_size={MICRO_IMAGE_SIZE}",
            "data.train_scenes=40", "data.val_scenes=6", "clients=2", "rounds=2",
            "train.max_steps=2", "train.batch_size=8", "eval.max_vqa=6", "eval.max_gen=3",
            "partition.alpha=1.0", "train.threads=1"]

"""Shared fixtures. Tests run single-threaded: CI has 2 cores and pytest runs one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def geneval_metadata_path() -> Path:
    path = SHARED / "data" / "geneval" / "evaluation_metadata.jsonl"
    if not path.is_file():
        pytest.fail(f"the real GenEval file is expected at {path} (../shared beside the repo)")
    return path

"""Shared helpers for the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

OUT = Path("runs/bench")


def run_config(config: str, out: Path, overrides: list[str], fresh: bool = True) -> dict:
    """Run ``fedumm run`` in a subprocess (so peak RSS is the run's own) and return its
    summary.json."""
    if fresh and out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "fedumm.cli", "run", config, *overrides, "--out", str(out),
           "--quiet"]
    subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


def save(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path

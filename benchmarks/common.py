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


def memory_k1_k16(config: str, name: str, overrides: list[str]) -> dict:
    """Peak RSS and client time per client-round of ``config`` with K=1 and K=16 clients (one
    frozen base, K adapter states), and the K=16 / K=1 peak RSS ratio."""
    rows: dict = {}
    for k in (1, 16):
        s = run_config(config, OUT / f"{name}_k{k}", [*overrides, f"clients={k}"])
        rows[f"k{k}"] = {"peak_rss_bytes": s["memory"]["peak_rss_bytes"],
                         "client_train_s_per_client_round": round(s["time"]["client_train_s"]
                                                                  / k, 3),
                         "wall_s": s["time"]["wall_s"]}
        print(k, rows[f"k{k}"], flush=True)
    rows["rss_ratio_k16_over_k1"] = round(rows["k16"]["peak_rss_bytes"]
                                          / rows["k1"]["peak_rss_bytes"], 3)
    return rows


def published_sizes(kind: str, presets: tuple[str, ...]) -> dict:
    """`fedumm backbone info` (r=16, meta device) of a backbone's published sizes."""
    from fedumm.config import BackboneConfig
    from fedumm.models.info import backbone_info

    out = {}
    for preset in presets:
        info = backbone_info(BackboneConfig(kind=kind, preset=preset), r=16)
        out[preset] = {k: info[k] for k in ("params_total", "adapter_params",
                                            "adapter_bytes_per_round", "full_model_bytes",
                                            "full_over_adapter")}
    return out

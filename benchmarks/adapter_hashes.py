"""Hashes of the adapters a set of runs ends with: the check that a refactor changes no number.

Runs 14 micro configs (the test suite's micro reference model, seconds each) covering every
strategy, the baselines, the LoRA modes, heterogeneous ranks, lossy and sparse codecs with
error feedback, modality scenarios, forked workers and secure aggregation with dropouts, and
optionally the quickstart at one thread; prints per run one SHA-256 over the exported adapter
tensors (sorted names, raw bytes) and the exact-aggregation residual where there is one, and one
over the logged numbers (per round: losses, quality, steps, bytes, aggregation errors,
rejections; evaluations; the summary's traffic). Run it before and after a change and compare
the two JSON files:

    .venv/bin/python benchmarks/adapter_hashes.py --out runs/bench/hashes_before.json
    .venv/bin/python benchmarks/adapter_hashes.py --out runs/bench/hashes_after.json [--quickstart]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = ["data.train_scenes=40", "data.val_scenes=6", "clients=3", "rounds=2",
        "train.max_steps=2", "train.batch_size=8", "eval.max_vqa=6", "eval.max_gen=3",
        "partition.alpha=1.0", "train.threads=1", "eval.every=1"]

MICRO: dict[str, list[str]] = {
    "fedavg": [],
    "fedumm": ["strategy.name=fedumm"],
    "fedprox_adaptive": ["strategy.name=fedprox", "strategy.mu=0.1", "train.adaptive_prox=true",
                         "train.adaptive_prox_skip=0"],
    "scaffold_sgd_partial": ["strategy.name=scaffold", "train.optimizer=sgd",
                             "strategy.fraction=0.6"],
    "fedadam_persistent": ["strategy.name=fedadam", "strategy.server_lr=0.01",
                           "train.persistent_optimizer=true"],
    "fedavgm_bf16": ["strategy.name=fedavgm", "codec=bfloat16"],
    "exact": ["lora.aggregation=exact"],
    "ffa": ["lora.aggregation=ffa"],
    "ranks_int8": ["lora.client_ranks=2,4,8", "lora.r=8", "codec=int8b"],
    "topk_ef": ["codec.upload=topk:0.1+int8+zlib", "codec.download=nf4"],
    "local_task_split": ["strategy.name=local", "partition.scenario=task_split"],
    "centralized": ["strategy.name=centralized"],
    "workers2_missing": ["workers=2", "partition.scenario=missing_modality",
                         "partition.missing_rate=0.5"],
    "secagg_dropout": ["secagg.enabled=true", "clients=4", "rounds=3", "faults.dropout=0.3",
                       "secagg.threshold=2", "strategy.name=fedadam", "strategy.server_lr=0.01"],
}

QUICKSTART = ["configs/quickstart.yaml", "train.threads=1"]


def adapter_hash(run: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((run / "adapters").glob("*.safetensors")):
        tensors = load_file(str(f))
        h.update(f.name.encode())
        for k in sorted(tensors):
            h.update(k.encode())
            h.update(tensors[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# the logged numbers that must not change either (times and memory left out)
ROUND_KEYS = ("clients", "num_samples", "train_loss", "quality", "steps", "upload_bytes",
              "aggregation_error", "rejected")
EVAL_KEYS = ("vqa_accuracy", "geneval_overall", "generation_quality")


def numbers_hash(run: Path) -> str:
    """SHA-256 of the rounds' and evaluations' numbers and the summary's bytes."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        keys = ROUND_KEYS if m.get("type") == "round" else EVAL_KEYS
        rows.append({"type": m.get("type"), "round": m.get("round"),
                     **{k: m.get(k) for k in keys}})
    comm = json.loads((run / "summary.json").read_text())["communication"]
    blob = json.dumps([rows, comm], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run(args: list[str], out: Path) -> str:
    subprocess.run([sys.executable, "-m", "fedumm.cli", "run", *args, "--out", str(out),
                    "--quiet"], check=True)
    return f"{adapter_hash(out)} numbers {numbers_hash(out)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/adapter_hashes.json")
    ap.add_argument("--quickstart", action="store_true", help="also the quickstart (minutes)")
    ap.add_argument("--only", nargs="*", default=None, help="these micro configs only")
    a = ap.parse_args()
    from fedumm.models.reference.micro import MICRO_IMAGE_SIZE, micro_backbone

    hashes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "micro"
        micro_backbone(0).save(ck)
        cfg = Path(tmp) / "micro.yaml"
        cfg.write_text("name: micro\n")
        base = [str(cfg), f"backbone.path={ck}", f"data.image_size={MICRO_IMAGE_SIZE}", *TINY]
        for name, extra in MICRO.items():
            if a.only is not None and name not in a.only:
                continue
            hashes[name] = run([*base, *extra], Path(tmp) / name)
            print(f"{name:24s} {hashes[name]}", flush=True)
        if a.quickstart:
            hashes["quickstart"] = run(QUICKSTART, Path(tmp) / "quickstart")
            print(f"{'quickstart':24s} {hashes['quickstart']}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(hashes, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Why the pretraining recipe has a grounding loss: the same short pretraining with and without
it, VQA accuracy per family on held-out base-split questions.

    .venv/bin/python benchmarks/pretrain_ablation.py --steps 1300
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from common import OUT, save

from fedumm.data.readers.shapes import generate_shapes, shapes_samples
from fedumm.eval.model_eval import evaluate_backbone
from fedumm.models.reference.backbone import ReferenceBackbone
from fedumm.models.reference.pretrain import PretrainConfig, pretrain


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1300)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    test = shapes_samples(generate_shapes("base", 300, seed=1, role="test"))
    rows = {}
    for name, weight in (("with_grounding", 1.0), ("without_grounding", 0.0)):
        cfg = PretrainConfig(steps=args.steps, ground_weight=weight, max_minutes=60)
        t = time.perf_counter()
        ckpt = pretrain(cfg, Path(OUT) / f"ablation_{name}", progress=False)
        res = evaluate_backbone(ReferenceBackbone.load(ckpt), test, max_vqa=600, max_gen=120)
        rows[name] = {"wall_s": round(time.perf_counter() - t, 1),
                      "vqa_accuracy": res["vqa_accuracy"], "vqa_by_family": res["vqa_by_family"],
                      "geneval_overall": res["geneval_overall"]}
        print(name, rows[name], flush=True)
    print(f"saved {save('pretrain_ablation', {'steps': args.steps, **rows})}")


if __name__ == "__main__":
    main()

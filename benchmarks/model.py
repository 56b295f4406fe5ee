"""The reference UMM: accuracy of the shipped base, LoRA throughput, adapter sizes, and the
gain of centralised LoRA fine-tuning on the downstream split.

Targets: base on base-split held-out data VQA >= 85 and GenEval >= 0.6; on the downstream
split centralised LoRA fine-tuning (<= 10 minutes) adds >= 20 VQA points and >= 0.2 GenEval.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from common import OUT, run_config, save

from fedumm.config import TrainConfig, load_config
from fedumm.data.readers import read_samples
from fedumm.data.readers.shapes import generate_shapes, shapes_samples
from fedumm.eval.model_eval import evaluate_backbone, heldout_quality
from fedumm.fl.client import ClientTrainer, make_client_data
from fedumm.models.lora import LoraAdapters
from fedumm.models.reference import ReferenceBackbone as Backbone


def throughput(bb: Backbone, steps: int = 15) -> float:
    """LoRA training samples/s at batch 32 (half VQA, half text-to-image samples)."""
    ad = LoraAdapters(bb, seed=0)
    data = shapes_samples(generate_shapes("downstream", 200, seed=0))
    bb.prepare(data)
    n = len(data)
    client = make_client_data(0, data, np.arange(n), np.zeros(n, np.int8), 0.0, 0)
    trainer = ClientTrainer(ad, TrainConfig(batch_size=32, max_steps=steps), 1, 0,
                            heldout_quality)
    trainer.train(client, ad.state(), 0)  # warm-up
    t = time.perf_counter()
    upd, _ = trainer.train(client, ad.state(), 1)
    return upd.num_steps * 32 / (time.perf_counter() - t)


def finetune_gain(bb: Backbone, seeds: list[int]) -> dict:
    """Centralised LoRA fine-tuning from the shipped base ``bb``, once per training seed (the
    data and the held-out set stay fixed), against the frozen base on the same samples."""
    cfg = load_config("configs/centralized_ft.yaml")
    base_down = evaluate_backbone(bb, read_samples(cfg.data, "val"), max_vqa=0,
                                  max_gen=cfg.eval.max_gen)
    runs = {seed: run_config("configs/centralized_ft.yaml", OUT / f"centralized_ft_s{seed}",
                             [f"seed={seed}"]) for seed in seeds}
    frozen_vqa = next(iter(runs.values()))["base"]["vqa_accuracy"]
    frozen_gen = base_down.get("geneval_overall")
    per_seed = {seed: {"finetuned_vqa": s["final"]["vqa_accuracy"],
                       "finetuned_geneval": s["final"]["geneval_overall"],
                       "geneval_by_task": s["final"]["geneval_by_task"],
                       "finetune_wall_s": s["time"]["wall_s"]} for seed, s in runs.items()}
    mean = lambda key: float(np.mean([r[key] for r in per_seed.values()]))  # noqa: E731
    return {"frozen_base_vqa": frozen_vqa, "frozen_base_geneval": frozen_gen,
            "per_seed": per_seed,
            "mean_vqa_gain": round(mean("finetuned_vqa") - frozen_vqa, 2),
            "mean_geneval_gain": round(mean("finetuned_geneval") - frozen_gen, 4)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--seeds", default="0", help="fine-tuning seeds, e.g. 0,1 (about 9 min each)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    bb = Backbone.load("base")
    rows: dict = {"params": LoraAdapters(Backbone.load("base"), seed=0).num_parameters()}
    rows["lora_train_samples_per_s"] = throughput(Backbone.load("base"))
    test = shapes_samples(generate_shapes("base", 300, seed=1, role="test"))
    t = time.perf_counter()
    rows["base_on_base"] = evaluate_backbone(bb, test, max_vqa=600, max_gen=240)
    rows["base_on_base"].pop("vqa_by_question_type", None)
    rows["eval_s"] = time.perf_counter() - t
    if not args.skip_finetune:
        rows["downstream"] = finetune_gain(bb, [int(s) for s in args.seeds.split(",")])
    for k, v in rows.items():
        print(f"{k}: {v}")
    print(f"saved {save('model', rows)}")


if __name__ == "__main__":
    main()

"""BLIP3o-style backbone: tiny preset on the CPU (step time per understanding and generation
batch, peak RSS K=16 vs K=1 clients), the coupling of understanding training to generation
(a language adapter moves the query hidden states that condition the DiT), and the adapter vs
full-model traffic of the published sizes (`fedumm backbone info`, meta device).

Goal: peak RSS(K=16) / peak RSS(K=1) <= 1.3.
"""

from __future__ import annotations

import time

import torch
from common import memory_k1_k16, published_sizes, save

from fedumm.config import BackboneConfig
from fedumm.data.readers.shapes import generate_shapes, shapes_samples
from fedumm.models.kinds import build_backbone
from fedumm.models.lora import LoraAdapters
from fedumm.models.protocol import GENERATION, UNDERSTANDING

TINY = ["backbone.device=cpu", "rounds=1", "data.train_scenes=160", "data.val_scenes=10",
        "train.max_steps=4", "train.batch_size=8", "eval.every=0", "eval.base=false",
        "eval.max_vqa=10", "eval.max_gen=2", "partition.method=iid", "train.threads=2"]


def tiny():
    return build_backbone(BackboneConfig(kind="blip3o", preset="tiny", device="cpu"))


def step_times(und, gen, steps: int = 10) -> dict:
    bb = tiny()
    ad = LoraAdapters(bb, r=8, alpha=16, seed=0)
    opt = torch.optim.AdamW(ad.trainable_parameters(), lr=1e-3)
    out = {}
    for name, batch in (("understanding", und), ("generation", gen)):
        times = []
        for i in range(steps + 2):
            t = time.perf_counter()
            collated = bb.collate(batch)
            loss = sum(bb.loss(collated).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 2:  # the first steps warm up allocators
                times.append(time.perf_counter() - t)
        out[f"{name}_s_per_step_batch8"] = round(sorted(times)[len(times) // 2], 4)
    return out


def _ratio(bb, gen_val) -> float:
    """Held-out flow-matching loss over that of predicting zero velocity (1 - quality,
    unclipped)."""
    g = bb.collate(gen_val).parts[GENERATION]
    gen = torch.Generator().manual_seed(0)
    num = den = 0.0
    for sigma in (0.1, 0.3, 0.5, 0.7, 0.9):
        noise = torch.randn(g["x0"].shape, generator=gen)
        lo, z = bb._flow_loss(g, torch.full((len(g["x0"]),), sigma), noise)
        num, den = num + float(lo.mean()), den + float(z.mean())
    return num / den


def _train(bb, ad, groups, samples, modality, steps, lr) -> None:
    ad.set_trainable(groups)
    opt = torch.optim.AdamW([ad.params[k] for g in groups for k in ad.keys(g)], lr=lr)
    batch = bb.collate(samples)
    for i in range(steps):
        torch.manual_seed(i)
        loss = bb.loss(batch)[modality]
        opt.zero_grad()
        loss.backward()
        opt.step()


def coupling(und, gen, gen_val, steps: int = 30) -> dict:
    """First train generation (DiT, queries and the language adapter) on prompts, then train
    on understanding only and watch the generation side: the DiT condition (query hidden
    states) and the held-out flow-matching loss ratio L / L0 (lower is better), with and
    without the language group in the understanding phase."""
    out = {}
    for und_groups in (["vision", "language"], ["vision"]):
        bb = tiny()
        bb.generation_trains_language = True  # the language adapter learns generation too
        ad = LoraAdapters(bb, r=8, alpha=16, seed=0)
        _train(bb, ad, ["generation", "alignment", "language"], gen, GENERATION, 60, 3e-3)
        g = bb.collate(gen_val).parts[GENERATION]
        with torch.no_grad():
            before = bb._condition(g["input_ids"], g["attention_mask"], g["keep"])
            r0 = _ratio(bb, gen_val)
        _train(bb, ad, und_groups, und, UNDERSTANDING, steps, 3e-3)
        with torch.no_grad():
            after = bb._condition(g["input_ids"], g["attention_mask"], g["keep"])
            r1 = _ratio(bb, gen_val)
        out["understanding trains " + "+".join(und_groups)] = {
            "condition_relative_change": round(float((after - before).norm() / before.norm()),
                                               4),
            "heldout_flow_loss_ratio_before": round(r0, 4),
            "heldout_flow_loss_ratio_after": round(r1, 4)}
    return out


def main() -> None:
    torch.set_num_threads(2)
    s = shapes_samples(generate_shapes("downstream", 40, seed=0, role="train", image_size=48))
    und = [x for x in s if x.task == UNDERSTANDING]
    gen = [x for x in s if x.task == GENERATION]
    rows: dict = {"tiny_cpu": step_times(und[:8], gen[:8])}
    print(rows, flush=True)
    rows["coupling_understanding_only_training"] = coupling(und[:16], gen[:16], gen[16:32])
    print(rows["coupling_understanding_only_training"], flush=True)
    rows["tiny_cpu"].update(memory_k1_k16("configs/blip3o_tiny.yaml", "blip3o_tiny", TINY))
    rows.update(published_sizes("blip3o", ("blip3o-4b", "blip3o-8b")))
    for k, v in rows.items():
        print(f"{k}: {v}")
    print(f"saved {save('blip3o', rows)}")


if __name__ == "__main__":
    main()

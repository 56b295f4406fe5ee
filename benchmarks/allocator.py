"""The parallel worker's fixed mmap threshold on a large backbone: LoRA training step time and
peak RSS with glibc's defaults against ``fix_mmap_threshold()`` (256 KiB).

The threshold was chosen on the reference model (docs/peers.md). On a billion-parameter
backbone a step allocates activations of several MB to hundreds of MB; with the fixed threshold
every one from 256 KiB up is mapped and zero-filled afresh, where glibc's defaults would reuse
heap memory. This measures what that costs.

Model: Janus-Pro-1B's language model at its published dims (a Llama decoder: hidden 2048,
intermediate 5632, 16 heads, vocabulary 102400, untied head), ``--layers`` of its 24 layers,
random weights; one sequence of ``--seq`` tokens (576 image tokens and a prompt); PEFT LoRA
r=16, alpha=32 on the attention and MLP projections (fedumm's ``language`` group); AdamW.
Each variant runs in a fresh process (warm-up steps first, so glibc's dynamic threshold has
risen as it would in a worker forked from a trained parent), alternating ``--repeat`` times.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("glibc_defaults", "fixed_256k")


def child(variant: str, layers: int, seq: int, steps: int, warmup: int, threads: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedumm.runtime.allocator import fix_mmap_threshold

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=102400, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    fixed = fix_mmap_threshold() if variant == "fixed_256k" else False
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"variant": variant, "threshold_fixed": fixed, "step_s": times,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=640)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.layers, a.seq, a.steps, a.warmup, a.threads)))
        return
    from common import save

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(a.repeat):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:  # ABBA: drift cancels
            out = subprocess.run(
                [sys.executable, __file__, "--child", v, *(f"--{k}={getattr(a, k)}" for k in
                                                         ("layers", "seq", "steps", "warmup",
                                                          "threads"))],
                capture_output=True, text=True, check=True).stdout
            runs[v].append(json.loads(out.strip().splitlines()[-1]))
            print(f"pass {r + 1} {v}: steps {[round(t, 2) for t in runs[v][-1]['step_s']]} s,"
                  f" peak RSS {runs[v][-1]['peak_rss_mib']:.0f} MiB", flush=True)
    rows = {v: {"median_step_s": statistics.median(t for x in runs[v] for t in x["step_s"]),
                "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in runs[v]),
                "losses": sorted({round(x["loss"], 6) for x in runs[v]})} for v in VARIANTS}
    base, fixed = rows["glibc_defaults"], rows["fixed_256k"]
    rows["ratio_fixed_over_defaults"] = {
        "step_time": fixed["median_step_s"] / base["median_step_s"],
        "peak_rss": fixed["peak_rss_mib"] / base["peak_rss_mib"]}
    rows["setup"] = vars(a) | {"runs": runs}
    for k in (*VARIANTS, "ratio_fixed_over_defaults"):
        print(f"{k}: {rows[k]}")
    print(f"saved {save('allocator', rows)}")


if __name__ == "__main__":
    main()

"""Backbones: Janus tiny memory with K=16 vs K=1 clients (one frozen base, K adapter states),
time per client-round, and the adapter vs full-model traffic of the published Janus-Pro sizes
(`fedumm backbone info`, meta device).

Goal: peak RSS(K=16) / peak RSS(K=1) <= 1.3.
"""

from __future__ import annotations

from common import memory_k1_k16, published_sizes, save

TINY = ["backbone.device=cpu", "rounds=1", "data.train_scenes=160", "data.val_scenes=10",
        "train.max_steps=4", "train.batch_size=8", "eval.every=0", "eval.base=false",
        "eval.max_vqa=10", "eval.max_gen=2", "partition.method=iid", "train.threads=2"]


def main() -> None:
    rows: dict = {"janus_tiny": memory_k1_k16("configs/janus_tiny.yaml", "janus_tiny", TINY)}
    rows.update(published_sizes("janus", ("janus-pro-1b", "janus-pro-7b")))
    for k, v in rows.items():
        print(f"{k}: {v}")
    print(f"saved {save('backbones', rows)}")


if __name__ == "__main__":
    main()

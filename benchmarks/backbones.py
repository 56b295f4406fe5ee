"""Backbones: Janus tiny memory with K=16 vs K=1 clients (one frozen base, K adapter states),
time per client-round, and the adapter vs full-model traffic of the published Janus-Pro sizes
(`fedumm backbone info`, meta device).

Goal: peak RSS(K=16) / peak RSS(K=1) <= 1.3.
"""

from __future__ import annotations

from common import OUT, run_config, save

from fedumm.config import BackboneConfig
from fedumm.models.info import backbone_info

TINY = ["backbone.device=cpu", "rounds=1", "data.train_scenes=160", "data.val_scenes=10",
        "train.max_steps=4", "train.batch_size=8", "eval.every=0", "eval.max_vqa=10",
        "eval.max_gen=2", "partition.method=iid", "train.threads=2"]


def main() -> None:
    rows: dict = {"janus_tiny": {}}
    for k in (1, 16):
        s = run_config("configs/janus_tiny.yaml", OUT / f"janus_tiny_k{k}",
                       [*TINY, f"clients={k}"])
        rows["janus_tiny"][f"k{k}"] = {
            "peak_rss_bytes": s["memory"]["peak_rss_bytes"],
            "client_train_s_per_client_round": round(s["time"]["client_train_s"] / k, 3),
            "wall_s": s["time"]["wall_s"]}
        print(k, rows["janus_tiny"][f"k{k}"], flush=True)
    t = rows["janus_tiny"]
    t["rss_ratio_k16_over_k1"] = round(t["k16"]["peak_rss_bytes"] / t["k1"]["peak_rss_bytes"], 3)
    for preset in ("janus-pro-1b", "janus-pro-7b"):
        info = backbone_info(BackboneConfig(kind="janus", preset=preset), r=16)
        rows[preset] = {k: info[k] for k in ("params_total", "adapter_params",
                                             "adapter_bytes_per_round", "full_model_bytes",
                                             "full_over_adapter")}
    for k, v in rows.items():
        print(f"{k}: {v}")
    print(f"saved {save('backbones', rows)}")


if __name__ == "__main__":
    main()

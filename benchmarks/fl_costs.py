"""Costs of the local runtime, each measured in one run on this machine.

* peak RSS of a K=16 run vs a K=1 run (target <= 1.3x: one backbone + K adapter states);
* orchestration overhead: wall time not spent in client training or evaluation (target <= 5%);
* upload bytes per client per round vs adapter parameters x dtype size (target within 2%) and
  vs full fine-tuning.
"""

from __future__ import annotations

from common import OUT, run_config, save

CONFIG = "configs/quickstart.yaml"
COMMON = ["rounds=2", "train.max_steps=4", "eval.every=0", "eval.base=false", "eval.max_gen=8",
          "eval.max_vqa=50"]


def main() -> None:
    k1 = run_config(CONFIG, OUT / "rss_k1", [*COMMON, "clients=1"])
    k16 = run_config(CONFIG, OUT / "rss_k16", [*COMMON, "clients=16"])
    rss_ratio = k16["memory"]["peak_rss_bytes"] / k1["memory"]["peak_rss_bytes"]

    q = run_config(CONFIG, OUT / "overhead", ["eval.every=0", "eval.base=false"])
    t = q["time"]
    overhead = t["wall_s"] - t["client_train_s"] - t["eval_s"]

    comm = q["communication"]
    numel = q["adapters"]["total_adapters"]
    payload_ratio = comm["upload_bytes_per_client_round"] / (numel * 4)
    rows = {
        "peak_rss_k1_mib": k1["memory"]["peak_rss_bytes"] / 2**20,
        "peak_rss_k16_mib": k16["memory"]["peak_rss_bytes"] / 2**20,
        "peak_rss_ratio_k16_vs_k1": rss_ratio,
        "wall_s": t["wall_s"], "client_train_s": t["client_train_s"], "eval_s": t["eval_s"],
        "orchestration_overhead_fraction": overhead / t["wall_s"],
        "upload_bytes_per_client_round": comm["upload_bytes_per_client_round"],
        "adapter_params_x4_bytes": numel * 4,
        "upload_vs_params_ratio": payload_ratio,
        "full_model_bytes": comm["full_model_bytes"],
        "reduction_vs_full": comm["reduction_vs_full"],
    }
    for k, v in rows.items():
        print(f"{k:34s} {v:.4f}" if isinstance(v, float) else f"{k:34s} {v}")
    print(f"saved {save('fl_costs', rows)}")


if __name__ == "__main__":
    main()

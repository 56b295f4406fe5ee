"""FedAvg accuracy across clients x Dirichlet alpha vs the centralized baseline (same total
local steps), on the downstream split. Target: K=16, alpha=0.1 keeps >= 95% of centralized VQA.
"""

from __future__ import annotations

import argparse

from common import OUT, run_config, save

CONFIG = "configs/quickstart.yaml"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", default="4,16")
    p.add_argument("--alphas", default="0.1,0.5,1.0")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    common = [f"rounds={args.rounds}", "eval.every=0"]
    central = run_config(CONFIG, OUT / "acc_central", [*common, "strategy.name=centralized"])
    c_vqa = central["final"]["vqa_accuracy"]
    table = {"centralized": {"vqa": c_vqa, "geneval": central["final"]["geneval_overall"],
                             "base_vqa": central["base"].get("vqa_accuracy")}}
    print(f"centralized: VQA {c_vqa}  GenEval {central['final']['geneval_overall']}")
    for k in [int(x) for x in args.clients.split(",")]:
        for a in [float(x) for x in args.alphas.split(",")]:
            s = run_config(CONFIG, OUT / f"acc_k{k}_a{a}", [*common, f"clients={k}",
                                                           f"partition.alpha={a}"])
            v = s["final"]["vqa_accuracy"]
            table[f"K={k},alpha={a}"] = {"vqa": v, "geneval": s["final"]["geneval_overall"],
                                         "retention": round(100 * v / c_vqa, 1),
                                         "wall_s": s["time"]["wall_s"]}
            print(f"K={k:2d} alpha={a:<4} VQA {v:6.2f} ({100 * v / c_vqa:5.1f}% of centralized) "
                  f"GenEval {s['final']['geneval_overall']}")
    print(f"saved {save('fl_accuracy', table)}")


if __name__ == "__main__":
    main()

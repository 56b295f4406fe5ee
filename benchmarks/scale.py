"""Populations of 10 to 100,000 clients: time per round, setup, peak RSS, client-state disk.

The quickstart (reference backbone, shipped base) with 10 clients per round, 3 rounds, for
FedAvg and SCAFFOLD at each population size K. Every K trains on the same data, the smallest
that gives each of the largest population's clients one sample (``partition.min_per_client=1``,
IID; understanding samples only, four questions per scene), and every selected client does
the same work (one local step on one sample, no local held-out part): a client of K=10 holds
10,000 samples and one of K=100,000 one, and with two modalities or larger batches they would
train different adapter groups on different batches. So the numbers show what grows with K
and nothing else. Each (strategy, K) runs in a fresh process, so its peak RSS is its own.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py --out runs/bench/scale.json
    .venv/bin/python benchmarks/scale.py --clients 10,1000 --strategies fedavg   # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def overrides(k: int, strategy: str, scenes: int) -> list[str]:
    return [f"clients={k}", "rounds=3", f"strategy.name={strategy}",
            "strategy.clients_per_round=10", f"data.train_scenes={scenes}",
            "data.val_scenes=20", "data.generation_fraction=0", "data.questions_per_image=4",
            "partition.method=iid", "partition.min_per_client=1",
            "train.val_fraction=0", "train.max_steps=1", "train.batch_size=1",
            "train.threads=1", "eval.every=0", "eval.base=false", "eval.max_vqa=20",
            "eval.max_gen=0"]


def one(k: int, strategy: str, scenes: int) -> dict:
    """One run in this process (the child's side)."""
    import torch

    from fedumm.config import load_config
    from fedumm.runtime import experiment, local
    from fedumm.runtime.loop import RoundLoop

    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides(k, strategy, scenes))
    marks: list[float] = []
    times: dict[str, float] = {}
    split = experiment.split_clients

    def timed_split(*a, **kw):  # the population: partition, index, modality scenario
        t = time.perf_counter()
        out = split(*a, **kw)
        out.summary()
        times["population_s"] = time.perf_counter() - t
        return out

    experiment.split_clients = timed_split
    round_ = RoundLoop._round

    def timed_round(self, rnd, acc):
        marks.append(time.perf_counter())
        return round_(self, rnd, acc)

    RoundLoop._round = timed_round
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        runtime = local.LocalRuntime(cfg, Path(tmp) / "run", progress=False)
        setup = time.perf_counter() - t
        done = runtime.transport.training_done

        def training_done():
            marks.append(time.perf_counter())  # the last round's checkpoint is written
            done()

        runtime.transport.training_done = training_done
        runtime.run()
        disk = runtime.transport.store.disk_bytes()
        reads = runtime.transport.store.reads
    rounds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {"clients": k, "strategy": strategy, "setup_s": round(setup, 2),
            "population_s": round(times.get("population_s", 0.0), 2),
            "round_s": [round(r, 3) for r in rounds],
            "mean_round_s": round(sum(rounds) / len(rounds), 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "client_state_bytes": disk, "client_state_reads": reads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="10,1000,10000,100000")
    p.add_argument("--strategies", default="fedavg,scaffold")
    p.add_argument("--scenes", type=int, default=0,
                   help="training scenes (4 questions each); 0: enough for the largest K")
    p.add_argument("--out", default="")
    p.add_argument("--one", nargs=3, metavar=("K", "STRATEGY", "SCENES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], int(args.one[2]))))
        return
    ks = [int(x) for x in args.clients.split(",")]
    scenes = args.scenes or -(-max(ks) // 4)
    rows = []
    for strategy in args.strategies.split(","):
        for k in ks:
            out = subprocess.run([sys.executable, __file__, "--one", str(k), strategy,
                                  str(scenes)], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"scenes": scenes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

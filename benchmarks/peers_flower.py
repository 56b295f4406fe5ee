"""A fedumm experiment on Flower's simulation runtime (Ray backend): a peer for the benchmark
in ``peers.py``, not part of the package.

Flower's ServerApp runs a message-API FedAvg (``flwr.serverapp.strategy.FedAvg``); each
Flower ClientApp trains fedumm client ``partition-id`` for one round with fedumm's own
``ClientTrainer``, built the way the local runtime builds it (``load_backbone``,
``client_datasets``, ``build_adapters``). The adapter tensors travel as numpy arrays in an
``ArrayRecord``; a client returns ALL adapter tensors (the ones it did not train unchanged) with
its total sample count, and Flower's FedAvg averages them weighted by that count. fedumm's own
FedAvg averages per adapter group weighted by the samples of the modalities that train the
group (a client without generation samples leaves the generation adapters out), so the final
accuracy can differ slightly from fedumm's. The server evaluates once, after the last round,
with fedumm's ``evaluate_states``.

Each Ray actor builds the backbone and the client data once (cached per process) and trains
with one torch thread; Ray runs ``--cpus`` clients at once (one CPU each).

    .venv/bin/python benchmarks/peers_flower.py configs/quickstart.yaml clients=4 eval.every=0 \
        eval.base=false --out runs/bench/peers/flower_k4 [--cpus 2] [--json]

Writes into ``--out``: ``config.yaml``, ``metrics.jsonl`` (one ``{"type": "round", ...}`` record
per round as it ends, with ``t_s`` since start, then the final ``eval`` record) and
``summary.json`` (``final``, ``time``). FedAvg with stateless clients only (no SCAFFOLD, no
persistent optimizer, no lossy codec): what the quickstart config uses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ENV_OUT = "FEDUMM_FLOWER_OUT"  # the run directory (holds config.yaml), for the Ray actors
ENV_AGG = "FEDUMM_FLOWER_AGGREGATE"  # flower (default) | fedumm
_SIDE: dict[str, Any] = {}  # per-process cache: backbone, data, adapters, trainer


def _config(out: str):
    from fedumm.config import load_config

    return load_config(Path(out) / "config.yaml")


def _client_side() -> dict[str, Any]:
    """Backbone, every client's data and a trainer, built once per Ray actor process."""
    if "client" not in _SIDE:
        import torch

        from fedumm.eval.model_eval import heldout_quality
        from fedumm.fl.client import ClientTrainer
        from fedumm.fl.lora_modes import LoraMode
        from fedumm.runtime.experiment import build_adapters, client_datasets, load_backbone

        torch.set_num_threads(1)  # one thread per Flower client process
        cfg = _config(os.environ[ENV_OUT])
        backbone = load_backbone(cfg)
        clients, _ = client_datasets(cfg, backbone)
        adapters = build_adapters(cfg, backbone)
        trainer = ClientTrainer(adapters, cfg.train, cfg.local_epochs, cfg.seed,
                                heldout_quality)
        hooks = LoraMode.from_config(cfg.lora).client_hooks(0)  # FFA's frozen A
        _SIDE["client"] = {"cfg": cfg, "clients": clients, "trainer": trainer, "hooks": hooks,
                           "pid": os.getpid()}
    return _SIDE["client"]


def _client_train(msg, context):
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    side = _client_side()
    k = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"]) - 1  # fedumm counts rounds from 0
    received = {n: t.clone() for n, t in msg.content["arrays"].to_torch_state_dict().items()}
    t = time.perf_counter()
    upd, _ = side["trainer"].train(side["clients"][k], received, rnd, side["hooks"], None)
    train_s = time.perf_counter() - t
    tensors = {**received, **{n: v.to(torch.float32) for n, v in upd.tensors.items()}}
    # Flower's FedAvg weight: the client's training samples (num_samples also counts the
    # understanding samples that hold their image, a subset, under a key of its own)
    metrics = MetricRecord({"num-examples": len(side["clients"][k].train),
                            "train_s": train_s, "steps": int(upd.num_steps),
                            "client": k, "pid": side["pid"],
                            **{f"n-{m}": int(n) for m, n in upd.num_samples.items()}})
    content = RecordDict({"arrays": ArrayRecord.from_torch_state_dict(tensors),
                          "metrics": metrics,
                          "trained": ConfigRecord({"keys": sorted(upd.tensors)})})
    return Message(content=content, reply_to=msg)


def _sum_train_metrics(records, weight_key: str):
    """Round metrics: client training seconds summed (not averaged) and the samples."""
    from flwr.app import MetricRecord

    ms = [r["metrics"] for r in records]
    return MetricRecord({"train_s": float(sum(m["train_s"] for m in ms)),
                         weight_key: int(sum(m[weight_key] for m in ms)),
                         "clients": len(ms)})


def _fedumm_weighted(base, fedumm_strategy, initial: dict):
    """Flower's FedAvg with its aggregation replaced by fedumm's strategy (per adapter group,
    weighted by the samples of the group's modalities): ``--aggregate fedumm``, a check that
    the Flower client side trains exactly what fedumm's runtimes train."""
    import torch
    from flwr.app import ArrayRecord

    from fedumm.fl.updates import ClientUpdate

    class FedummWeighted(base):
        current = dict(initial)

        def aggregate_train(self, server_round, replies):
            valid = [m for m in replies if not m.has_error()]
            updates = []
            for m in valid:
                met, arrays = m.content["metrics"], m.content["arrays"]
                keys = list(m.content["trained"]["keys"])
                counts = {n[2:]: int(v) for n, v in met.items() if n.startswith("n-")}
                updates.append(ClientUpdate(
                    int(met["client"]), {n: torch.from_numpy(arrays[n].numpy().copy())
                                         for n in keys}, counts, {}, int(met["steps"])))
            updates.sort(key=lambda u: u.client_id)  # fedumm's fixed aggregation order
            self.current = fedumm_strategy.aggregate(server_round - 1, self.current, updates)
            metrics = self.train_metrics_aggr_fn([m.content for m in valid],
                                                 self.weighted_by_key)
            return ArrayRecord.from_torch_state_dict(self.current), metrics

    return FedummWeighted


def _log(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _server_main(grid, context) -> None:
    import torch
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    from fedumm.data.readers import read_samples
    from fedumm.runtime.experiment import build_adapters, evaluate_states, load_backbone

    out = Path(os.environ[ENV_OUT])
    cfg = _config(str(out))
    t0 = float(os.environ["FEDUMM_FLOWER_T0"])
    torch.set_num_threads(cfg.train.threads or 1)
    backbone = load_backbone(cfg)
    adapters = build_adapters(cfg, backbone)
    val_data = read_samples(cfg.data, "val")
    k = cfg.clients
    cls = FedAvg
    if os.environ.get(ENV_AGG) == "fedumm":
        from fedumm.fl.strategies import build_strategy

        cls = _fedumm_weighted(FedAvg, build_strategy(cfg.strategy, k, cfg.seed,
                                                      backbone.groups), adapters.state())
    strategy = cls(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=k,
                   min_available_nodes=k, train_metrics_aggr_fn=_sum_train_metrics)
    acc = {"client_train_s": 0.0, "eval_s": 0.0}
    last = {"t": time.perf_counter()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord):
        if server_round == 0:  # the initial adapters: not evaluated (eval.every=0)
            return None
        now = time.perf_counter()
        rnd = server_round - 1
        _log(out, {"type": "round", "round": rnd, "t_s": round(time.time() - t0, 3),
                   "round_s": round(now - last["t"], 3)})
        last["t"] = now
        if server_round < cfg.rounds:
            return None
        state = {n: t.clone() for n, t in arrays.to_torch_state_dict().items()}
        t = time.perf_counter()
        final = evaluate_states(cfg, adapters, val_data, [state], True)
        acc["eval_s"] += time.perf_counter() - t
        _log(out, {"type": "eval", "round": rnd, **final})
        (out / "final.json").write_text(json.dumps(final))
        return MetricRecord({"vqa_accuracy": float(final["vqa_accuracy"])})

    initial = ArrayRecord.from_torch_state_dict(adapters.state())
    result = strategy.start(grid, initial, num_rounds=cfg.rounds, evaluate_fn=evaluate_fn)
    acc["client_train_s"] = float(sum(m["train_s"] for m in
                                      result.train_metrics_clientapp.values()))
    (out / "server_counters.json").write_text(json.dumps(acc))


def _apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    client_app, server_app = ClientApp(), ServerApp()
    client_app.train()(_client_train)
    server_app.main()(_server_main)
    return server_app, client_app


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use (1 per client)")
    ap.add_argument("--json", action="store_true", help="print summary.json")
    ap.add_argument("--aggregate", choices=("flower", "fedumm"), default="flower",
                    help="flower: Flower's FedAvg weighted by total samples; fedumm: fedumm's "
                    "per-group FedAvg (a check: the same accuracy as fedumm's runtimes)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    os.environ["FEDUMM_FLOWER_T0"] = str(time.time())
    from fedumm.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    if cfg.strategy.name != "fedavg" or cfg.train.persistent_optimizer \
            or cfg.codec.upload != "float32" or cfg.strategy.fraction < 1:
        raise SystemExit("peers_flower runs FedAvg over all clients with stateless clients "
                         "and float32 payloads only")
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg.save(out / "config.yaml")
    (out / "metrics.jsonl").write_text("")
    # read by the Ray actors (they inherit this environment) and the ServerApp thread
    os.environ[ENV_OUT] = str(out)
    os.environ[ENV_AGG] = args.aggregate
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs: quiet

    from flwr.simulation import run_simulation

    server_app, client_app = _apps()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.clients,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": args.cpus,
                                                 "include_dashboard": False}})
    wall = time.perf_counter() - t_start
    final_path = out / "final.json"
    if not final_path.is_file():
        raise SystemExit(f"the Flower run ended without a final evaluation ({out})")
    final = json.loads(final_path.read_text())
    acc = json.loads((out / "server_counters.json").read_text())
    summary = {
        "name": cfg.name, "rounds": cfg.rounds,
        "strategy": "flwr.serverapp.strategy.FedAvg" + (
            " (fedumm per-group aggregation)" if args.aggregate == "fedumm" else ""),
        "clients": cfg.clients, "seed": cfg.seed, "runtime": "flower-sim (ray)",
        "final": {n: final[n] for n in ("vqa_accuracy", "vqa_by_answer_type", "vqa_by_family",
                                        "geneval_overall", "generation_quality") if n in final},
        "time": {"wall_s": round(wall, 2), "client_train_s": round(acc["client_train_s"], 2),
                 "eval_s": round(acc["eval_s"], 2)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    # the apps' functions must be importable by name in the Ray actors: run them from the
    # module ``peers_flower`` (this folder is on sys.path, which Flower passes on to Ray)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers_flower

    peers_flower.main()

"""The built-in local runtime: a whole federated experiment in one process.

Clients run one after another over ONE shared frozen backbone, swapping only their adapter
tensors, so memory is one model plus K adapter states (not K models). Every payload goes
through the wire codec, so the bytes counted are the bytes that would be sent.

    fedumm run configs/quickstart.yaml --out runs/quickstart
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedumm.config import Config
from fedumm.data.readers import read_samples
from fedumm.fl import codec
from fedumm.fl.client import ClientTrainer
from fedumm.fl.strategies import build_strategy
from fedumm.runtime.experiment import (
    build_adapters,
    client_datasets,
    evaluate_states,
    finish_run,
    load_backbone,
    mid_run_eval,
    pack,
    round_record,
    run_mode,
    unpack,
)
from fedumm.runtime.run_dir import RunDirectory, RunDirError


class LocalRuntime:
    """Builds everything a config describes and runs the rounds."""

    def __init__(self, cfg: Config, out: str | Path, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.dir = RunDirectory(out)
        self.progress = progress
        torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
        self.backbone = load_backbone(cfg)
        self.fingerprint = self.backbone.fingerprint()  # frozen: hash it once
        self.val_data = read_samples(cfg.data, "val")
        self.mode = run_mode(cfg)
        self.clients, self.partition_summary = client_datasets(cfg, self.backbone)
        self.adapters = build_adapters(cfg, self.backbone)
        self.trainer = ClientTrainer(self.adapters, cfg.train, cfg.local_epochs, cfg.seed)
        self.strategy = build_strategy(cfg.strategy, len(self.clients), cfg.seed,
                                       self.backbone.groups)
        self.initial_state = self.adapters.state()
        if hasattr(self.strategy, "init_state"):
            self.strategy.init_state(self.initial_state)

    # ------------------------------------------------------------------ helpers
    def _selected(self, rnd: int) -> list[int]:
        if self.mode == "fl":
            return self.strategy.sample_clients(rnd)
        return list(range(len(self.clients)))

    def _evaluate_states(self, states: list[dict], with_gen: bool) -> dict[str, Any]:
        return evaluate_states(self.cfg, self.adapters, self.val_data, states, with_gen)

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg, d = self.cfg, self.dir
        t_start = time.perf_counter()
        if self.partition_summary is not None:  # who holds what: the report's heat map
            d.write_json(d.PARTITION, self.partition_summary)
        ckpt = d.load_checkpoint() if resume else None
        if resume and ckpt is None:
            d.truncate_metrics(-1)  # interrupted before the first round finished
        if ckpt is not None:
            if ckpt["fingerprint"] != self.fingerprint:
                raise RunDirError("the backbone differs from the one this run started with")
            start = ckpt["round"] + 1
            self.strategy.load_state_dict(ckpt["strategy"])
            states, client_states, acc = ckpt["states"], ckpt["client_states"], ckpt["counters"]
            d.truncate_metrics(ckpt["round"])
        else:
            start = 0
            n_states = len(self.clients) if self.mode == "local" else 1
            states = [dict(self.initial_state) for _ in range(n_states)]
            client_states: dict[int, dict] = {}
            acc = {"upload": [], "download": [], "client_train_s": 0.0, "eval_s": 0.0,
                   "wall_before_s": 0.0}
            if cfg.eval.every:  # round -1: the frozen base (LoRA B = 0), the curve's start
                t = time.perf_counter()
                d.log({"type": "eval", "round": -1, **self._evaluate_states(states[:1], False)})
                acc["eval_s"] += time.perf_counter() - t
        total = (cfg.rounds - start) * len(self._selected(start))
        bar = tqdm(total=total, disable=not self.progress, desc="fedumm", dynamic_ncols=True)
        last_eval = ""
        for rnd in range(start, cfg.rounds):
            selected = self._selected(rnd)
            ccfg = self.strategy.client_config(rnd) if self.mode == "fl" else {}
            updates = []
            for k in selected:
                bar.set_postfix_str(f"round {rnd + 1}/{cfg.rounds} client {k}{last_eval}")
                state = states[k] if self.mode == "local" else states[0]
                received, nbytes = codec.roundtrip(
                    pack(state, ccfg.get("server_control", {})), cfg.codec)
                if self.mode != "local":
                    acc["download"].append(nbytes)
                recv_state, recv_control = unpack(received)
                recv_cfg = dict(ccfg)
                if "server_control" in ccfg:
                    recv_cfg["server_control"] = recv_control
                t = time.perf_counter()
                upd, client_states[k] = self.trainer.train(
                    self.clients[k], recv_state, rnd, recv_cfg, client_states.get(k))
                acc["client_train_s"] += time.perf_counter() - t
                sent, upd.upload_bytes = codec.roundtrip(
                    pack(upd.tensors, upd.extra.get("control_delta", {})), cfg.codec)
                upd.tensors, sent_control = unpack(sent)
                if "control_delta" in upd.extra:
                    upd.extra["control_delta"] = sent_control
                if self.mode != "local":
                    acc["upload"].append(upd.upload_bytes)
                updates.append(upd)
                bar.update(1)
            if self.mode == "local":
                for upd in updates:
                    states[upd.client_id] = {**states[upd.client_id], **upd.tensors}
            else:
                states[0] = self.strategy.aggregate(rnd, states[0], updates)
            d.log(round_record(rnd, selected, updates, count_upload=self.mode != "local"))
            gen = mid_run_eval(cfg, rnd)
            if gen is not None:
                t = time.perf_counter()
                res = self._evaluate_states(states if self.mode == "local" else states[:1], gen)
                acc["eval_s"] += time.perf_counter() - t
                d.log({"type": "eval", "round": rnd, **res})
                last_eval = f" | VQA {res.get('vqa_accuracy', float('nan')):.1f}"
            acc["wall_now_s"] = acc["wall_before_s"] + time.perf_counter() - t_start
            d.save_checkpoint({"round": rnd, "states": states, "strategy":
                               self.strategy.state_dict(), "client_states": client_states,
                               "counters": {**acc, "wall_before_s": acc["wall_now_s"]},
                               "fingerprint": self.fingerprint})
        bar.close()
        t = time.perf_counter()
        final_res = self._evaluate_states(states if self.mode == "local" else states[:1], True)
        acc["eval_s"] += time.perf_counter() - t
        return finish_run(cfg, d, self.backbone, self.adapters, self.fingerprint,
                          len(self.clients), states[0], final_res, acc,
                          acc["wall_before_s"] + time.perf_counter() - t_start)


def run_experiment(cfg: Config | None, out: str | Path, *, resume: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the experiment ``cfg`` into the run directory ``out`` on the runtime
    the config names (``local`` here; ``flare-sim`` / ``flare-poc`` via NVIDIA FLARE)."""
    d = RunDirectory(out)
    if resume:
        cfg = d.load_config()
        if cfg.runtime != "local":
            raise RunDirError(f"{out} ran on runtime={cfg.runtime}; only local runs resume "
                              "(start a new run directory)")
    elif cfg.runtime != "local":
        from fedumm.runtime.flare.runner import run_flare

        return run_flare(cfg, out)
    else:
        d.create(cfg)
    return LocalRuntime(cfg, out, progress=progress).run(resume=resume)

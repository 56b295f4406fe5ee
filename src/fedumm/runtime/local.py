"""The built-in local runtime: a whole federated experiment in one process.

Clients run one after another over ONE shared frozen backbone, swapping only their adapter
tensors, so memory is one model plus K adapter states (not K models). Every payload goes
through the wire codec, so the bytes counted are the bytes that would be sent.

    fedumm run configs/quickstart.yaml --out runs/quickstart
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fedumm.config import Config
from fedumm.data.clients import build_dataset, split_clients
from fedumm.eval.model_eval import evaluate_backbone
from fedumm.fl import codec
from fedumm.fl.client import ClientTrainer, make_client_data
from fedumm.fl.strategies import build_strategy
from fedumm.models.backbone import Backbone
from fedumm.models.lora import LoraAdapters
from fedumm.runtime.run_dir import RunDirectory, RunDirError

CONTROL = "control/"  # prefix of SCAFFOLD control variates inside a payload


def _pack(state: dict, control: dict) -> dict:
    """One wire payload: adapter tensors plus (SCAFFOLD) control variates under a prefix."""
    return {**state, **{CONTROL + n: v for n, v in control.items()}}


def _unpack(payload: dict) -> tuple[dict, dict]:
    """Inverse of :func:`_pack`: (adapter tensors, control variates)."""
    state = {n: v for n, v in payload.items() if not n.startswith(CONTROL)}
    control = {n[len(CONTROL):]: v for n, v in payload.items() if n.startswith(CONTROL)}
    return state, control


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class LocalRuntime:
    """Builds everything a config describes and runs the rounds."""

    def __init__(self, cfg: Config, out: str | Path, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.dir = RunDirectory(out)
        self.progress = progress
        torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
        self.backbone = Backbone.load(cfg.model)
        self.fingerprint = self.backbone.fingerprint()  # frozen: hash it once
        if cfg.data.image_size != self.backbone.config.image_size:
            raise ValueError(f"data.image_size={cfg.data.image_size} but the model "
                             f"{cfg.model!r} takes {self.backbone.config.image_size} px images")
        self.train_data = build_dataset(cfg.data, "train")
        self.val_data = build_dataset(cfg.data, "val")
        self.prep = self.backbone.encoder.prepare(self.train_data)
        self.mode = cfg.strategy.name if cfg.strategy.name in ("centralized", "local") else "fl"
        n = self.train_data.num_samples
        self.partition_summary: dict[str, Any] | None = None
        if self.mode == "centralized":  # one client holding all training data
            parts, missing = [np.arange(n)], np.zeros(n, dtype=np.int8)
        else:
            split = split_clients(self.train_data, cfg.partition, cfg.clients, cfg.seed)
            parts, missing = split.parts, split.missing
            self.partition_summary = split.summary()
        self.clients = [make_client_data(k, self.prep, p, missing, cfg.train.val_fraction,
                                         cfg.seed) for k, p in enumerate(parts)]
        self.adapters = LoraAdapters(self.backbone, cfg.lora.r, cfg.lora.alpha, cfg.lora.groups,
                                     cfg.lora.dropout, seed=cfg.seed)
        self.trainer = ClientTrainer(self.adapters, cfg.train, cfg.local_epochs, cfg.seed)
        self.strategy = build_strategy(cfg.strategy, len(self.clients), cfg.seed)
        self.initial_state = self.adapters.state()
        if hasattr(self.strategy, "init_state"):
            self.strategy.init_state(self.initial_state)

    # ------------------------------------------------------------------ helpers
    def _selected(self, rnd: int) -> list[int]:
        if self.mode == "fl":
            return self.strategy.sample_clients(rnd)
        return list(range(len(self.clients)))

    def evaluate(self, state: dict[str, torch.Tensor], with_gen: bool) -> dict[str, Any]:
        self.adapters.load_state(state)
        ev = self.cfg.eval
        return evaluate_backbone(self.backbone, self.val_data, max_vqa=ev.max_vqa,
                                 max_gen=ev.max_gen if with_gen else 0, seed=self.cfg.seed)

    def _evaluate_states(self, states: list[dict], with_gen: bool) -> dict[str, Any]:
        """One state, or the mean over clients' own states (the ``local`` baseline)."""
        results = [self.evaluate(s, with_gen) for s in states]
        if len(results) == 1:
            return results[0]
        out = dict(results[0])
        for key in ("vqa_accuracy", "geneval_overall"):
            if key in out:
                out[key] = round(float(np.mean([r[key] for r in results])), 4)
        for key in ("vqa_by_answer_type", "geneval_by_task"):
            if key in out:
                out[key] = {k: round(float(np.mean([r[key][k] for r in results])), 4)
                            for k in out[key]}
        out["per_client"] = [{k: r.get(k) for k in ("vqa_accuracy", "geneval_overall")}
                             for r in results]
        return out

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
                    _pack(state, ccfg.get("server_control", {})), cfg.codec)
                if self.mode != "local":
                    acc["download"].append(nbytes)
                recv_state, recv_control = _unpack(received)
                recv_cfg = dict(ccfg)
                if "server_control" in ccfg:
                    recv_cfg["server_control"] = recv_control
                t = time.perf_counter()
                upd, client_states[k] = self.trainer.train(
                    self.clients[k], recv_state, rnd, recv_cfg, client_states.get(k))
                acc["client_train_s"] += time.perf_counter() - t
                sent, upd.upload_bytes = codec.roundtrip(
                    _pack(upd.tensors, upd.extra.get("control_delta", {})), cfg.codec)
                upd.tensors, sent_control = _unpack(sent)
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
            d.log({"type": "round", "round": rnd, "clients": selected,
                   "train_loss": {u.client_id: u.metrics for u in updates},
                   "quality": {u.client_id: u.quality for u in updates},
                   "steps": sum(u.num_steps for u in updates),
                   "upload_bytes": sum(u.upload_bytes for u in updates) if self.mode != "local"
                   else 0, "peak_rss_bytes": peak_rss_bytes()})
            final = rnd == cfg.rounds - 1
            if cfg.eval.every and (rnd + 1) % cfg.eval.every == 0 and not final:
                t = time.perf_counter()
                gen = bool(cfg.eval.gen_every) and (rnd + 1) % cfg.eval.gen_every == 0
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
        d.log({"type": "eval", "round": cfg.rounds - 1, **final_res})
        self.adapters.load_state(states[0])
        self.adapters.export(d.path / d.ADAPTERS)
        wall = acc["wall_before_s"] + time.perf_counter() - t_start
        summary = self._summary(final_res, acc, wall)
        d.write_summary(summary)
        from fedumm.experiments.report import write_run_report

        write_run_report(d.path)
        return summary

    def _summary(self, final: dict, acc: dict, wall: float) -> dict[str, Any]:
        cfg = self.cfg
        full = len(codec.encode(self.backbone.base_state(), cfg.codec))
        up, down = acc["upload"], acc["download"]
        per_up = float(np.mean(up)) if up else 0.0
        base = next((m for m in self.dir.metrics() if m.get("round") == -1), None)
        return {
            "name": cfg.name, "strategy": cfg.strategy.name, "rounds": cfg.rounds,
            "clients": len(self.clients), "seed": cfg.seed,
            "final": {k: final[k] for k in ("vqa_accuracy", "vqa_by_answer_type",
                                            "vqa_by_family", "geneval_overall",
                                            "geneval_by_task", "per_client") if k in final},
            "base": {k: base[k] for k in ("vqa_accuracy", "vqa_by_family") if base and k in base},
            "communication": {
                "upload_bytes_per_client_round": per_up,
                "download_bytes_per_client_round": float(np.mean(down)) if down else 0.0,
                "full_model_bytes": full,
                "total_bytes": int(sum(up) + sum(down)),
                "reduction_vs_full": round(full / per_up, 2) if per_up else None,
                "codec": cfg.codec,
            },
            "time": {"wall_s": round(wall, 2), "client_train_s": round(acc["client_train_s"], 2),
                     "eval_s": round(acc["eval_s"], 2)},
            "memory": {"peak_rss_bytes": peak_rss_bytes()},
            "adapters": self.adapters.num_parameters(),
            "fingerprint": self.fingerprint,
        }


def run_experiment(cfg: Config, out: str | Path, *, resume: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the experiment ``cfg`` into the run directory ``out``."""
    d = RunDirectory(out)
    if resume:
        cfg = d.load_config()
    else:
        d.create(cfg)
    return LocalRuntime(cfg, out, progress=progress).run(resume=resume)

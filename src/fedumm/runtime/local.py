"""The built-in local runtime: a whole federated experiment in one process.

Clients run one after another over ONE shared frozen backbone, swapping only their adapter
tensors, so memory is one model plus K adapter states (not K models). The rounds are the one
round loop every runtime uses; every payload goes through the wire codec, so the bytes counted
are the bytes that would be sent.

    fedumm run configs/quickstart.yaml --out runs/quickstart
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedumm.config import Config
from fedumm.fl.client import ClientTrainer
from fedumm.fl.strategies import build_strategy
from fedumm.runtime.experiment import (
    build_adapters,
    client_datasets,
    eval_samples,
    load_backbone,
)
from fedumm.runtime.loop import ClientEndpoint, LocalTransport, RoundLoop
from fedumm.runtime.run_dir import RunDirectory, RunDirError


class LocalRuntime:
    """Builds everything a config describes and runs the rounds through the one round loop
    (:mod:`fedumm.runtime.loop`) over the in-process transport."""

    def __init__(self, cfg: Config, out: str | Path, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.dir = RunDirectory(out)
        self.show_progress = progress
        threads = cfg.train.threads or os.cpu_count() or 1
        per_worker = max(1, threads // cfg.workers)
        # sequential clients use every thread; clients trained at once split them
        torch.set_num_threads(threads)
        self.backbone = load_backbone(cfg)
        fingerprint = self.backbone.fingerprint()  # frozen: hash it once
        val_data = eval_samples(cfg)
        self.clients, self.partition_summary = client_datasets(cfg, self.backbone)
        adapters = build_adapters(cfg, self.backbone)
        trainer = ClientTrainer(adapters, cfg.train, cfg.local_epochs, cfg.seed,
                            freeze_lora_a=cfg.lora.aggregation == "ffa")
        strategy = build_strategy(cfg.strategy, len(self.clients), cfg.seed,
                                  self.backbone.groups)
        self.transport = LocalTransport(self.clients, ClientEndpoint(trainer, cfg),
                                        workers=cfg.workers, threads=per_worker)
        self.loop = RoundLoop(cfg, self.dir, self.backbone, adapters, strategy, val_data,
                              len(self.clients), self.transport, fingerprint,
                              progress=self._progress)
        self._bar: tqdm | None = None
        self._last_eval = ""

    def _progress(self, event: str) -> None:
        """A client finished (``""``) or an evaluation ran (its headline)."""
        if self._bar is None:
            return
        if event:
            self._last_eval = f" | {event}"
        else:
            self._bar.update(1)
        self._bar.set_postfix_str(f"done {self._bar.n}/{self._bar.total}{self._last_eval}")

    def run(self, resume: bool = False) -> dict[str, Any]:
        if self.partition_summary is not None:  # who holds what: the report's heat map
            self.dir.write_json(self.dir.PARTITION, self.partition_summary)
        ckpt_round = -1
        if resume and (ckpt := self.dir.load_checkpoint()) is not None:
            ckpt_round = ckpt["round"]
        per_round = len(self.loop.selected(ckpt_round + 1)) if ckpt_round + 1 < \
            self.cfg.rounds else 0
        self._bar = tqdm(total=(self.cfg.rounds - ckpt_round - 1) * per_round,
                         disable=not self.show_progress, desc="fedumm", dynamic_ncols=True)
        try:
            return self.loop.run(resume=resume)
        finally:
            self._bar.close()
            self.transport.close()


def run_experiment(cfg: Config | None, out: str | Path, *, resume: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the experiment ``cfg`` into the run directory ``out`` on the runtime
    the config names (``local`` here; ``flare-sim`` / ``flare-poc`` via NVIDIA FLARE)."""
    d = RunDirectory(out)
    if resume:
        cfg = d.load_config()
        if cfg.runtime == "flare-sim":
            from fedumm.runtime.flare.runner import run_flare_sim

            return run_flare_sim(cfg, out, resume=True)
        if cfg.runtime != "local":
            raise RunDirError(f"{out} ran on runtime={cfg.runtime}; local and flare-sim runs "
                              "resume (start a new run directory)")
    elif cfg.runtime != "local":
        from fedumm.runtime.flare.runner import run_flare

        return run_flare(cfg, out)
    with d.lock():
        if not resume:
            d.create(cfg)
        return LocalRuntime(cfg, out, progress=progress).run(resume=resume)

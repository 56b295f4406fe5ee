"""Server side of a FLARE run: a FLARE ``ModelController`` that drives fedumm's strategies.

Every round it asks the strategy which clients train and with what settings, sends them the
global adapters (codec dtype, pytorch exchange format), turns the sites' ``FLModel`` results
back into :class:`~fedumm.fl.updates.ClientUpdate` objects and lets the strategy aggregate, so
FedAvg, the quality-weighted FedUMM rule, FedProx, the FedOpt family and SCAFFOLD all work
unchanged. It evaluates, logs and writes the same run directory as the local runtime; only
adapter tensors are persisted.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from fedumm.config import config_from_dict
from fedumm.data.readers import read_samples
from fedumm.fl import codec
from fedumm.fl.strategies import build_strategy
from fedumm.fl.updates import ClientUpdate
from fedumm.runtime.experiment import (
    build_adapters,
    evaluate_states,
    finish_run,
    load_backbone,
    mid_run_eval,
    num_clients,
    pack,
    round_record,
    run_mode,
    unpack,
)
from fedumm.runtime.run_dir import RunDirectory

RUN_SUBDIR = "fedumm_run"  # inside FLARE's job workspace when no run_dir is given


SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def site_names(k_total: int, sites: list[str] | None = None) -> list[str]:
    """The job's site names, client k first: ``sites`` as given (any names FLARE accepts),
    else FLARE's defaults ``site-1`` .. ``site-K``."""
    if not sites:
        return [f"site-{k + 1}" for k in range(k_total)]
    bad = [s for s in sites if not SITE_NAME.match(s)]
    if bad:
        raise ValueError(f"site name {bad[0]!r}: use letters, digits, '.', '_' and '-'")
    if len(set(sites)) != len(sites):
        raise ValueError(f"site names repeat: {sites}")
    if len(sites) != k_total:
        raise ValueError(f"{len(sites)} site names for {k_total} clients: give one per client "
                         "(or set clients)")
    return list(sites)


class FedUMMController(ModelController):
    def __init__(self, config: dict[str, Any], run_dir: str = "",
                 sites: list[str] | None = None) -> None:
        """``config``: the resolved fedumm config; ``run_dir``: where to write the run
        directory (empty: ``fedumm_run`` in the server's job workspace); ``sites``: the site
        name of every client (default ``site-1`` .. ``site-K``)."""
        # strict: any site error stops the run (a failed client must fail the run)
        super().__init__(persistor_id="", ignore_result_error=False, task_check_period=0.05)
        fobs.register(TensorDecomposer)  # adapters travel as torch tensors (bf16 included)
        self.config = config
        self.run_dir = run_dir
        self.sites = sites

    def run(self) -> None:
        cfg = config_from_dict(self.config)  # build_job refused strategy.name=local
        torch.set_num_threads(cfg.train.threads or 1)
        d = RunDirectory(self.run_dir or Path(self.get_run_dir()) / RUN_SUBDIR)
        if not (d.path / d.CONFIG).is_file():
            d.create(cfg)
        t_start = time.perf_counter()
        backbone = load_backbone(cfg)
        fingerprint = backbone.fingerprint()
        adapters = build_adapters(cfg, backbone)
        val_data = read_samples(cfg.data, "val")
        k_total = num_clients(cfg)
        sites = site_names(k_total, self.sites)
        strategy = build_strategy(cfg.strategy, k_total, cfg.seed, backbone.groups)
        state = adapters.state()
        if hasattr(strategy, "init_state"):
            strategy.init_state(state)
        acc: dict[str, Any] = {"upload": [], "download": [], "client_train_s": 0.0, "eval_s": 0.0}
        if cfg.eval.every:
            t = time.perf_counter()
            d.log({"type": "eval", "round": -1,
                   **evaluate_states(cfg, adapters, val_data, [state], False)})
            acc["eval_s"] += time.perf_counter() - t
        wire = codec.DTYPES[cfg.codec]
        for rnd in range(cfg.rounds):
            selected = strategy.sample_clients(rnd) if run_mode(cfg) == "fl" else [0]
            ccfg = strategy.client_config(rnd)
            payload = pack(state, ccfg.get("server_control", {}))
            nbytes = len(codec.encode(payload, cfg.codec))
            acc["download"] += [nbytes] * len(selected)
            model = FLModel(params={n: v.to(wire) for n, v in payload.items()},
                            current_round=rnd, total_rounds=cfg.rounds,
                            meta={"client_config": {k: v for k, v in ccfg.items()
                                                    if k != "server_control"}})
            self.info(f"fedumm round {rnd + 1}/{cfg.rounds}: clients {selected}")
            t = time.perf_counter()
            results = self.send_model_and_wait(targets=[sites[k] for k in selected],
                                               data=model)
            acc["client_train_s"] += time.perf_counter() - t
            if len(results) != len(selected):
                raise RuntimeError(f"round {rnd}: {len(results)} of {len(selected)} sites "
                                   "answered")
            updates = sorted((self._update(r, cfg.codec) for r in results),
                             key=lambda u: u.client_id)  # the local runtime's order
            acc["upload"] += [u.upload_bytes for u in updates]
            state = strategy.aggregate(rnd, state, updates)
            d.log(round_record(rnd, selected, updates))
            gen = mid_run_eval(cfg, rnd)
            if gen is not None:
                t = time.perf_counter()
                d.log({"type": "eval", "round": rnd,
                       **evaluate_states(cfg, adapters, val_data, [state], gen)})
                acc["eval_s"] += time.perf_counter() - t
        t = time.perf_counter()
        final = evaluate_states(cfg, adapters, val_data, [state], True)
        acc["eval_s"] += time.perf_counter() - t
        finish_run(cfg, d, backbone, adapters, fingerprint, k_total, state, final, acc,
                   time.perf_counter() - t_start)
        self.info(f"fedumm run directory: {d.path}")

    @staticmethod
    def _update(result: FLModel, wire_dtype: str) -> ClientUpdate:
        meta = result.meta
        params = result.params
        upload = len(codec.encode(params, wire_dtype))
        tensors, control = unpack({n: v.to(torch.float32) for n, v in params.items()})
        extra = {"control_delta": control} if meta.get("has_control") else {}
        return ClientUpdate(int(meta["client_id"]), tensors, dict(meta["num_samples"]),
                            dict(meta.get("quality", {})), int(meta.get("num_steps", 0)),
                            dict(meta.get("metrics", {})), extra, upload)



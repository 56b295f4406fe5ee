"""A finished run, read back: the model its final evaluation scored, evaluated again the same
way, or exported with its adapters merged into the backbone's own checkpoint format.

What a run leaves (:mod:`fedumm.runtime.run_dir`): ``config.yaml`` (the resolved config),
``summary.json`` (its final numbers), ``adapters/`` (PEFT's folder of the global adapters;
with ``lora.aggregation=exact`` also ``base_residual.safetensors``, the dense residual folded
into each adapted frozen weight) and ``checkpoint/state.pt`` (the server state after the last
round: for the ``local`` baseline, every client's own adapters).

Usage::

    run = SavedRun("runs/quickstart")
    result = run.evaluate()            # == summary.json's "final" numbers
    assert not run.differences(result)
    export_merged("runs/quickstart", "runs/quickstart_merged")
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedumm.config import Config, load_config
from fedumm.models.checksums import SUMS
from fedumm.models.loading import RunModel, is_run_folder, load_for_eval, load_run_model
from fedumm.outputs import OutputFolder, write_tree
from fedumm.runtime.experiment import build_adapters, eval_samples, evaluate_states
from fedumm.runtime.modes import LOCAL, run_mode
from fedumm.runtime.run_dir import RunDirectory, RunDirError

EXPORT_COMMAND = "export"  # the marker of an exported folder: .fedumm-export
State = dict[str, torch.Tensor]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (a run's numbers are those of
    its thread count: some reductions split over threads), restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SavedRun:
    """A finished run directory: its config and summary, read at once and checked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        d = RunDirectory(self.path)
        if not self.path.is_dir():
            raise RunDirError(f"{self.path} is not a run directory (no such folder)")
        if not (self.path / d.CONFIG).is_file() or not is_run_folder(self.path):
            raise RunDirError(f"{self.path} is not a finished run directory (it needs "
                              f"{d.CONFIG} and {d.ADAPTERS}/adapter_config.json)")
        if not d.is_finished():
            raise RunDirError(f"{self.path} holds no finished run (no {d.SUMMARY}); finish it "
                              f"first: fedumm run --resume {self.path}")
        self.cfg: Config = load_config(self.path / d.CONFIG)
        self.summary: dict[str, Any] = json.loads((self.path / d.SUMMARY).read_text())

    @property
    def threads(self) -> int:
        """The torch threads the run evaluated with (``train.threads``, else every core)."""
        return self.cfg.train.threads or os.cpu_count() or 1

    @property
    def is_local(self) -> bool:
        """The ``local`` baseline: one model per client, none global."""
        return run_mode(self.cfg) == LOCAL

    def _load(self) -> RunModel:
        return load_run_model(self.path, build_adapters)  # the adapters as the run built them

    def model(self) -> RunModel:
        """The run's one model (global adapters, residual folded) for generating or
        exporting; a ``local``-baseline run has none and is refused."""
        if self.is_local:
            raise ValueError(f"{self.path} is a strategy.name=local run: every client kept "
                             "its own adapters, so there is no one model to generate with or "
                             "export (`fedumm evaluate` scores them as the run did; each "
                             f"client's adapters are in {RunDirectory.CHECKPOINT}/state.pt)")
        return self._load()

    def evaluated_states(self, model: RunModel) -> list[State]:
        """The adapter states the final evaluation scored: the global one (as loaded), or for
        the ``local`` baseline every client's own, from the last checkpoint."""
        if not self.is_local:
            return [model.adapters.state()]
        d = RunDirectory(self.path)
        ckpt = d.load_checkpoint()
        if ckpt is None:
            raise RunDirError(f"{self.path} is a strategy.name=local run whose clients' "
                              f"adapters were in {d.checkpoint_file}, which is gone: its final "
                              "evaluation (the mean over clients) cannot be redone")
        states = list(ckpt["states"])
        if ckpt["round"] != self.cfg.rounds - 1 or len(states) != self.cfg.clients:
            raise RunDirError(f"{d.checkpoint_file} holds round {ckpt['round']} with "
                              f"{len(states)} client(s), not the last round "
                              f"({self.cfg.rounds - 1}) of {self.cfg.clients} clients")
        return states

    def evaluate(self) -> dict[str, Any]:
        """The final evaluation again: the saved model(s) on the run's own held-out data,
        with its ``eval`` settings, seed and thread count; equal to ``summary.json``'s
        ``final`` (see :meth:`differences`)."""
        with torch_threads(self.threads):
            model = self._load()
            states = self.evaluated_states(model)
            return evaluate_states(self.cfg, model.adapters, eval_samples(self.cfg), states,
                                   with_gen=True)

    def differences(self, result: dict[str, Any]) -> list[str]:
        """Where ``result`` differs from ``summary.json``'s final numbers (empty: equal)."""
        def same(a: Any, b: Any) -> bool:  # as JSON: tuples are lists, NaN equals NaN
            return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

        final = self.summary.get("final", {})
        return [f"{k}: {result.get(k)!r} here, {v!r} in summary.json"
                for k, v in final.items() if not same(result.get(k), v)]


def export_merged(run: str | Path, out: str | Path) -> Path:
    """Write ``out``: the run's backbone in its own checkpoint format (the folder its
    ``backbone.path`` loads: transformers' ``save_pretrained`` layout for Janus, BLIP3o's
    published layout, the reference checkpoint layout), with the adapters merged into the
    weights by PEFT and, for an exact-aggregation run, the residual folded. It loads without
    fedumm's adapters (for Janus, with transformers alone). ``out`` is a new or empty folder,
    or one an earlier export wrote."""
    saved = SavedRun(run)
    folder = OutputFolder(out, EXPORT_COMMAND, option="--merged")
    folder.check()  # before the model is built
    model = saved.model()
    save = getattr(model.backbone, "save", None)
    if save is None:
        raise ValueError(f"backbone.kind={saved.cfg.backbone.kind} has no save(path): its "
                         "merged weights cannot be written in its own format")
    model.adapters.merge_and_unload()
    folder.claim()
    write_tree(out, save, last=(SUMS,))
    folder.prune()
    return Path(out)


def load_model(name: str | Path):
    """The model a name stands for: a finished run directory -> its one adapted model
    (:meth:`SavedRun.model`: adapters on, residual folded; a ``local`` run is refused);
    ``"base"`` or a reference checkpoint folder -> that checkpoint."""
    if is_run_folder(name):
        return SavedRun(name).model().backbone
    return load_for_eval(name)

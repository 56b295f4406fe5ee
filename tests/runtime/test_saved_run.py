"""A finished run read back (:mod:`fedumm.runtime.saved_run`): the model loaded is bit for bit
the one the run's final evaluation scored, and evaluating it again gives summary.json's final
numbers exactly, in every LoRA aggregation mode and for the ``local`` baseline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import fedumm.runtime.loop as loop
from fedumm.config import config_from_dict
from fedumm.models.loading import load_run_model
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.run_dir import RunDirError
from fedumm.runtime.saved_run import SavedRun, export_merged, load_model

MODES = {
    "separate": [],
    "exact": ["lora.aggregation=exact"],
    "ffa": ["lora.aggregation=ffa", "lora.groups=vision,language,generation"],
    "client_ranks": ["lora.r=8", "lora.alpha=16", "lora.client_ranks=2,4,8"],
    "centralized": ["strategy.name=centralized"],
    "local": ["strategy.name=local"],
}


@pytest.fixture()
def evaluated(monkeypatch):
    """Every parameter of the adapted model as the run's final evaluation left it (captured
    in ``finish_run``, once it has loaded the state it saves)."""
    seen: dict[str, torch.Tensor] = {}
    real = loop.finish_run

    def finish_run(cfg, run_dir, backbone, adapters, *args, **kwargs):
        out = real(cfg, run_dir, backbone, adapters, *args, **kwargs)
        seen.update({n: p.detach().clone() for n, p in adapters.model.named_parameters()})
        return out

    monkeypatch.setattr(loop, "finish_run", finish_run)
    return seen


def _run(tmp_path, tiny_overrides, mode):
    cfg = config_from_dict({"name": mode}, [*tiny_overrides, "clients=3", "partition.alpha=0.3",
                                            "eval.every=0", *MODES[mode]])
    return run_experiment(cfg, tmp_path / mode, progress=False), tmp_path / mode


@pytest.mark.parametrize("mode", MODES)
def test_evaluate_redoes_the_final_evaluation_exactly(tmp_path, tiny_overrides, evaluated,
                                                      mode):
    summary, path = _run(tmp_path, tiny_overrides, mode)
    run = SavedRun(path)
    result = run.evaluate()
    assert run.differences(result) == []
    assert {k: result[k] for k in summary["final"]} == summary["final"]
    if mode == "local":
        assert len(result["per_client"]) == 3
    # the model loaded is the one evaluated, bit for bit (the exact residual folded in)
    loaded = dict(load_run_model(path).adapters.model.named_parameters())
    assert loaded.keys() == evaluated.keys()
    assert all(torch.equal(loaded[k], evaluated[k]) for k in loaded)


def test_an_exact_runs_model_carries_its_residual(tmp_path, tiny_overrides):
    _, path = _run(tmp_path, tiny_overrides, "exact")
    residual = load_file(str(path / "adapters" / "base_residual.safetensors"))
    model = load_model(path)  # what `fedumm generate` uses
    fresh = load_run_model(tmp_path / "exact")
    fresh.adapters.fold_residuals({m: torch.zeros_like(r) for m, r in residual.items()})
    assert any(r.abs().sum() > 0 for r in residual.values())
    for m, r in residual.items():
        name = m.removeprefix("base_model.model.")
        weight = model.model.get_submodule(name).base_layer.weight
        base = fresh.backbone.model.get_submodule(name).base_layer.weight
        assert torch.equal(weight, base + r)


def test_a_local_run_has_no_one_model_and_needs_its_checkpoint(tmp_path, tiny_overrides):
    _, path = _run(tmp_path, tiny_overrides, "local")
    with pytest.raises(ValueError, match="strategy.name=local run: every client kept"):
        load_model(path)
    with pytest.raises(ValueError, match="strategy.name=local run"):
        export_merged(path, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    (path / "checkpoint" / "state.pt").unlink()
    with pytest.raises(RunDirError, match=r"state\.pt, which is gone"):
        SavedRun(path).evaluate()


def test_an_unfinished_or_foreign_folder_is_refused(tmp_path):
    with pytest.raises(RunDirError, match="not a run directory"):
        SavedRun(tmp_path / "nothing")
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "adapter_config.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(RunDirError, match="no finished run"):
        SavedRun(tmp_path)

"""FedMLLM's scenarios end to end: every scenario with every method trains, and data without a
modality never changes the adapters that only that modality trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from fedumm.config import config_from_dict
from fedumm.experiments.sweep import parse_method
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.experiment import build_adapters, load_backbone

SCENARIOS = ("none", "missing_modality", "cross_modal", "hybrid", "task_split")
BENCH = yaml.safe_load(Path("configs/fedmllm_benchmark.yaml").read_text())
METHODS = dict(parse_method(m) for m in BENCH["sweep"]["methods"])


def _cfg(tiny_overrides, *extra):
    return config_from_dict({"name": "het"}, [
        *tiny_overrides, "data.scene_text=0.6", "data.families=[spatial,shape_at]",
        "eval.classification=[spatial,shape_at]", "train.adaptive_prox_skip=0",
        "partition.missing_rate=0.4", "partition.hybrid_q=0.3", "eval.every=0",
        "partition.min_per_client=1", "eval.max_vqa=24", "data.val_scenes=12", *extra])


def test_text_only_clients_never_change_the_image_encoder(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides, "partition.scenario=cross_modal",
               "partition.image_only_clients=0", "clients=3")
    run_experiment(cfg, tmp_path / "run", progress=False)
    start = build_adapters(cfg, load_backbone(cfg)).state()
    final = load_file(str(tmp_path / "run" / "adapters" / "adapter_model.safetensors"))
    vision = [k for k in start if "vision_model" in k or "aligner" in k]
    language = [k for k in start if "language_model" in k and "lora_B" in k]
    assert vision and language
    named = {k.removeprefix("base_model.model."): v for k, v in final.items()}
    same = [k for k in vision if k.removeprefix("base_model.model.") in named]
    assert all((named[k.removeprefix("base_model.model.")] == start[k]).all() for k in same)
    assert any((named[k.removeprefix("base_model.model.")] != start[k]).any()
               for k in language if k.removeprefix("base_model.model.") in named)


def _train_all(tiny_overrides, tmp_path, clients, methods):
    for scenario in SCENARIOS:
        for name in methods:
            extra = [f"{k}={v}" for k, v in METHODS[name].items()]
            s = run_experiment(_cfg(tiny_overrides, f"partition.scenario={scenario}",
                                    f"clients={clients}", "partition.image_only_clients=4",
                                    "partition.understanding_clients=4", *extra),
                               tmp_path / f"{scenario}_{name}", progress=False)
            assert 0.0 <= s["final"]["vqa_accuracy"] <= 100.0, (scenario, name)
            assert s["final"]["macro_f1"] is not None, (scenario, name)


def test_every_scenario_trains_at_k10(tmp_path, tiny_overrides):
    _train_all(tiny_overrides, tmp_path, 10, ["fedavg", "fedadagrad+both"])


@pytest.mark.slow
@pytest.mark.parametrize("clients", [10, 16])
def test_every_scenario_trains_with_every_method(tmp_path, tiny_overrides, clients):
    _train_all(tiny_overrides, tmp_path, clients, list(METHODS))

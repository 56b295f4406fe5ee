"""Defaults that train: every registered strategy, with nothing but its name set, ends the
quickstart with a model at least as good as the frozen base it started from (slow: the real
quickstart, ~40 s per strategy at one thread)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedumm.config import load_config
from fedumm.registry import STRATEGIES
from fedumm.runtime.dispatch import run_experiment

QUICKSTART = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
# GenEval over the quickstart's 60 prompts has a standard error of about 0.06; a strategy may
# not lose more than that against the frozen base (its VQA must not drop at all)
GENEVAL_SLACK = 0.06


@pytest.fixture(scope="module")
def frozen_base() -> dict:
    from fedumm.runtime.experiment import (
        build_adapters,
        eval_samples,
        evaluate_states,
        load_backbone,
    )

    cfg = load_config(QUICKSTART, ["train.threads=1"])
    adapters = build_adapters(cfg, load_backbone(cfg))
    return evaluate_states(cfg, adapters, eval_samples(cfg), [adapters.state()], True)


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES.names())
def test_the_defaults_of_every_strategy_train(name, tmp_path, frozen_base):
    cfg = load_config(QUICKSTART, [f"strategy.name={name}", "train.threads=1", "eval.every=0"])
    final = run_experiment(cfg, tmp_path / name, progress=False)["final"]
    assert final["vqa_accuracy"] >= frozen_base["vqa_accuracy"]
    assert final["geneval_overall"] >= frozen_base["geneval_overall"] - GENEVAL_SLACK

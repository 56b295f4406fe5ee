"""Differential privacy through whole runs: what the run reports it spent (round records and
summary.json), and client-level DP's two sides agreeing."""

from __future__ import annotations

import json

import pytest
import torch

from fedumm.config import config_from_dict
from fedumm.runtime.dispatch import run_experiment
from makers import round_records, run_adapters


@pytest.fixture()
def quick(tiny_overrides):
    return [*tiny_overrides, "eval.every=0", "eval.max_gen=0"]


def test_sample_level_dp_reports_the_largest_client_epsilon(tmp_path, quick):
    cfg = config_from_dict({"name": "s"}, [*quick, "privacy.sample.max_grad_norm=1.0",
                                           "privacy.sample.noise_multiplier=1.0"])
    summary = run_experiment(cfg, tmp_path / "s", progress=False)
    rounds = round_records(tmp_path / "s")
    reported = [m["dp_epsilon"] for r in rounds for m in r["train_loss"].values()]
    assert len(reported) == 4 and all(0 < e < float("inf") for e in reported)
    # the run's guarantee after each round: the largest epsilon any client reported so far
    assert [r["privacy"]["epsilon"] for r in rounds] == [
        max(reported[:2]), max(reported)]
    p = summary["privacy"]
    assert p["unit"] == "sample" and p["epsilon"] == max(reported)
    assert p == json.loads((tmp_path / "s" / "summary.json").read_text())["privacy"]
    report = (tmp_path / "s" / "report.md").read_text()
    assert f"({p['epsilon']:.3g}, {p['delta']:.3g})-DP per sample" in report
    # the second round of each client spent more than its first
    per_client = {}
    for r in rounds:
        for k, m in r["train_loss"].items():
            per_client.setdefault(k, []).append(m["dp_epsilon"])
    assert all(b > a for a, b in per_client.values())


def test_a_run_without_dp_reports_no_privacy(tmp_path, quick):
    summary = run_experiment(config_from_dict({"name": "n"}, quick), tmp_path / "n",
                             progress=False)
    assert "privacy" not in summary
    assert "Differential privacy" not in (tmp_path / "n" / "report.md").read_text()
    assert all("privacy" not in r for r in round_records(tmp_path / "n"))


def test_client_side_clipping_equals_server_side_clipping_without_noise(tmp_path, quick):
    # uniform weights, the same clip, no noise: clipping on each client or on the server
    # gives the same mean (an equivalence of two paths through the pipeline)
    dp = ["privacy.client.clip=0.05", "privacy.client.noise_multiplier=0"]
    run_experiment(config_from_dict({"name": "a"}, [*quick, *dp]), tmp_path / "server",
                   progress=False)
    run_experiment(config_from_dict({"name": "b"}, [*quick, *dp,
                                                    "privacy.client.side=client"]),
                   tmp_path / "client", progress=False)
    server, client = run_adapters(tmp_path / "server"), run_adapters(tmp_path / "client")
    assert max(float((server[k] - client[k]).abs().max()) for k in server) < 1e-6
    # and the clip bit: without it the adapters differ
    run_experiment(config_from_dict({"name": "c"}, quick), tmp_path / "plain", progress=False)
    plain = run_adapters(tmp_path / "plain")
    assert max(float((server[k] - plain[k]).abs().max()) for k in server) > 1e-4
    assert all(r["client_dp"]["clipped_fraction"] > 0 for r in round_records(tmp_path / "server"))


def test_client_side_noise_with_secure_aggregation_runs_and_is_accounted(tmp_path, quick):
    over = [*quick, "privacy.client.clip=0.05", "privacy.client.noise_multiplier=1.0",
            "privacy.client.side=client", "secagg.enabled=true"]
    summary = run_experiment(config_from_dict({"name": "d"}, over), tmp_path / "d",
                             progress=False)
    rounds = round_records(tmp_path / "d")
    assert all(r["outcome"] == "aggregated" and "secagg" in r for r in rounds)
    assert summary["privacy"]["unit"] == "client"
    assert 0 < summary["privacy"]["epsilon"] < float("inf")


def test_dp_sgd_in_forked_workers_equals_sequential_training(tmp_path, quick):
    # the accountant and the noise stream travel in each client's state, whichever process
    # trains it: the same adapters and the same epsilon
    dp = [*quick, "privacy.sample.max_grad_norm=1.0"]
    seq = run_experiment(config_from_dict({"name": "a"}, dp), tmp_path / "seq",
                         progress=False)
    par = run_experiment(config_from_dict({"name": "b"}, [*dp, "workers=2",
                                                          "train.threads=2"]),
                         tmp_path / "w2", progress=False)
    a, b = run_adapters(tmp_path / "seq"), run_adapters(tmp_path / "w2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert seq["privacy"] == par["privacy"] and seq["privacy"]["epsilon"] > 0

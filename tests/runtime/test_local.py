from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedumm.config import config_from_dict
from fedumm.fl import codecs
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.local import LocalRuntime
from fedumm.runtime.run_dir import RunDirError

SUMMARY_KEYS = [
    ("final", "vqa_accuracy"), ("final", "vqa_by_answer_type"), ("final", "geneval_overall"),
    ("final", "geneval_by_task"), ("communication", "upload_bytes_per_client_round"),
    ("communication", "download_bytes_per_client_round"), ("communication", "full_model_bytes"),
    ("communication", "total_bytes"), ("time", "wall_s"), ("time", "client_train_s"),
    ("memory", "peak_rss_bytes"), ("rounds",), ("clients",),
]


def _cfg(overrides, *extra):
    return config_from_dict({"name": "tiny"}, [*overrides, *extra])


def test_tiny_run_writes_the_run_directory_contract(tmp_path, tiny_overrides):
    summary = run_experiment(_cfg(tiny_overrides), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.md", "accuracy.png",
                 "bytes.png", "adapters/adapter_config.json",
                 "adapters/adapter_model.safetensors", "checkpoint/state.pt"):
        assert (run / name).is_file(), name
    on_disk = json.loads((run / "summary.json").read_text())
    for path in SUMMARY_KEYS:
        node = on_disk
        for part in path:
            node = node[part]
    assert summary["rounds"] == 2 and summary["clients"] == 2
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics if m["type"] == "round"] == [0, 1]
    assert metrics[0]["type"] == "eval" and metrics[0]["round"] == -1  # frozen base first


def test_bytes_are_the_payload_lengths(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides)
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    adapters = load_file(str(tmp_path / "run" / "adapters" / "adapter_model.safetensors"))
    comm = summary["communication"]
    # every client trains every group here, so upload == download == the whole adapter state
    assert comm["download_bytes_per_client_round"] == len(codecs.encode(adapters))
    assert comm["upload_bytes_per_client_round"] == len(codecs.encode(adapters))
    assert comm["total_bytes"] == 2 * 2 * 2 * len(codecs.encode(adapters))
    numel = sum(v.numel() for v in adapters.values())
    assert 4 * numel < comm["upload_bytes_per_client_round"] < 4 * numel * 1.05 + 4096


def test_same_config_and_seed_give_the_same_adapters(tmp_path, tiny_overrides):
    run_experiment(_cfg(tiny_overrides), tmp_path / "a", progress=False)
    run_experiment(_cfg(tiny_overrides), tmp_path / "b", progress=False)
    a = load_file(str(tmp_path / "a" / "adapters" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapters" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedavg_with_one_client_equals_local_training(tmp_path, tiny_overrides):
    fed = run_experiment(_cfg(tiny_overrides, "clients=1", "strategy.name=fedavg"),
                         tmp_path / "fed", progress=False)
    loc = run_experiment(_cfg(tiny_overrides, "clients=1", "strategy.name=local"),
                         tmp_path / "loc", progress=False)
    a = load_file(str(tmp_path / "fed" / "adapters" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "loc" / "adapters" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fed["final"]["vqa_accuracy"] == loc["final"]["vqa_accuracy"]


def test_a_finished_run_is_never_overwritten(tmp_path, tiny_overrides):
    run_experiment(_cfg(tiny_overrides, "rounds=1"), tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match="already holds a finished run"):
        run_experiment(_cfg(tiny_overrides, "rounds=1"), tmp_path / "run", progress=False)


@pytest.mark.parametrize("strategy", ["fedumm", "fedprox", "fedadam", "scaffold"])
def test_every_strategy_runs_end_to_end(tmp_path, tiny_overrides, strategy):
    s = run_experiment(_cfg(tiny_overrides, f"strategy.name={strategy}"), tmp_path / strategy,
                       progress=False)
    assert 0.0 <= s["final"]["vqa_accuracy"] <= 100.0


def test_generation_only_clients_leave_the_vision_adapters_untouched(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides, "partition.scenario=task_split",
               "partition.understanding_clients=0", "data.generation_fraction=0.5",
               "partition.method=iid")
    with pytest.raises(ValueError):  # understanding samples exist but no client may hold them
        run_experiment(cfg, tmp_path / "bad", progress=False)
    rt = LocalRuntime(_cfg(tiny_overrides, "partition.scenario=task_split",
                           "partition.understanding_clients=1", "partition.method=iid"),
                      tmp_path / "x", progress=False)
    kinds = [c.num_samples for c in rt.clients]
    assert sorted(k["understanding"] == 0 for k in kinds) == [False, True]


def test_the_frozen_base_is_scored_on_both_tasks_and_reported(tmp_path, tiny_overrides,
                                                               capsys):
    from fedumm.cli import main

    # eval.every=0 (evaluate only at the end) still scores the base: base -> final needs it
    assert main(["run", "configs/quickstart.yaml", *tiny_overrides, "eval.every=0",
                 "--out", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    base, final = summary["base"], summary["final"]
    for key in ("vqa_accuracy", "geneval_overall", "geneval_by_task"):
        assert key in base and key in final, key
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["round"] == -1 and record["geneval_overall"] == base["geneval_overall"]
    report = (run / "report.md").read_text()
    assert (f"| GenEval overall | {base['geneval_overall']} | {final['geneval_overall']} |"
            in report)
    assert f"| VQA accuracy | {base['vqa_accuracy']} | {final['vqa_accuracy']} |" in report
    out = capsys.readouterr().out
    assert (f"GenEval overall {base['geneval_overall']} -> {final['geneval_overall']}"
            in out)


def test_eval_base_false_skips_the_base_evaluation(tmp_path, tiny_overrides):
    summary = run_experiment(_cfg(tiny_overrides, "eval.base=false", "rounds=1"),
                             tmp_path / "run", progress=False)
    assert summary["base"] == {}
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(m)["round"] != -1 for m in metrics)

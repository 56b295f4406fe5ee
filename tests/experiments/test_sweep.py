from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedumm.config import ConfigError, load_config
from fedumm.experiments.sweep import expand_grid, merge_axes, parse_axis, parse_baseline, run_sweep
from fedumm.runtime.run_dir import RunDirectory

RAW = {"name": "grid", "sweep": {"grid": ["clients=2,4", "partition.alpha=0.1,1.0"],
                                 "baselines": ["strategy.name=centralized clients=1"]}}


class FakeRun:
    """Stands in for run_experiment: writes a run directory with a summary from the config."""

    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on or set()

    def __call__(self, cfg, out, *, resume=False, progress=True):
        d = RunDirectory(out)
        d.create(cfg)
        self.calls.append(out.name)
        if cfg.clients in self.fail_on and cfg.strategy.name != "centralized":
            raise RuntimeError(f"client crashed in {out.name}")
        summary = {"name": cfg.name, "strategy": cfg.strategy.name, "rounds": cfg.rounds,
                   "clients": cfg.clients, "seed": cfg.seed,
                   "final": {"vqa_accuracy": 10.0 * cfg.clients + cfg.partition.alpha,
                             "geneval_by_task": {"colors": 0.5}, "per_client": [1, 2]},
                   "communication": {"total_bytes": 100 * cfg.clients},
                   "time": {"wall_s": 1.5}}
        d.write_summary(summary)
        return summary


def test_parse_axis_reads_values_as_yaml():
    assert parse_axis("partition.alpha=0.1,0.5,1") == ("partition.alpha", [0.1, 0.5, 1])
    assert parse_axis("strategy.name=fedavg,fedumm") == ("strategy.name", ["fedavg", "fedumm"])
    with pytest.raises(ConfigError, match="no values"):
        parse_axis("clients=")
    with pytest.raises(ConfigError, match="repeated"):
        parse_axis("clients=2,2")
    with pytest.raises(ConfigError, match="key=value"):
        parse_axis("clients")
    assert parse_baseline("strategy.name=centralized clients=1") == {
        "strategy.name": "centralized", "clients": 1}


def test_grid_expansion_is_the_product_first_axis_slowest_then_baselines():
    cells = expand_grid([("clients", [2, 4, 8]), ("partition.alpha", [0.1, 1.0])],
                        [{"strategy.name": "centralized"}])
    assert len(cells) == 3 * 2 + 1
    assert [c.values for c in cells[:3]] == [{"clients": 2, "partition.alpha": 0.1},
                                             {"clients": 2, "partition.alpha": 1.0},
                                             {"clients": 4, "partition.alpha": 0.1}]
    assert cells[-1].baseline and cells[-1].values == {"strategy.name": "centralized"}
    assert len({c.name for c in cells}) == len(cells)
    with pytest.raises(ConfigError, match="twice"):
        expand_grid([("clients", [2]), ("clients", [4])])


def test_command_line_axes_replace_the_configs_axis_of_the_same_key():
    axes = merge_axes(["clients=2,4", "partition.alpha=0.1"], ["clients=8", "seed=0,1"])
    assert axes == [("clients", [8]), ("partition.alpha", [0.1]), ("seed", [0, 1])]


def test_sweep_writes_one_row_per_cell_and_rerun_runs_nothing(tmp_path):
    fake = FakeRun()
    result = run_sweep(RAW, tmp_path, run_fn=fake, log=lambda s: None)
    assert len(fake.calls) == 5 and len(result["cells"]) == 5
    row = result["cells"][1]  # clients=2, alpha=1.0
    assert (row["clients"], row["partition.alpha"]) == (2, 1.0)
    assert row["final.vqa_accuracy"] == 21.0 and row["final.geneval_by_task.colors"] == 0.5
    assert "final.per_client" not in row  # lists stay in the run directory
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["cell"] for r in table] == [r["cell"] for r in result["cells"]]
    assert float(table[3]["final.vqa_accuracy"]) == 41.0
    assert result["cells_wall_s"] == 5 * 1.5
    again = FakeRun()
    result2 = run_sweep(RAW, tmp_path, run_fn=again, log=lambda s: None)
    assert again.calls == []
    assert all(r["reused"] for r in result2["cells"])
    assert [r["final.vqa_accuracy"] for r in result2["cells"]] == [
        r["final.vqa_accuracy"] for r in result["cells"]]


def test_a_failed_cell_is_recorded_the_sweep_goes_on_and_rerun_retries_it(tmp_path):
    result = run_sweep(RAW, tmp_path, run_fn=FakeRun(fail_on={4}), log=lambda s: None)
    status = {r["cell"]: r["status"] for r in result["cells"]}
    assert list(status.values()) == ["done", "done", "failed", "failed", "done"]
    failed = result["cells"][2]
    assert "client crashed" in failed["error"]
    assert "RuntimeError" in (tmp_path / failed["cell"] / "error.txt").read_text()
    on_disk = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["status"] for r in on_disk["cells"]] == list(status.values())
    retry = FakeRun()
    result2 = run_sweep(RAW, tmp_path, run_fn=retry, log=lambda s: None)
    assert sorted(retry.calls) == sorted(r["cell"] for r in result["cells"]
                                         if r["status"] == "failed")
    assert all(r["status"] == "done" for r in result2["cells"])
    assert not (tmp_path / failed["cell"] / "error.txt").exists()


def test_bad_grid_value_fails_before_any_cell_runs(tmp_path):
    fake = FakeRun()
    with pytest.raises(ConfigError, match="partition.alpha"):
        run_sweep(RAW, tmp_path, grid=["partition.alpha=0.5,-1"], run_fn=fake, log=print)
    assert fake.calls == []


def test_a_changed_config_does_not_reuse_old_cells(tmp_path):
    run_sweep(RAW, tmp_path, run_fn=FakeRun(), log=lambda s: None)
    with pytest.raises(ConfigError, match="rounds"):
        run_sweep(RAW, tmp_path, overrides=["rounds=9"], run_fn=FakeRun(), log=lambda s: None)


def test_paper_table1_config_is_the_papers_grid():
    import yaml

    from fedumm.config import config_from_dict

    for name, rounds in (("paper_table1", 5), ("paper_table1_full", 100)):
        raw = yaml.safe_load(Path(f"configs/{name}.yaml").read_text())
        cfg = config_from_dict(raw)
        assert (cfg.lora.r, cfg.lora.alpha, cfg.local_epochs, cfg.rounds) == (16, 32, 5, rounds)
        cells = expand_grid(merge_axes(cfg.sweep.grid, []),
                            [parse_baseline(b) for b in cfg.sweep.baselines])
        assert sorted((c.values["clients"], c.values["partition.alpha"])
                      for c in cells if not c.baseline) == [
            (k, a) for k in (2, 4, 8, 16) for a in (0.1, 0.5, 1.0)]
        assert [c.values for c in cells if c.baseline] == [
            {"strategy.name": "centralized", "clients": 1}]


def test_sweep_command_reports_a_bad_axis(tmp_path, capsys):
    from fedumm.cli import main

    assert main(["sweep", "configs/quickstart.yaml", "--grid", "clients=0,2",
                 "--out", str(tmp_path)]) == 2
    assert "clients" in capsys.readouterr().err


METHODS_RAW = {"name": "bench", "sweep": {
    "grid": ["partition.scenario=none,missing_modality"],
    "methods": ["fedavg:", "prox: strategy.name=fedprox strategy.mu=0.1",
                "aug+adagrad: strategy.name=fedadagrad train.prompt_augmentation=true"],
    "baselines": ["strategy.name=centralized"]}}


def test_methods_are_the_last_axis_and_expand_to_their_overrides(tmp_path):
    fake = FakeRun()
    result = run_sweep(METHODS_RAW, tmp_path, run_fn=fake, log=lambda s: None)
    rows = result["cells"]
    assert [(r.get("partition.scenario"), r.get("method")) for r in rows[:4]] == [
        ("none", "fedavg"), ("none", "prox"), ("none", "aug+adagrad"),
        ("missing_modality", "fedavg")]
    assert rows[-1]["baseline"] and len(rows) == 2 * 3 + 1
    saved = load_config(tmp_path / rows[2]["cell"] / RunDirectory.CONFIG)
    assert (saved.strategy.name, saved.train.prompt_augmentation,
            saved.partition.scenario) == ("fedadagrad", True, "none")
    assert load_config(tmp_path / rows[1]["cell"] / RunDirectory.CONFIG).strategy.mu == 0.1
    assert result["methods"]["prox"] == {"strategy.name": "fedprox", "strategy.mu": 0.1}
    with pytest.raises(ConfigError, match="name: key=value"):
        run_sweep({"sweep": {"methods": ["no colon here"]}}, tmp_path / "x", run_fn=fake,
                  log=lambda s: None)
    with pytest.raises(ConfigError, match="same name"):
        run_sweep({"sweep": {"methods": ["a:", "a: seed=1"]}}, tmp_path / "y", run_fn=fake,
                  log=lambda s: None)


def test_cells_in_parallel_give_the_rows_of_a_sequential_sweep(tmp_path):
    seq = run_sweep(RAW, tmp_path / "seq", run_fn=FakeRun(fail_on={4}), log=lambda s: None)
    par = run_sweep(RAW, tmp_path / "par", run_fn=FakeRun(fail_on={4}), jobs=2,
                    log=lambda s: None)
    strip = [{k: v for k, v in r.items() if k != "error"} for r in seq["cells"]]
    assert [{k: v for k, v in r.items() if k != "error"} for r in par["cells"]] == strip
    on_disk = json.loads((tmp_path / "par" / "sweep.json").read_text())
    assert [r["cell"] for r in on_disk["cells"]] == [r["cell"] for r in seq["cells"]]
    with pytest.raises(ValueError, match="jobs"):
        run_sweep(RAW, tmp_path / "z", run_fn=FakeRun(), jobs=0, log=lambda s: None)
    # a cell's process cannot fork client workers: refused before anything runs
    with pytest.raises(ConfigError, match="workers=2 with --jobs 2"):
        run_sweep(RAW, tmp_path / "w", overrides=["workers=2"], run_fn=FakeRun(), jobs=2,
                  log=lambda s: None)
    assert not (tmp_path / "w").exists()
    run_sweep(RAW, tmp_path / "w1", overrides=["workers=2"], run_fn=FakeRun(), jobs=1,
              log=lambda s: None)


def test_fedmllm_benchmark_config_runs_every_scenario_with_every_method():
    import yaml

    from fedumm.config import config_from_dict
    from fedumm.experiments.sweep import parse_method

    raw = yaml.safe_load(Path("configs/fedmllm_benchmark.yaml").read_text())
    cfg = config_from_dict(raw)
    methods = dict(parse_method(m) for m in cfg.sweep.methods)
    cells = expand_grid(merge_axes(cfg.sweep.grid, []),
                        [parse_baseline(b) for b in cfg.sweep.baselines], methods)
    scenarios = {c.values["partition.scenario"] for c in cells if not c.baseline}
    assert scenarios == {"none", "missing_modality", "cross_modal", "hybrid", "task_split"}
    names = {methods[m].get("strategy.name") for m in methods}
    assert names >= {"local", "fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad",
                     "fedyogi", "fedadam", "fedumm"}
    for name in ("fedavg+both", "fedadagrad+both"):
        assert methods[name]["train.prompt_augmentation"] and methods[name]["train.adaptive_prox"]
    for c in cells:  # every cell's config is valid
        config_from_dict(raw, c.overrides())

from __future__ import annotations

import re

import pytest

from fedumm.cli import main
from fedumm.experiments.sweep import run_sweep
from fedumm.experiments.sweep_report import write_sweep_report


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, micro_checkpoint):
    from fedumm.models.reference.micro import MICRO_IMAGE_SIZE

    out = tmp_path_factory.mktemp("sweep")
    overrides = [f"backbone.path={micro_checkpoint}", f"data.image_size={MICRO_IMAGE_SIZE}",
                 "data.train_scenes=40", "data.val_scenes=6", "rounds=2", "train.max_steps=2",
                 "train.batch_size=8", "eval.max_vqa=6", "eval.max_gen=6", "train.threads=1"]
    raw = {"name": "tiny", "sweep": {"grid": ["clients=2", "partition.alpha=0.5,1.0"],
                                     "baselines": ["strategy.name=centralized clients=1"]}}
    result = run_sweep(raw, out, overrides=overrides, progress=False, log=lambda s: None)
    return out, result


def test_report_from_a_tiny_sweep_has_table1_geneval_bytes_and_plots(tiny_sweep, tmp_path):
    out, result = tiny_sweep
    assert [r["status"] for r in result["cells"]] == ["done"] * 3
    path = write_sweep_report(out, tmp_path / "doc")
    text = path.read_text()
    for png in ("table1.png", "convergence.png"):
        assert (tmp_path / "doc" / png).stat().st_size > 1000
        assert f"({png})" in text
    assert len(list((tmp_path / "doc").glob("partition_*.png"))) == 2  # K=2, one per alpha
    central = result["cells"][-1]["final.vqa_accuracy"]
    for row in result["cells"][:2]:
        acc = row["final.vqa_accuracy"]
        expect = f"{acc:.1f} ({100 * acc / central:.1f}%)" if central else f"{acc:.1f}"
        assert expect in text
    assert re.search(r"\| clients \\ partition.alpha \| 0.5 \| 1.0 \|", text)
    for task in ("single_object", "two_object", "counting", "colors", "position", "color_attr"):
        assert task in text
    # communication: the centralized cell sends nothing and is left out of the bytes table
    comm = text.split("## Communication")[1].split("##")[0]
    assert result["cells"][0]["cell"] in comm and "baseline_" not in comm


def test_report_command_for_a_sweep_a_run_and_neither(tiny_sweep, tmp_path, capsys):
    out, result = tiny_sweep
    assert main(["report", str(out), "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "report.md").is_file()
    run = out / result["cells"][0]["cell"]
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    assert "Run report" in (tmp_path / "r" / "report.md").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a sweep" in capsys.readouterr().err


def test_a_benchmark_sweep_reports_one_table_and_plot_per_scenario(tmp_path, micro_checkpoint):
    import numpy as np

    from fedumm.models.reference.micro import MICRO_IMAGE_SIZE

    overrides = [f"backbone.path={micro_checkpoint}", f"data.image_size={MICRO_IMAGE_SIZE}",
                 "data.train_scenes=40", "data.val_scenes=8", "rounds=1", "train.max_steps=2",
                 "train.batch_size=8", "eval.max_vqa=16", "eval.max_gen=2", "train.threads=1",
                 "clients=4", "data.scene_text=0.6", "data.families=[spatial,shape_at]",
                 "eval.classification=[spatial,shape_at]", "eval.every=1",
                 "partition.image_only_clients=2", "train.adaptive_prox_skip=0"]
    raw = {"name": "bench", "sweep": {
        "grid": ["partition.scenario=none,cross_modal", "seed=0,1"],
        "methods": ["fedavg:", "both: strategy.name=fedadagrad strategy.server_lr=0.01 "
                    "train.prompt_augmentation=true train.adaptive_prox=true"],
        "baselines": ["strategy.name=centralized"]}}
    result = run_sweep(raw, tmp_path / "s", overrides=overrides, progress=False,
                       log=lambda s: None)
    assert [r["status"] for r in result["cells"]] == ["done"] * 9
    text = write_sweep_report(tmp_path / "s", tmp_path / "doc").read_text()
    assert "Table 1" not in text and "Mean ± std over seeds [0, 1]" in text
    for scenario in ("none", "cross_modal"):
        section = text.split(f"## partition.scenario = {scenario}")[1].split("## ")[0]
        assert (tmp_path / "doc" / f"scenario_{scenario}.png").stat().st_size > 1000
        lines = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines()
                 if line.startswith("| ") and "---" not in line and "method" not in line}
        assert list(lines) == ["zero-shot (frozen base)", "fedavg", "both", "centralized"]
        vqa = [r["final.vqa_accuracy"] for r in result["cells"]
               if r.get("method") == "fedavg" and r.get("partition.scenario") == scenario]
        assert f"{np.mean(vqa):.2f} ± {np.std(vqa):.2f}" in lines["fedavg"]
        assert "**" in lines["fedavg"] + lines["both"]  # the best method per column
    row = result["cells"][0]
    assert row["final.auc"] is not None and row["final.macro_f1"] is not None

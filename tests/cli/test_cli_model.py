from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fedumm.cli import main
from fedumm.data.export import export_official
from fedumm.data.readers.shapes import generate_shapes
from makers import run_cli


@pytest.mark.parametrize("aggregation", ["separate", "exact"])
def test_evaluate_a_run_directory_gives_its_summary_numbers(tmp_path, capsys, tiny_overrides,
                                                            aggregation):
    run = str(tmp_path / "r")
    assert main(["run", "configs/quickstart.yaml", *tiny_overrides,
                 f"lora.aggregation={aggregation}", "--out", run, "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["clients"] == 2
    assert main(["evaluate", run, "--json"]) == 0  # its own held-out data and eval settings
    res = json.loads(capsys.readouterr().out)
    assert {k: res[k] for k in summary["final"]} == summary["final"]
    assert main(["evaluate", run]) == 0
    assert "= summary.json's final numbers" in capsys.readouterr().out
    # a generated ShapesWorld question set instead, when asked for one
    assert main(["evaluate", run, "--split", "downstream", "--scenes", "6", "--max-vqa", "6",
                 "--max-gen", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"vqa_accuracy", "geneval_overall"} <= set(res) and res["num_vqa"] == 6


def test_export_merged_then_evaluate_and_generate(tmp_path, capsys, tiny_overrides):
    run, merged = str(tmp_path / "r"), tmp_path / "merged"
    assert main(["run", "configs/quickstart.yaml", *tiny_overrides, "lora.aggregation=exact",
                 "--out", run, "--quiet", "--json"]) == 0
    capsys.readouterr()
    assert main(["export", run, "--merged", str(merged)]) == 0
    assert f"merged model: {merged}" in capsys.readouterr().out
    assert (merged / "model.safetensors").is_file()
    assert main(["evaluate", str(merged), "--scenes", "4", "--max-vqa", "4", "--max-gen", "2",
                 "--json"]) == 0
    assert "vqa_accuracy" in json.loads(capsys.readouterr().out)
    out = tmp_path / "g.png"
    assert main(["generate", run, "a photo of a red circle", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    code, err = run_cli(["export", run])
    assert code == 2 and "--merged" in err


def test_resume_flag_refuses_a_config(tmp_path, capsys):
    assert main(["run", "configs/quickstart.yaml", "--resume", str(tmp_path)]) == 2
    assert "--resume DIR continues a run" in capsys.readouterr().err


def test_generate_writes_a_grid(tmp_path, capsys, micro_checkpoint):
    out = tmp_path / "g.png"
    assert main(["generate", str(micro_checkpoint), "a photo of a red circle", "--out",
                 str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_eval_vqa_and_geneval_commands_on_exported_files(tmp_path, capsys):
    data = generate_shapes("downstream", 10, seed=0)
    paths = export_official(data, tmp_path, "shapes_val")
    results = [{"question_id": r.question_id, "answer": r.multiple_choice_answer}
               for r in data.vqa]
    (tmp_path / "res.json").write_text(json.dumps(results))
    q = paths["vqa"] / "v2_OpenEnded_mscoco_shapes_val_questions.json"
    a = paths["vqa"] / "v2_mscoco_shapes_val_annotations.json"
    assert main(["eval", "vqa", "--questions", str(q), "--annotations", str(a), "--results",
                 str(tmp_path / "res.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] > 90.0  # noise 0.1: a few disagree
    gdir = paths["geneval"]
    assert main(["eval", "geneval", "--metadata", str(gdir / "evaluation_metadata.jsonl"),
                 "--images", str(gdir / "targets"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] >= 0.95
    # a blank image for every prompt scores zero
    for png in (gdir / "targets").glob("*/samples/*.png"):
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(png)
    assert main(["eval", "geneval", "--metadata", str(gdir / "evaluation_metadata.jsonl"),
                 "--images", str(gdir / "targets"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] == 0.0


def test_pretrain_uses_the_recipe_defaults_unless_told(monkeypatch, tmp_path):
    import fedumm.models.reference.pretrain as pretrain_mod

    seen = []
    monkeypatch.setattr(pretrain_mod, "pretrain", lambda cfg, out, progress: seen.append(cfg)
                        or out)
    assert main(["pretrain", "--out", str(tmp_path), "--quiet"]) == 0
    assert main(["pretrain", "--out", str(tmp_path), "--steps", "7", "--seed", "3",
                 "--max-minutes", "1.5", "--quiet"]) == 0
    default = pretrain_mod.PretrainConfig()
    assert (seen[0].steps, seen[0].max_minutes, seen[0].seed) == (default.steps,
                                                                  default.max_minutes, 0)
    assert (seen[1].steps, seen[1].max_minutes, seen[1].seed) == (7, 1.5, 3)

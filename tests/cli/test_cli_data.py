from __future__ import annotations

import json

from fedumm.cli import main
from fedumm.data.readers.geneval_files import load_geneval_metadata
from fedumm.data.readers.vqa_v2_files import load_vqa_v2


def test_partition_json_contract(capsys):
    assert main(["partition", "--clients", "5", "--alpha", "0.5", "--seed", "1", "--json",
                 "data.train_scenes=100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["clients"]) == 5
    assert {"id", "num_samples", "label_counts"} <= set(out["clients"][0])
    assert 0.0 <= out["heterogeneity"]["tv_mean"] <= 1.0


def test_partition_table_writes_a_heat_map(tmp_path, capsys):
    png = tmp_path / "heat.png"
    assert main(["partition", "--clients", "3", "--out", str(png), "data.train_scenes=50"]) == 0
    assert "heat map:" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_override_is_a_clear_error(capsys):
    assert main(["partition", "--json", "partition.alpha=-1"]) == 2
    assert "partition.alpha: expected a value > 0" in capsys.readouterr().err


def test_preview_and_export_round_trip_through_the_official_readers(tmp_path, capsys):
    assert main(["data", "preview", "--out", str(tmp_path), "--splits", "base"]) == 0
    assert (tmp_path / "preview_base.png").is_file()
    assert main(["data", "export", "--out", str(tmp_path / "x"), "--scenes", "12"]) == 0
    vqa = load_vqa_v2(tmp_path / "x" / "vqa", "shapes_downstream_val")
    assert len(vqa) == 24 and vqa.image(vqa.records[0].image_id).shape == (48, 48, 3)
    gen = load_geneval_metadata(tmp_path / "x" / "geneval" / "evaluation_metadata.jsonl")
    assert len(gen) == 24

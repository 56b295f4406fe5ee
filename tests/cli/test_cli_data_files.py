"""``fedumm data check`` and ``fedumm data export --format llava`` on the user's-files path."""

from __future__ import annotations

import json

from fedumm.cli import main


def test_exported_llava_files_check_clean_and_a_bad_record_is_named(tmp_path, capsys):
    out = tmp_path / "files"
    assert main(["data", "export", "--format", "llava", "--scenes", "6", "--out", str(out)]) == 0
    capsys.readouterr()
    args = ["data", "check", "data.format=files", f"data.understanding={out}/llava.json",
            f"data.generation={out}/t2i", "data.heldout_fraction=0.2"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    records = json.loads((out / "llava.json").read_text())
    n_und = report["train"]["understanding"]["samples"] + report["val"]["understanding"]["samples"]
    assert n_und == len(records) and report["val"]["generation"]["samples"] > 0
    assert report["train"]["generation"]["with_image"] == report["train"]["generation"]["samples"]
    assert report["example"]["understanding"]["text"] == records[0]["conversations"][0][
        "value"].removeprefix("<image>\n")

    records[3]["image"] = "images/missing.png"
    (out / "llava.json").write_text(json.dumps(records))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "llava.json: index 3: image not found" in err and "missing.png" in err


def test_partition_accepts_the_alpha_it_prints(capsys):
    assert main(["partition", "--alpha", "0.00001", "--clients", "2", "--json",
                 "data.train_scenes=20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["clients"]) == 2

"""``fedumm backbone check``: tiny saved folders of each kind pass, and each broken folder is
named by the check that finds it (missing files, an unknown size, a Janus codebook whose rows
have different norms, a BLIP3o folder without generation parts)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedumm.cli import main
from fedumm.config import BackboneConfig
from fedumm.models.conformance import FAIL, OK, WARN, check_backbone
from fedumm.models.janus.presets import preset_config
from fedumm.models.kinds import build_backbone
from makers import blip3o_tiny

CODEBOOK = "model.vqmodel.quantize.embedding.weight"


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    bb = build_backbone(BackboneConfig(kind="janus", preset="tiny", device="cpu"))
    return bb.save(tmp_path_factory.mktemp("janus") / "ck")


@pytest.fixture(scope="module")
def blip3o(tmp_path_factory):
    return blip3o_tiny().save(tmp_path_factory.mktemp("blip3o") / "ck")


def by_check(report) -> dict[str, list]:
    out: dict[str, list] = {}
    for c in report.checks:
        out.setdefault(c.check, []).append(c)
    return out


def only(report, name):
    (c,) = by_check(report)[name]
    return c


def copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


@pytest.mark.parametrize("name", ["janus", "blip3o", "base"])
def test_good_folders_pass_and_name_their_kind(name, request):
    path = "base" if name == "base" else request.getfixturevalue(name)
    report = check_backbone(path)
    assert not report.failed, report.lines()
    assert report.kind == ("reference" if name == "base" else name)
    assert only(report, "kind").status == OK
    if name != "base":
        assert only(report, "config").message.startswith("matches tiny")
        assert only(report, "chat template").status == OK
    assert {c.status for c in report.checks} == {OK}


def test_missing_tokenizer_or_weights_fail_naming_the_file(janus, blip3o, tmp_path):
    bare = copy(janus, tmp_path)
    (bare / "tokenizer.json").unlink()
    report = check_backbone(bare)
    assert report.failed and "tokenizer.json" in only(report, "tokenizer").message
    (bare / "model.safetensors").unlink()
    report = check_backbone(bare)
    assert only(report, "files").status == FAIL
    assert "model.safetensors" in only(report, "files").message
    assert only(report, "weights").status == FAIL
    other = shutil.copytree(blip3o, tmp_path / "b")
    (other / "tokenizer.json").unlink()
    assert "tokenizer.json" in only(check_backbone(other), "tokenizer").message


def test_a_missing_special_token_fails_by_name(blip3o, tmp_path):
    path = copy(blip3o, tmp_path)
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["added_tokens"] = [a for a in tok["added_tokens"] if a["content"] != "[IMG]"]
    del tok["model"]["vocab"]["[IMG]"]
    (path / "tokenizer.json").write_text(json.dumps(tok))
    c = only(check_backbone(path), "tokenizer")
    assert c.status == FAIL and "[IMG]" in c.message


def _rewrite_codebook(path, scale_first: float) -> None:
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as st:
        state = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    book = torch.nn.functional.normalize(state[CODEBOOK], dim=-1) * 0.5
    book[0] *= scale_first
    state[CODEBOOK] = book
    save_file(state, str(file), metadata={"format": "pt"})


def test_the_janus_codebook_norms_are_reported(janus, tmp_path):
    path = copy(janus, tmp_path)
    _rewrite_codebook(path, 1.0)
    c = only(check_backbone(path), "codebook")
    assert c.status == OK and "equal norms" in c.message and "agree" in c.message
    _rewrite_codebook(path, 1.5)
    c = only(check_backbone(path), "codebook")
    assert c.status == OK and "differ by up to 50.0%" in c.message
    assert "official normalised lookup" in c.message


def test_an_understanding_only_blip3o_folder_warns(blip3o, tmp_path):
    path = copy(blip3o, tmp_path)
    shutil.rmtree(path / "target_encoder")
    (path / "patch_decoder.safetensors").unlink()
    report = check_backbone(path)
    c = only(report, "parts")
    assert not report.failed and c.status == WARN
    assert "understanding-only: generation clients cannot train" in c.message
    assert "target_encoder/" in c.message


def test_a_changed_size_names_the_keys_that_differ_from_the_nearest_preset(janus, blip3o,
                                                                          tmp_path):
    path = copy(janus, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["hidden_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    c = only(check_backbone(path), "config")
    assert c.status == WARN and "nearest tiny" in c.message
    assert "text.hidden_size=96 (tiny: 64)" in c.message
    # the published size is recognised from its config alone
    big = preset_config("janus-pro-1b").to_dict()
    (path / "config.json").write_text(json.dumps(big))
    assert only(check_backbone(path), "config").message.startswith("matches janus-pro-1b")
    other = shutil.copytree(blip3o, tmp_path / "b")
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(config))
    c = only(check_backbone(other), "config")
    assert c.status == WARN and "text.num_hidden_layers=3 (tiny: 2)" in c.message


def test_empty_unknown_and_missing_folders_are_clear_errors(janus, tmp_path):
    (tmp_path / "empty").mkdir()
    report = check_backbone(tmp_path / "empty")
    assert report.failed and report.kind is None
    assert "empty folder without config.json" in only(report, "kind").message
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "model_type='llama'" in only(check_backbone(tmp_path / "llama"), "kind").message
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_backbone(tmp_path / "nothing")
    forced = check_backbone(janus, kind="blip3o")
    assert only(forced, "kind").status == WARN and forced.failed


def test_cli_prints_lines_or_json_and_exits_1_on_fail(janus, tmp_path, capsys):
    assert main(["backbone", "check", str(janus)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("OK    kind: janus")
    assert any(line.startswith("OK    codebook:") for line in out)
    assert main(["backbone", "check", "base", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == "reference" and record["ok"]
    assert {"check", "status", "message"} <= set(record["checks"][0])
    (tmp_path / "empty").mkdir()
    assert main(["backbone", "check", str(tmp_path / "empty"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    assert main(["backbone", "check", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err

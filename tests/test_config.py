from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fedumm.config import ConfigError, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_and_dotted_overrides():
    cfg = config_from_dict({}, ["partition.alpha=0.1", "clients=16"])
    assert cfg.partition.alpha == 0.1
    assert cfg.clients == 16
    assert cfg.partition.method == "dirichlet"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert config_from_dict({"partition": {"alpha": 1}}).partition.alpha == 1.0
    with pytest.raises(ConfigError, match=r"clients: expected an integer"):
        config_from_dict({"clients": 2.5})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("partition.alhpa=1", r"unknown key partition\.alhpa"),
        ("clients=0", r"clients: expected a value >= 1"),
        ("partition.alpha=0", r"partition\.alpha: expected a value > 0"),
        ("partition.method=round_robin", r"partition\.method: expected one of"),
        ("rounds=many", r"rounds: expected an integer, got 'many'"),
        ("partition=3", r"partition: expected a mapping"),
        ("noequals", r"expected key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, [override])


def test_resolved_config_round_trips(tmp_path):
    cfg = config_from_dict({"name": "x"}, ["seed=3", "partition.label=tag"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["partition"]["label"] == "tag"


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_says_how_to_run_it(path):
    load_config(path)
    assert path.read_text().startswith("# fedumm "), "configs start with the command that runs them"


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "+1e-3", "0.001"])
def test_yaml_1_2_numbers_are_numbers(text, tmp_path):
    assert load_config(None, [f"train.lr={text}"]).train.lr == 0.001
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {text}\n")
    assert load_config(path).train.lr == 0.001


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.grad_clip=.nan",
                                      "partition.alpha=-.inf", "train.lr=nan"])
def test_non_finite_numbers_are_refused_by_name(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: expected (a finite number|a "
                                          "number)"):
        load_config(None, [override])


def test_unreadable_configs_are_one_line_errors(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(latin)
    int_key = tmp_path / "int.yaml"
    int_key.write_text("train:\n  1: 2\n")
    with pytest.raises(ConfigError, match=r"key train\.1 is not a name"):
        load_config(int_key)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path)  # a folder


def test_pretraining_never_replaces_a_checkpoint(tmp_path):
    from fedumm.models.reference.pretrain import PretrainConfig, pretrain

    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.safetensors").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        pretrain(PretrainConfig(steps=1), tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_text() == "mine"


# ---- every load error is a ConfigError naming the file, override or key


def test_alias_cycles_and_alias_bombs_name_the_file(tmp_path):
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("train: &t {lr: *t}\n")
    with pytest.raises(ConfigError, match=r"cycle\.yaml: train\.lr refers to a value that "
                                          r"holds it \(a YAML alias cycle\)"):
        load_config(cycle)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join(['*a' + ('' if i == 1 else str(i - 1))] * 10)}]\n"
        for i in range(1, 8)))
    with pytest.raises(ConfigError, match=r"bomb\.yaml: more than 100000 values once YAML "
                                          "aliases are expanded"):
        load_config(bomb)
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: not valid YAML \(nested too deeply\)"):
        load_config(deep)


@pytest.mark.parametrize("override, message", [
    ("clients=[1", r"override 'clients=\[1': the value of clients: not valid YAML \(line 1"),
    ("name=&a [*a]", r"override 'name=&a \[\*a\]': name\[0\] refers to a value that holds"),
    ("train={1: 2}", r"override 'train=\{1: 2\}': key train\.1 is not a name"),
    ("name={[1]: 2}", r"override 'name=\{\[1\]: 2\}': the value of name: not valid YAML"),
    ("name=..", r"name: expected a run name \(printable, no '\.\.'\)"),
    ("seed=99999999999999999999", r"seed: expected a value <= 9223372036854775807"),
])
def test_bad_override_values_name_the_override(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_an_optional_package_a_setting_needs_is_refused_at_load(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` fails
    with pytest.raises(ConfigError, match=r"codec\.upload: codec step 'zstd' needs the "
                                          r"optional 'zstandard' package \(pip install "
                                          r"zstandard\)"):
        load_config(None, ["codec=topk:0.1+int8+zstd"])
    assert load_config(None, ["codec=int8+zlib"]).codec.upload == "int8+zlib"

    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match=r"data\.generation: .*train\.parquet is read as hf "
                                          r"data, which needs the optional package 'datasets' "
                                          r"\(pip install 'fedumm\[hf\]'\)"):
        load_config(None, ["data.format=files", f"data.generation={tmp_path}/*.parquet"])
    # other formats need nothing optional; a missing path is left to the readers
    load_config(None, ["data.format=files", f"data.understanding={tmp_path}/u.jsonl"])

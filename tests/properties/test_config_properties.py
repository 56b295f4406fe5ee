"""Property tests of the config loader: random YAML documents and ``key=value`` overrides
either load into a Config that saves and reloads to itself, or raise one ConfigError naming
the file, override or key. Never another exception, never a hang (the profile's deadline)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedumm.config import Config, ConfigError, config_from_dict, load_config, read_yaml

# Every dotted key of the config (and a few that are not), so overrides hit real fields
KEYS: list[str] = []


def _keys(cls: type, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            KEYS.append(prefix + f.name)
            _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            KEYS.append(prefix + f.name)


_keys(Config)
KEY = st.sampled_from([*KEYS, "nope", "train.nope", "codec", "train.lr.x", "a..b", " "])

# YAML scalars as users write them, and text that is not YAML at all
SCALAR_TEXT = st.one_of(
    st.sampled_from(["0", "1", "-1", "3", "1e-3", "1e400", ".nan", ".inf", "-.inf", "true",
                     "null", "~", "[]", "{}", "[1, 2]", "{a: 1}", "fedavg", "int8+zstd",
                     "topk:0.1+int8+zlib", "nf4:block=0", "&a [*a]", "[1", "{", "'", "!!binary x",
                     "!!python/object:os.system {}", "2020-01-01", "0x10", "1_000", "*x",
                     "cuda:99999999999999999999", "&a {b: *a}", "{1: 2}", "{[1]: 2}", "- a\n- b",
                     "a: b: c", "99999999999999999999999", "\t", "%YAML 1.1", "---"]),
    st.text(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
OVERRIDE = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", KEY, SCALAR_TEXT),
    st.text(max_size=30),
)


def assert_clear(exc: BaseException, *names: str) -> None:
    """The error contract: a ConfigError, one line, naming one of ``names``."""
    assert isinstance(exc, ConfigError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message and "\n" not in message, repr(message)
    if names:
        assert any(n in message for n in names), message


def assert_roundtrip(cfg: Config, tmp: Path) -> None:
    """A config that loaded saves and reloads to the same values (what a run directory does)."""
    path = tmp / "saved.yaml"
    cfg.save(path)
    assert load_config(path).to_dict() == cfg.to_dict()


@given(st.lists(OVERRIDE, max_size=6))
@settings(max_examples=150)
def test_overrides_load_or_name_the_override(tmp_path_factory, overrides):
    try:
        cfg = load_config(None, overrides)
    except Exception as exc:  # noqa: BLE001 (the property: which exceptions, what message)
        keys = [o.split("=", 1)[0].strip() for o in overrides]
        prefixes = [".".join(k.split(".")[:n]) for k in keys for n in range(1, 4)]
        assert_clear(exc, "override", *filter(None, prefixes), "codec", "config")
    else:
        assert_roundtrip(cfg, tmp_path_factory.mktemp("rt"))


# Nested values of the kinds YAML produces (no aliases: safe_dump writes each value out)
LEAF = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**66), max_value=2**66),
                 st.floats(), st.text(max_size=12), st.sampled_from(["fedavg", "int8", "files"]))
VALUE = st.recursive(LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS + ["x"]), st.integers(-3, 3)), inner,
                    max_size=4)), max_leaves=12)
SECTION = st.dictionaries(st.sampled_from([k.split(".")[-1] for k in KEYS]), VALUE, max_size=4)
DOCUMENT = st.dictionaries(st.sampled_from([k for k in KEYS if "." not in k] + ["nope"]),
                           st.one_of(VALUE, SECTION), max_size=5)


@given(DOCUMENT)
@settings(max_examples=150)
def test_yaml_documents_load_or_name_the_key(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("doc") / "c.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        cfg = load_config(path)
    except Exception as exc:  # noqa: BLE001
        assert_clear(exc, str(path), *map(str, doc), "config")
    else:
        assert_roundtrip(cfg, path.parent)


# Raw text: anchors, aliases, tags, tabs, deep nesting, binary junk, other encodings
RAW = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
    st.sampled_from([
        "a: &x [*x]\n", "train: &t {lr: *t}\n", "a: &a [1]\nb: &b [*a, *a]\nc: [*b, *b]\n",
        "x: !!python/name:os.system\n", "clients: !!float 3\n", "name: !!binary aGVsbG8=\n",
        "? [1, 2]\n: 3\n", "1: 2\n", "null: 1\n", "true: 1\n", "train:\n  1: 2\n",
        "[" * 2000 + "]" * 2000, "a:" + " {b:" * 500 + " 1" + "}" * 500 + "\n",
        "codec: int8+zstd\n", "data: {format: files, understanding: /nonexistent/x.parquet}\n",
        "seed: 99999999999999999999999\n", "name: ../../escape\n", "name: ''\n",
        "rounds: 1e400\n", "train: {lr: .nan}\n", "\ufeffname: bom\n", "--- a\n--- b\n",
    ]),
)


@given(RAW)
@settings(max_examples=120)
def test_raw_config_text_loads_or_names_the_file(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("raw") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load_config(path)
    except Exception as exc:  # noqa: BLE001
        assert_clear(exc)  # names the file, or the key the file got wrong
    else:
        assert_roundtrip(cfg, path.parent)


def _billion_laughs(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@given(st.integers(min_value=1, max_value=9))
@settings(max_examples=9)
def test_alias_expansion_is_bounded(tmp_path_factory, levels):
    """10 ** levels values once expanded: refused by size, quickly, not walked."""
    path = tmp_path_factory.mktemp("laughs") / "c.yaml"
    path.write_text(_billion_laughs(levels))
    try:
        read_yaml(path)
    except Exception as exc:  # noqa: BLE001
        assert_clear(exc, str(path))
        assert "aliases" in str(exc) or "values" in str(exc)
    else:
        assert 10 ** levels <= 100_000


@given(st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=4), inner, max_size=3), max_leaves=20))
@settings(max_examples=80)
def test_config_from_dict_takes_any_value(raw):
    """The API entry (sweeps build cells with it) has the same contract as files."""
    try:
        config_from_dict(raw)
    except Exception as exc:  # noqa: BLE001
        assert_clear(exc)

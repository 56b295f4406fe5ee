"""Property tests of the command line: random argv for every subcommand either reaches its
handler with arguments in range, or ends with argparse's / fedumm's one-line error and exit
code 2 — never a traceback. Handlers are replaced by a recorder (the subcommands that train
would take minutes); ``data check`` and ``partition --json`` also run for real, in a
temporary folder, and must not write anywhere else."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fedumm.cli as cli
from makers import run_cli


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
            ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(subcommand words, parser) of every runnable subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    return [leaf for name, p in subs[0].choices.items() for leaf in _leaves(p, (*path, name))]


LEAVES = _leaves(cli.build_parser())
COMMANDS = [" ".join(words) for words, _ in LEAVES]

NUMBERS = st.one_of(
    st.integers(min_value=-3, max_value=5).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "-0", "0.0", "1e-9", "2**8", "0x10",
                     "99999999999999999999999", "  7 ", "١٢", "", "-", "--", "5.5", "1_000"]),
    st.floats(allow_nan=True).map(repr),
)
WORDS = st.one_of(NUMBERS, st.text(max_size=12),
                  st.sampled_from(["clients=2", "rounds=0", "codec=int8+zstd", "seed=-1",
                                   "train.lr=nan", "a=b=c", "=", "x", "-x", "--x=1", "base"]))


@st.composite
def argvs(draw: st.DrawFn, leaf: int) -> list[str]:
    words, parser = LEAVES[leaf]
    argv = list(words)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    for action in draw(st.lists(st.sampled_from(options), max_size=4)) if options else []:
        argv.append(draw(st.sampled_from(action.option_strings)))
        if action.nargs == 0:
            continue
        if action.choices and draw(st.booleans()):
            argv.append(str(draw(st.sampled_from(list(action.choices)))))
        else:
            argv.append(draw(WORDS))
    argv += draw(st.lists(WORDS, max_size=3))  # positionals and overrides, or junk
    return argv


# the numbers each handler may rely on, by argument name
AT_LEAST_ONE = ("clients", "scenes", "jobs", "steps")
AT_LEAST_ZERO = ("seed", "max_vqa", "max_gen")
FINITE = ("alpha", "cfg_scale", "max_minutes")


def _check_ranges(args: argparse.Namespace) -> None:
    for name in AT_LEAST_ONE:
        value = getattr(args, name, None)
        assert value is None or (isinstance(value, int) and value >= 1), (name, value)
    for name in AT_LEAST_ZERO:
        value = getattr(args, name, None)
        assert value is None or (isinstance(value, int) and value >= 0), (name, value)
    for name in FINITE:
        value = getattr(args, name, None)
        assert value is None or math.isfinite(value), (name, value)


def assert_clean_exit(code: int, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    if code != 0:  # argparse's usage and error lines (they repeat a bad argument as given)
        assert code == 2 and "error:" in stderr, (code, stderr)


@pytest.fixture()
def recorded():
    """Every handler replaced by one that checks the parsed numbers and returns 0."""
    calls: list[argparse.Namespace] = []

    def handler(args: argparse.Namespace) -> int:
        _check_ranges(args)
        calls.append(args)
        return 0

    names = [n for n in dir(cli) if n.startswith("_cmd_")]
    saved = {n: getattr(cli, n) for n in names}
    for n in names:
        setattr(cli, n, handler)
    yield calls
    for n, f in saved.items():
        setattr(cli, n, f)


@pytest.mark.parametrize("leaf", range(len(LEAVES)), ids=COMMANDS)
def test_random_argv_reaches_the_handler_in_range_or_fails_cleanly(recorded, leaf):
    @given(argvs(leaf))
    @settings(max_examples=25)
    def check(argv: list[str]) -> None:
        code, stderr = run_cli(argv)
        assert_clean_exit(code, stderr)

    check()


@pytest.mark.parametrize("argv", [
    ["evaluate", "base", "--scenes", "0"], ["evaluate", "base", "--max-vqa", "-5"],
    ["generate", "base", "p", "--cfg-scale", "nan"], ["sweep", "c.yaml", "--jobs", "0"],
    ["data", "export", "--out", "x", "--scenes", "0"], ["partition", "--alpha", "inf"],
    ["pretrain", "--out", "x", "--max-minutes", "nan"], ["partition", "--seed", "-1"],
])
def test_the_reported_arguments_are_usage_errors(recorded, argv):
    code, stderr = run_cli(argv)
    assert code == 2 and "error: argument" in stderr and "Traceback" not in stderr


# ---- real handlers of the cheap subcommands, on small generated data

SMALL = ["data.train_scenes=3", "data.val_scenes=2", "data.image_size=16"]
PLAUSIBLE = st.one_of(  # mostly values of the right kind, so the handlers run
    st.integers(min_value=-1, max_value=9).map(str),
    st.floats(min_value=0, max_value=1).map(lambda x: f"{x:.2f}"),
    st.sampled_from(["iid", "dirichlet", "quantity_skew", "domain", "answer", "tag", "family",
                     "modality", "base", "downstream", "none", "missing_modality", "hybrid",
                     "task_split", "task_hybrid", "counting", "[spatial, color]", "shapes"]),
)
DATA_OVERRIDES = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from([
        "data.format", "data.split", "data.max_objects", "data.questions_per_image",
        "data.generation_fraction", "data.families", "data.scene_text", "data.understanding",
        "data.seed", "partition.method", "partition.alpha", "partition.label",
        "partition.scenario", "partition.min_per_client", "partition.missing_rate",
        "partition.hybrid_q", "clients", "seed"]), st.one_of(PLAUSIBLE, PLAUSIBLE, WORDS)),
    st.sampled_from(["data.format=files", "data.understanding=missing.jsonl",
                     "data.families=[counting]", "partition.method=iid",
                     "data.generation_fraction=0.99", "partition.scenario=cross_modal"])),
    max_size=4)


@given(DATA_OVERRIDES, st.sampled_from([["data", "check"], ["data", "check", "--json"],
                                        ["partition", "--json"]]))
@settings(max_examples=40, deadline=None)  # a shapes draw can take a moment on a busy core
def test_cheap_subcommands_run_or_fail_cleanly_and_write_nowhere_else(guard, overrides, cmd):
    with tempfile.TemporaryDirectory() as tmp:
        old = os.getcwd()
        os.chdir(tmp)
        try:
            with guard(Path(tmp)) as outside:
                code, stderr = run_cli([*cmd, *overrides, *SMALL])
        finally:
            os.chdir(old)
        event(f"exit {code}")
        assert_clean_exit(code, stderr)
        assert not outside, outside

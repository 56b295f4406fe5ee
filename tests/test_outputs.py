"""The output policy (``fedumm/outputs.py``) for every command that writes.

For each command: a folder holding a user's file is refused and left untouched; a new and an
empty folder are accepted; a re-run into the command's own folder is accepted (a finished run
or checkpoint is refused); path mix-ups are one clear error. A full disk at every write point
of every command is one ``fedumm: error:`` line naming the file, with no ``*.tmp`` and no
file that looks complete but is not, and the command then succeeds when run again.
"""

from __future__ import annotations

import copy
import errno
import functools
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from fedumm import outputs
from fedumm.cli import main
from fedumm.config import config_from_dict
from fedumm.models.reference.micro import MICRO_IMAGE_SIZE
from fedumm.outputs import OutputError, OutputExistsError, OutputFolder, write_file
from fedumm.runtime.run_dir import RunDirectory

REAL_WRITE = outputs._write


@dataclass
class Ctx:
    """What the commands need: a tiny config, a finished run, a sweep, a checkpoint."""

    root: Path
    checkpoint: Path
    tiny: list[str]
    cfg_file: Path
    sweep_cfg: Path
    run: Path
    sweep: Path
    summary: dict
    metrics: list[dict]


def _fake_run(summary: dict, metrics: list[dict]) -> Callable:
    """``run_experiment`` for sweeps: a run folder with a real run's summary, in no time."""
    def run(cfg, out, *, resume=False, progress=True):
        d = RunDirectory(out)
        with d.lock():
            if not resume:
                d.create(cfg)
            d.write_text(d.METRICS, "".join(json.dumps(m) + "\n" for m in metrics))
            result = {**summary, "name": cfg.name, "clients": cfg.clients}
            d.write_summary(result)
        return result
    return run


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, micro_checkpoint) -> Ctx:
    from fedumm.experiments.sweep import run_sweep
    from fedumm.runtime.dispatch import run_experiment

    root = tmp_path_factory.mktemp("outputs")
    tiny = [f"backbone.path={micro_checkpoint}", f"data.image_size={MICRO_IMAGE_SIZE}",
            "data.train_scenes=40", "data.val_scenes=6", "clients=2", "rounds=1",
            "train.max_steps=2", "train.batch_size=8", "eval.max_vqa=6", "eval.max_gen=3",
            "partition.alpha=1.0", "train.threads=1"]
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text("name: outputs\n")
    sweep_cfg = root / "sweep.yaml"
    sweep_cfg.write_text("name: outsweep\nsweep:\n  grid: ['clients=1,2']\n")
    run = root / "run"
    summary = run_experiment(config_from_dict({"name": "outputs"}, tiny), run, progress=False)
    metrics = RunDirectory(run).metrics()
    sweep = root / "sweep"
    run_sweep(yaml.safe_load(sweep_cfg.read_text()), sweep, overrides=tiny,
              run_fn=_fake_run(summary, metrics), progress=False, log=lambda s: None)
    return Ctx(root, micro_checkpoint, tiny, cfg_file, sweep_cfg, run, sweep, summary, metrics)


@pytest.fixture()
def fast(monkeypatch, ctx):
    """Sweeps run the fake runs; pretraining takes a small recipe (seconds)."""
    import fedumm.experiments.sweep as sweep_mod
    import fedumm.models.reference.pretrain as pretrain_mod

    monkeypatch.setattr(sweep_mod, "run_sweep", functools.partial(
        sweep_mod.run_sweep, run_fn=_fake_run(ctx.summary, ctx.metrics)))
    monkeypatch.setattr(pretrain_mod, "PretrainConfig", functools.partial(
        pretrain_mod.PretrainConfig, train_scenes=30, batch_size=4, vqa_batch=4, warmup=1))
    # the data and the fitted initial model are made once (most of a tiny pretraining's time)
    monkeypatch.setattr(pretrain_mod, "generate_shapes", _memo(pretrain_mod.generate_shapes))
    monkeypatch.setattr(pretrain_mod, "initial_backbone",
                        _memo(pretrain_mod.initial_backbone, copy.deepcopy))


_MEMO: dict[str, object] = {}


def _memo(make: Callable, give: Callable = lambda x: x) -> Callable:
    """``make`` once per set of arguments (``give``: a copy for callers that change it)."""
    def cached(*args, **kwargs):
        key = f"{make.__name__}{(args, sorted(kwargs.items()))!r}"
        if key not in _MEMO:
            _MEMO[key] = make(*args, **kwargs)
        return give(_MEMO[key])
    return cached


# every command that writes a folder, and its arguments for an output path
FOLDER_COMMANDS: dict[str, Callable[[Ctx, Path], list[str]]] = {
    "run": lambda c, o: ["run", str(c.cfg_file), *c.tiny, "--out", str(o), "--quiet"],
    "sweep": lambda c, o: ["sweep", str(c.sweep_cfg), *c.tiny, "--out", str(o), "--quiet"],
    "report of a run": lambda c, o: ["report", str(c.run), "--out", str(o)],
    "report of a sweep": lambda c, o: ["report", str(c.sweep), "--out", str(o)],
    "data export": lambda c, o: ["data", "export", "--scenes", "2", "--out", str(o)],
    "data export llava": lambda c, o: ["data", "export", "--format", "llava", "--scenes", "2",
                                       "--out", str(o)],
    "data preview": lambda c, o: ["data", "preview", "--splits", "base", "--out", str(o)],
    "pretrain": lambda c, o: ["pretrain", "--out", str(o), "--steps", "1", "--quiet"],
    "export-flare-job": lambda c, o: ["export-flare-job", str(c.cfg_file), *c.tiny, "--out",
                                      str(o)],
    "export --merged": lambda c, o: ["export", str(c.run), "--merged", str(o)],
}
# every command that writes one file (a .png path)
FILE_COMMANDS: dict[str, Callable[[Ctx, Path], list[str]]] = {
    "generate": lambda c, o: ["generate", str(c.checkpoint), "a red circle", "--out", str(o)],
    "partition": lambda c, o: ["partition", "--clients", "2", "--out", str(o),
                               "data.train_scenes=20"],
}
# a second run into the command's own folder: refused only where a result is never replaced
RERUN_REFUSED = {"run": "already holds a finished run",
                 "pretrain": "already holds a pretrained checkpoint"}


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(err: str) -> str:
    """The one ``fedumm: error:`` line of a command, with no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fedumm: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- folder commands
@pytest.mark.parametrize("command", FOLDER_COMMANDS)
def test_a_folder_holding_a_users_file_is_refused_and_untouched(command, ctx, fast, tmp_path,
                                                                capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("my notes")
    before = _snapshot(out)
    assert main(FOLDER_COMMANDS[command](ctx, out)) == 2
    line = _one_error(capsys.readouterr().err)
    assert str(out) in line and "notes.md" in line
    assert re.search(r"choose a new (--out|--merged)", line)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]


@pytest.mark.parametrize("command", FOLDER_COMMANDS)
def test_new_and_empty_folders_are_accepted_and_so_is_a_rerun_into_its_own(
        command, ctx, fast, tmp_path, capsys):
    argv = FOLDER_COMMANDS[command]
    assert main(argv(ctx, tmp_path / "new" / "out")) == 0, capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(argv(ctx, tmp_path / "empty")) == 0, capsys.readouterr().err
    own = tmp_path / "empty"
    (own / "notes.md").write_text("mine")  # a user's file beside fedumm's
    rc = main(argv(ctx, own))
    err = capsys.readouterr().err
    if command in RERUN_REFUSED:
        assert rc == 2 and RERUN_REFUSED[command] in _one_error(err)
    else:
        assert rc == 0, err
    assert (own / "notes.md").read_text() == "mine"


def test_a_folder_another_command_made_is_refused(ctx, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(FOLDER_COMMANDS["report of a run"](ctx, out)) == 0
    before = _snapshot(out)
    assert main(FOLDER_COMMANDS["data export"](ctx, out)) == 2
    assert "is a fedumm report folder, not a data export folder" in _one_error(
        capsys.readouterr().err)
    assert _snapshot(out) == before


def test_a_sweep_refuses_a_cell_folder_holding_a_users_file_before_any_run(
        ctx, fast, tmp_path, capsys):
    sweep = tmp_path / "s"
    assert main(FOLDER_COMMANDS["sweep"](ctx, sweep)) == 0
    (sweep / "clients-3").mkdir()
    (sweep / "clients-3" / "notes.md").write_text("mine")
    before = _snapshot(sweep)
    assert main([*FOLDER_COMMANDS["sweep"](ctx, sweep), "--grid", "clients=2,3"]) == 2
    assert "clients-3 exists and is not empty" in _one_error(capsys.readouterr().err)
    assert _snapshot(sweep) == before


def test_a_report_is_written_into_its_source_folder_only_when_fedumm_made_it(
        ctx, tmp_path, capsys):
    assert main(["report", str(ctx.run)]) == 0  # the run folder's own report, rewritten
    assert main(["report", str(ctx.sweep)]) == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("summary.json", "metrics.jsonl"):
        (copy / name).write_bytes((ctx.run / name).read_bytes())
    assert main(["report", str(copy)]) == 2
    assert "give --out NEW_FOLDER" in _one_error(capsys.readouterr().err)
    assert sorted(p.name for p in copy.iterdir()) == ["metrics.jsonl", "summary.json"]


# ---------------------------------------------------------------- file commands and mix-ups
@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_a_file_output_is_new_or_fedumms_own_never_the_users(command, ctx, tmp_path, capsys):
    argv = FILE_COMMANDS[command]
    out = tmp_path / "a" / "grid.png"
    assert main(argv(ctx, out)) == 0 and out.read_bytes()[:4] == b"\x89PNG"
    assert main(argv(ctx, out)) == 0  # its own PNG is replaced
    theirs = tmp_path / "theirs.png"
    Image.new("RGB", (4, 4)).save(theirs)
    before = theirs.read_bytes()
    assert main(argv(ctx, theirs)) == 2
    assert "was not written by fedumm" in _one_error(capsys.readouterr().err)
    assert theirs.read_bytes() == before


@pytest.mark.parametrize(("argv", "message"), [
    (lambda c, t: FILE_COMMANDS["generate"](c, t / "dir"), "writes one .png file"),
    (lambda c, t: FILE_COMMANDS["generate"](c, t / "d.png"), "is a folder"),
    (lambda c, t: FILE_COMMANDS["partition"](c, t / "map.jpg"), "give a path ending in .png"),
    (lambda c, t: FOLDER_COMMANDS["data export"](c, t / "data.json"), "looks like a file name"),
    (lambda c, t: FOLDER_COMMANDS["report of a run"](c, t / "f"), "is a file, not a folder"),
    (lambda c, t: FOLDER_COMMANDS["run"](c, t / "f"), "is a file, not a folder"),
])
def test_path_mixups_are_one_clear_error(argv, message, ctx, tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    (tmp_path / "d.png").mkdir()
    before = _snapshot(tmp_path)
    assert main(argv(ctx, tmp_path)) == 2
    assert message in _one_error(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "dir.png").exists()  # no path is silently turned into another


# ---------------------------------------------------------------- resume
def test_resume_of_a_folder_with_only_a_config_is_refused_and_nothing_changes(
        ctx, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    config_from_dict({"name": "x"}, ctx.tiny).save(out / "config.yaml")
    (out / "notes.md").write_text("my notes")
    (out / "metrics.jsonl").write_text("my own metrics\n")
    before = _snapshot(out)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    line = _one_error(capsys.readouterr().err)
    assert "is not a run directory fedumm started (no .fedumm-run" in line and str(out) in line
    assert _snapshot(out) == before


def test_a_run_folder_of_an_attempt_that_never_checkpointed_is_reused(ctx, tmp_path):
    cfg = config_from_dict({"name": "x"}, ctx.tiny)
    RunDirectory(tmp_path / "r").create(cfg)
    RunDirectory(tmp_path / "r").create(cfg)
    assert (tmp_path / "r" / ".fedumm-run").is_file()


# ---------------------------------------------------------------- the policy itself
def test_in_its_own_folder_fedumm_replaces_and_prunes_only_what_it_wrote(tmp_path):
    folder = OutputFolder(tmp_path / "o", "report").claim()
    write_file(tmp_path / "o" / "a.md", "v1")
    write_file(tmp_path / "o" / "sub" / "b.md", "v1")
    (tmp_path / "o" / "c.md").write_text("the user's")
    with pytest.raises(OutputExistsError, match="c.md was not written by fedumm"):
        write_file(tmp_path / "o" / "c.md", "fedumm's")
    folder = OutputFolder(tmp_path / "o", "report").claim()
    write_file(tmp_path / "o" / "a.md", "v2")
    folder.prune()  # sub/b.md was not written again: removed with its folder
    folder.remove(tmp_path / "o" / "c.md")  # not fedumm's: kept
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".fedumm-report", "a.md",
                                                                 "c.md"]
    assert (tmp_path / "o" / "c.md").read_text() == "the user's"


def test_an_append_cut_short_by_a_full_disk_is_undone(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    outputs.append_text(log, '{"round": 0}\n')
    monkeypatch.setattr(outputs, "_write", _FullDisk(1))
    with pytest.raises(OutputError, match=f"cannot write {log}: No space left on device"):
        outputs.append_text(log, '{"round": 1}\n')
    assert log.read_text() == '{"round": 0}\n'


def _torch_like(f) -> None:
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:  # torch.save: a RuntimeError whose context is the OSError
        raise RuntimeError("[enforce fail] unexpected pos") from None


def _rust_like(f) -> None:  # safetensors: only the message says it
    raise RuntimeError("Error while serializing: IoError(No space left on device (os error 28))")


@pytest.mark.parametrize("fill", [_torch_like, _rust_like])
def test_a_library_error_from_a_full_disk_is_one_line(fill, tmp_path):
    with pytest.raises(OutputError, match="cannot write .*x.pt: No space left on device"):
        write_file(tmp_path / "x.pt", fill)
    with pytest.raises(OutputError, match="cannot write .*ck: No space left on device"):
        outputs.write_tree(tmp_path / "ck", lambda d: fill(None))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ck"]  # nothing half-written
    with pytest.raises(KeyError):  # a bug is not a disk error
        write_file(tmp_path / "y", lambda f: {}["k"])


# ---------------------------------------------------------------- a full disk, everywhere
class _FullDisk:
    """The policy's low-level writer, failing with ENOSPC on call ``n`` after writing half of
    the bytes (what a full disk does), remembering the file it was writing."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0
        self.failed: Path | None = None
        self.before: bytes | None = None

    def __call__(self, path: Path, fill, mode: str) -> None:
        self.calls += 1
        if self.calls != self.n:
            return REAL_WRITE(path, fill, mode)
        target = path.with_name(path.name.removesuffix(outputs.TMP))
        self.failed = target
        self.before = target.read_bytes() if target.is_file() else None
        buf = io.BytesIO()
        fill(buf)
        with open(path, mode) as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _assert_complete(folder: Path) -> None:
    """Every file that a reader would take as complete is complete."""
    from safetensors.torch import load_file

    for p in folder.rglob("*"):
        if not p.is_file() or "tb" in p.parts:
            continue
        if p.suffix == ".json" or p.name.startswith(outputs.MARKER_PREFIX):
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            [json.loads(line) for line in p.read_text().splitlines()]
        elif p.suffix == ".png":
            with Image.open(p) as img:
                img.load()
        elif p.suffix == ".yaml":
            yaml.safe_load(p.read_text())
        elif p.suffix == ".pt":
            torch.load(p, weights_only=True)
        elif p.suffix == ".safetensors":
            load_file(str(p))


def _again(command: str, argv: list[str], out: Path) -> list[str]:
    """The command that continues after the disk was freed (a run resumes or, when only its
    report was missing, reports)."""
    if command == "run" and (out / "summary.json").is_file():
        return ["report", str(out)]
    if command == "run" and (out / "checkpoint" / "state.pt").is_file():
        return ["run", "--resume", str(out), "--quiet"]
    return argv


class _Started(Exception):
    pass


def _assert_pretrain_starts(argv: list[str], monkeypatch) -> None:
    """Pretraining accepts the folder again (it gets as far as making its data)."""
    import fedumm.models.reference.pretrain as pretrain_mod

    def started(*args, **kwargs):
        raise _Started

    with monkeypatch.context() as m:
        m.setattr(pretrain_mod, "generate_shapes", started)
        with pytest.raises(_Started):
            main(argv)


@pytest.mark.parametrize("command", [*FOLDER_COMMANDS, *FILE_COMMANDS])
def test_a_full_disk_at_every_write_point_is_one_line_and_leaves_nothing_partial(
        command, ctx, fast, tmp_path, monkeypatch, capsys):
    argv_for = {**FOLDER_COMMANDS, **FILE_COMMANDS}[command]
    suffix = ".png" if command in FILE_COMMANDS else ""
    n = 0
    while True:
        n += 1
        out = tmp_path / f"n{n}" / f"out{suffix}"
        argv = argv_for(ctx, out)
        disk = _FullDisk(n)
        monkeypatch.setattr(outputs, "_write", disk)
        rc = main(argv)
        monkeypatch.setattr(outputs, "_write", REAL_WRITE)
        err = capsys.readouterr().err
        if disk.failed is None:  # every write point has failed once: this run succeeded
            assert rc == 0, err
            break
        assert rc == 2, err
        line = _one_error(err)
        assert line.startswith(f"fedumm: error: cannot write {disk.failed}: No space left")
        assert not list(tmp_path.rglob("*.tmp")), f"write {n}: a temporary file was left"
        now = disk.failed.read_bytes() if disk.failed.is_file() else None
        assert now == disk.before, f"write {n}: {disk.failed} was changed"
        _assert_complete(out.parent)
        if command == "pretrain" and disk.failed.name != "SHA256SUMS.json":
            _assert_pretrain_starts(argv, monkeypatch)  # in full once, after the last file
            continue
        again = _again(command, argv, out)
        assert main(again) == 0, f"write {n}: {again} failed: {capsys.readouterr().err}"
        capsys.readouterr()
    assert n - 1 >= {"run": 10, "sweep": 10, "pretrain": 5}.get(command, 1)

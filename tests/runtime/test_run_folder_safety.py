"""Nothing lost, nothing silently wrong: folders that are not fedumm's are never written,
one writer at a time, and a resume only continues the run it belongs to."""

from __future__ import annotations

import pytest
import yaml

from fedumm.config import config_from_dict
from fedumm.fl.client import ClientTrainer
from fedumm.runtime.local import run_experiment
from fedumm.runtime.run_dir import RunDirectory, RunDirError


def _cfg(overrides, *extra):
    return config_from_dict({"name": "safe"}, [*overrides, *extra])


def _crash_in_round(monkeypatch, n_calls: int) -> None:
    real, calls = ClientTrainer.train, {"n": 0}

    def train(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n_calls:
            raise KeyboardInterrupt("simulated kill")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ClientTrainer, "train", train)


def test_a_folder_with_the_users_files_is_never_written(tmp_path, tiny_overrides):
    out = tmp_path / "x"
    out.mkdir()
    (out / "report.md").write_text("mine")
    with pytest.raises(RunDirError, match="is not a fedumm run folder .*report.md"):
        run_experiment(_cfg(tiny_overrides), out, progress=False)
    assert (out / "report.md").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        run_experiment(_cfg(tiny_overrides), tmp_path / "file", progress=False)


def test_a_second_writer_is_refused(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    with RunDirectory(out).lock(), pytest.raises(RunDirError, match="is in use by fedumm"):
        run_experiment(_cfg(tiny_overrides), out, progress=False)


def test_resume_refuses_an_edited_config_and_repairs_a_torn_metrics_line(
        tmp_path, tiny_overrides, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(tiny_overrides, "rounds=3")
    _crash_in_round(monkeypatch, 4)  # round 1, second client
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out, progress=False)
    monkeypatch.undo()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "round", "rou')  # a kill in the middle of a write
    edited = yaml.safe_load((out / "config.yaml").read_text())
    edited["train"]["lr"] = 0.5
    original = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(yaml.safe_dump(edited))
    with pytest.raises(RunDirError, match="changed since the run started"):
        run_experiment(None, out, resume=True, progress=False)
    (out / "config.yaml").write_text(original)
    run_experiment(None, out, resume=True, progress=False)
    metrics = RunDirectory(out).metrics()  # every line parses
    assert [m["round"] for m in metrics if m["type"] == "round"] == [0, 1, 2]


def test_a_crash_before_the_first_checkpoint_does_not_repeat_the_base_evaluation(
        tmp_path, tiny_overrides, monkeypatch):
    out = tmp_path / "run"
    _crash_in_round(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_cfg(tiny_overrides), out, progress=False)
    monkeypatch.undo()
    run_experiment(None, out, resume=True, progress=False)
    evals = [m["round"] for m in RunDirectory(out).metrics() if m["type"] == "eval"]
    assert evals.count(-1) == 1


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_overrides, monkeypatch):
    out = tmp_path / "run"
    _crash_in_round(monkeypatch, 3)  # after round 0's checkpoint
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_cfg(tiny_overrides), out, progress=False)
    monkeypatch.undo()
    ckpt = out / "checkpoint" / "state.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(RunDirError, match="state.pt cannot be read"):
        run_experiment(None, out, resume=True, progress=False)

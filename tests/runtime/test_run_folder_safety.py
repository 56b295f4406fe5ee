"""Nothing lost, nothing silently wrong: folders that are not fedumm's are never written,
one writer at a time, and a resume only continues the run it belongs to."""

from __future__ import annotations

import pytest
import yaml

from fedumm.config import config_from_dict
from fedumm.fl.client import ClientTrainer
from fedumm.runtime.dispatch import run_experiment
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


def test_sigterm_ends_a_run_cleanly_with_a_resume_hint(tmp_path, tiny_overrides):
    import signal
    import subprocess
    import sys
    import time

    cfg_file = tmp_path / "cfg.yaml"
    _cfg(tiny_overrides, "rounds=40").save(cfg_file)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedumm.cli", "run", str(cfg_file), "--out",
                             str(out), "--quiet"], stderr=subprocess.PIPE, text=True)
    ckpt = out / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"stopped (SIGTERM); continue with: fedumm run --resume {out}" in err
    assert "Traceback" not in err
    assert RunDirectory(out).load_checkpoint()["round"] >= 0  # intact


def test_a_client_without_data_is_skipped_with_a_reason(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides, "clients=12", "partition.min_per_client=0",
               "partition.alpha=0.05", "data.train_scenes=10")
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    sizes = [c["num_samples"] for c in
             __import__("json").loads((tmp_path / "run" / "partition.json").read_text())[
                 "clients"]]
    empty = [k for k, n in enumerate(sizes) if n == 0]
    assert empty, sizes  # the setting does leave clients without data
    skipped = {m["client"] for m in RunDirectory(tmp_path / "run").metrics()
               if m["type"] == "rejected" and m["reason"] == "no training data"}
    assert set(empty) <= skipped
    assert summary["rounds"] == 2


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from fedumm import outputs

    target = tmp_path / "summary.json"

    def full_disk(path, fill, mode):
        with open(path, mode) as f:
            f.write(b"{}"[:1])
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "_write", full_disk)
    with pytest.raises(OSError, match=f"cannot write {target}: No space left"):
        outputs.write_file(target, b"{}" * 100)
    assert list(tmp_path.iterdir()) == []

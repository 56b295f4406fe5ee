"""Every way a run is stopped ends cleanly: a real ``fedumm run`` with ``workers=2`` in a
session of its own, stopped mid-round by a signal to its process group, to itself or to a
worker; and a resume is refused while a process of the earlier run is alive."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedumm.cli import main
from fedumm.config import config_from_dict
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.run_dir import RunDirectory, RunDirError


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name; None once gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").glob("[0-9]*"):
        s = _stat(int(p.name))
        if s is not None and int(s[1]) == pid:
            out.append(int(p.name))
    return out


def _group(pgid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").glob("[0-9]*")
            if (s := _stat(int(p.name))) is not None and int(s[2]) == pgid]


def _gone(pids, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(_stat(p) is None for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture()
def started(tmp_path, tiny_overrides):
    """A ``fedumm run`` with workers=2, long enough to be stopped in a round, once a round is
    checkpointed (its worker trains from the first round to the last); yields (process, run
    folder, worker pids). Killed at the end whatever happened."""
    cfg_file = tmp_path / "cfg.yaml"
    config_from_dict({"name": "stops"}, [*tiny_overrides, "clients=4", "workers=2",
                                          "train.threads=2", "rounds=200", "eval.every=0",
                                          "train.max_steps=3"]).save(cfg_file)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedumm.cli", "run", str(cfg_file), "--out",
                             str(run), "--quiet"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        ckpt = RunDirectory(run).checkpoint_file
        while time.monotonic() < deadline and proc.poll() is None and not (
                workers and ckpt.is_file()):
            workers = _children(proc.pid)
            time.sleep(0.1)
        assert workers and ckpt.is_file(), "no round done" + (
            f" (exit {proc.returncode}: {proc.stderr.read()})" if proc.poll() is not None else "")
        time.sleep(0.3)  # in a later round: the workers train until the last one
        yield proc, run, workers
    finally:
        for pid in [proc.pid, *_group(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_group_mid_round_stops_the_run_cleanly(started, sig):
    proc, run, workers = started
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)  # what timeout, scancel, systemd (and Ctrl-C) do
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 128 + sig, err
    assert f"fedumm: stopped ({sig.name}); continue with: fedumm run --resume {run}" in err
    assert _gone([*workers, *_group(proc.pid)], within_s=10), _group(proc.pid)
    assert RunDirectory(run).load_checkpoint() is not None  # the last round's, intact


def test_a_sigterm_to_the_run_alone_stops_its_workers(started):
    proc, run, workers = started
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert _gone(workers, within_s=10)


def test_a_sigkill_of_the_run_takes_its_workers_with_it(started):
    proc, _, workers = started
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: the kernel ends the workers
    proc.wait(timeout=30)
    assert _gone(workers, within_s=10), [w for w in workers if _stat(w)]


def test_a_worker_that_dies_fails_the_round_with_an_error_naming_it(started):
    proc, run, workers = started
    os.kill(workers[0], signal.SIGKILL)  # e.g. the out-of-memory killer
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert f"worker process {workers[0]} ended (killed by SIGKILL" in err
    assert _gone(_group(proc.pid), within_s=10)


def test_a_resume_is_refused_while_a_process_of_the_earlier_run_holds_it(tmp_path,
                                                                        tiny_overrides, capsys):
    run = tmp_path / "run"
    RunDirectory(run).create(config_from_dict({"name": "held"}, tiny_overrides))
    # a process left by the earlier run (a worker inherits its parent's lock)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(run / RunDirectory.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"processes holding it: {holder.pid} \("):
            run_experiment(None, run, resume=True)
        assert main(["run", "--resume", str(run)]) == 2
        assert f"kill {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait(timeout=10)
        holder.stdout.close()

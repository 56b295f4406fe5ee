from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedumm.config import config_from_dict
from fedumm.runtime.dispatch import run_experiment
from makers import killed_at_training_call


def _adapters(run):
    return load_file(str(run / "adapters" / "adapter_model.safetensors"))


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [
    pytest.param(["strategy.name=fedavg"], id="fedavg"),
    pytest.param(["strategy.name=scaffold"], id="scaffold"),
    # LoRA dropout draws from torch's RNG, which the trainer seeds per client and round
    pytest.param(["strategy.name=fedavg", "lora.dropout=0.2"], id="fedavg-dropout"),
    # the error-feedback residual lives in the client state, checkpointed with the round
    pytest.param(["strategy.name=fedavg", "codec=topk:0.1+int8"], id="fedavg-topk-ef"),
    # a lossy download: the clients' copies (client state) and the server's (checkpoint);
    # half the clients per round, so a client that missed a round receives the full copy
    pytest.param(["strategy.name=fedavg", "codec.download=nf4", "clients=4",
                  "strategy.fraction=0.5"],
                 id="fedavg-nf4-download-partial"),
])
def test_resume_after_a_crash_mid_round_matches_an_uninterrupted_run(
        tmp_path, tiny_overrides, extra):
    overrides = [*tiny_overrides, "rounds=3", *extra]
    run_experiment(config_from_dict({"name": "r"}, overrides), tmp_path / "full", progress=False)

    # round 1 (0-based), second client: the middle of a round
    with killed_at_training_call(4), pytest.raises(KeyboardInterrupt):
        run_experiment(config_from_dict({"name": "r"}, overrides), tmp_path / "cut",
                       progress=False)
    assert not (tmp_path / "cut" / "summary.json").exists()
    run_experiment(None, tmp_path / "cut", resume=True, progress=False)
    assert _same(_adapters(tmp_path / "full"), _adapters(tmp_path / "cut"))
    rounds = [line for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
              if '"type": "round"' in line]
    assert len(rounds) == 3  # the half-finished round was not logged twice


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "rounds=4", "train.max_steps=6"]
    run_experiment(config_from_dict({"name": "k"}, overrides), tmp_path / "full", progress=False)
    cfg_path = tmp_path / "k.yaml"
    config_from_dict({"name": "k"}, overrides).save(cfg_path)
    cmd = [sys.executable, "-m", "fedumm.cli", "run", str(cfg_path), "--out",
           str(tmp_path / "cut"), "--quiet"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = tmp_path / "cut" / "checkpoint" / "state.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (tmp_path / "cut" / "summary.json").exists():
        pytest.skip("the run finished before it could be killed")
    run_experiment(None, tmp_path / "cut", resume=True, progress=False)
    assert _same(_adapters(tmp_path / "full"), _adapters(tmp_path / "cut"))


def test_resume_needs_a_run_directory(tmp_path):
    from fedumm.runtime.run_dir import RunDirError

    with pytest.raises(RunDirError, match="not a run directory"):
        run_experiment(None, tmp_path / "nothing", resume=True, progress=False)


def test_a_resume_refuses_data_files_edited_since_the_run_started(tmp_path, tiny_overrides):
    from fedumm.data.export import export_conversation_files
    from fedumm.data.readers.shapes import generate_shapes
    from fedumm.models.reference.micro import MICRO_IMAGE_SIZE

    data = generate_shapes("downstream", 16, seed=3, role="train", image_size=MICRO_IMAGE_SIZE)
    files = export_conversation_files(data, tmp_path / "files")
    overrides = [*tiny_overrides, "data.format=files",
                 f"data.understanding={files['understanding']}",
                 f"data.generation={files['generation']}", "data.heldout_fraction=0.25"]
    with killed_at_training_call(3), pytest.raises(KeyboardInterrupt):  # round 1
        run_experiment(config_from_dict({"name": "d"}, overrides), tmp_path / "run",
                       progress=False)
    edited = Path(files["understanding"])
    edited.write_text(edited.read_text().replace("circle", "disc"))
    from fedumm.runtime.run_dir import RunDirError

    with pytest.raises(RunDirError, match=f"the data changed since the run started.*"
                                          f"{edited.name}"):
        run_experiment(None, tmp_path / "run", resume=True, progress=False)

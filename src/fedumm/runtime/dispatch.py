"""Run (or resume) an experiment on the runtime its config names: the built-in local runtime,
or NVIDIA FLARE's simulator / POC. The one place that knows both, so the local runtime never
imports FLARE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedumm.config import Config
from fedumm.runtime.run_dir import RunDirectory, RunDirError

RESUMABLE = ("local", "flare-sim")


def run_experiment(cfg: Config | None, out: str | Path, *, resume: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the experiment ``cfg`` into the run directory ``out`` on the runtime
    the config names (``local`` here; ``flare-sim`` / ``flare-poc`` via NVIDIA FLARE). On
    resume the config is the run directory's own."""
    d = RunDirectory(out)
    if resume:
        cfg = d.load_config()
        if cfg.runtime not in RESUMABLE:
            raise RunDirError(f"{out} ran on runtime={cfg.runtime}; local and flare-sim runs "
                              "resume (start a new run directory)")
    if cfg.runtime == "flare-sim" and resume:
        from fedumm.runtime.flare.runner import run_flare_sim

        return run_flare_sim(cfg, out, resume=True)
    if cfg.runtime != "local":
        from fedumm.runtime.flare.runner import run_flare

        return run_flare(cfg, out)
    from fedumm.runtime.local import LocalRuntime

    with d.lock():
        if not resume:
            d.create(cfg)
        return LocalRuntime(cfg, out, progress=progress).run(resume=resume)

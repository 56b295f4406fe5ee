"""Run a fedumm job on NVIDIA FLARE: its simulator, or a POC deployment on 127.0.0.1.

Both write the same run directory as the local runtime (the server-side controller does it).
FLARE's own workspace lives under the run directory (``flare/``), never in ``~/.nvflare``.
FLARE can end "successfully" after a site failed, so success is checked here: no site error
file and a ``summary.json`` written by the controller; otherwise :class:`FlareRunError` carries
the failing site's message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedumm.config import Config
from fedumm.data.clients import split_clients
from fedumm.data.readers import read_samples
from fedumm.fl.he_sum import provision_contexts
from fedumm.outputs import OutputFolder, write_tree
from fedumm.runtime.flare.client import ERRORS_DIR, has_own_data
from fedumm.runtime.flare.controller import site_names
from fedumm.runtime.flare.guard import start_guard, stop_guard
from fedumm.runtime.flare.job import JOB_NAME, build_job
from fedumm.runtime.modes import CENTRALIZED, num_clients, run_mode
from fedumm.runtime.procs import RUN_ENV, deferred_signals, describe, run_processes, stop
from fedumm.runtime.run_dir import RunDirectory, RunDirError, RunFailedError

FLARE_DIR = "flare"  # FLARE's workspace inside the run directory


class FlareRunError(RunFailedError):
    """A FLARE run ended without a result; the message names the failing site."""


def _site_env(threads: int) -> dict[str, str]:
    # one OpenMP thread per site process: K processes on a few cores must not oversubscribe
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _check_result(d: RunDirectory, flare_dir: Path) -> dict[str, Any]:
    errors = list((d.path / ERRORS_DIR).glob("*.txt"))
    if errors:
        last = {p: (p.read_text().strip().splitlines() or ["?"])[-1] for p in errors}
        # the cause first: a site whose own error it is, not one FLARE aborted because of it
        first = min(errors, key=lambda p: ("abort" in last[p].lower(), p.stat().st_mtime,
                                           p.name))
        others = sorted(p.stem for p in errors if p != first)
        also = f"; also stopped: {', '.join(others)}" if others else ""
        raise FlareRunError(f"{first.stem} failed: {last[first]} "
                            f"(traceback: {first}; FLARE logs under {flare_dir}){also}")
    if not d.is_finished():
        logs = sorted(str(p) for p in flare_dir.rglob("log.txt"))[:3]
        raise FlareRunError(f"the FLARE job ended without a global model (no summary.json); "
                            f"see the logs {logs}")
    return json.loads((d.path / d.SUMMARY).read_text())


def _nvflare() -> str:
    exe = Path(sys.executable).with_name("nvflare")
    return str(exe) if exe.is_file() else "nvflare"


def _stop_all(proc: subprocess.Popen, workspace: Path) -> None:
    """Stop the simulator's process group, then every other process of the run (the sites run
    in sessions of their own; all carry ``FEDUMM_RUN``): nothing is left behind. A second
    Ctrl-C or SIGTERM waits until this is done."""
    with deferred_signals():
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)  # also when the simulator itself has ended
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        _kill_leftovers(workspace)


def _kill_leftovers(workspace: Path) -> None:
    """Stop every process of the run whose FLARE folder is (or is inside) ``workspace``."""
    stop(lambda: run_processes(str(workspace), by_command=True))


def launch_tag(flare_dir: Path) -> str:
    """The ``FEDUMM_RUN`` tag of one launch: a name inside the run's FLARE folder, so that a
    resume's check finds every launch's processes (:func:`_refuse_while_running`), while a
    killed launch's guard stops only its own (never those of the resume that follows it)."""
    return str(flare_dir / f"launch-{os.getpid()}-{time.time_ns()}")


def _refuse_while_running(folder: Path) -> None:
    """Refuse to start while processes of an earlier run in ``folder`` are alive (its runner
    was killed): they would write into the run directory beside the new ones."""
    pids = run_processes(str(folder))
    if pids:
        raise RunDirError(
            f"processes of an earlier run in {folder.parent} are still running: "
            f"{describe(pids)}; wait for them to end (a killed run's guard stops them within "
            f"seconds) or stop them: kill {' '.join(map(str, pids))}")


def check_partition(cfg: Config, sites: list[str] | None = None,
                    site_overrides: dict[str, list[str]] | None = None) -> None:
    """Split the config's data over its clients as every site will (the local runtime's
    :func:`~fedumm.runtime.experiment.client_datasets`), before any FLARE process starts: a
    partition that cannot be made fails here, in seconds and with the local runtime's error,
    not on every site after all of them started."""
    if run_mode(cfg) == CENTRALIZED:
        return
    try:
        names = site_names(num_clients(cfg), sites)
    except ValueError:  # build_job says what is wrong with the names
        names = []
    if names and all(has_own_data((site_overrides or {}).get(s, [])) for s in names):
        return  # every site brings its own files: nothing is partitioned
    split_clients(read_samples(cfg.data, "train"), cfg.partition, cfg.clients, cfg.seed)


def run_flare_sim(cfg: Config, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """The job in FLARE's simulator (see :func:`_run_flare_sim`), holding the run folder."""
    with RunDirectory(out).lock():
        return _run_flare_sim(cfg, out, **kwargs)


def _run_flare_sim(cfg: Config, out: str | Path, *, poll_s: float = 0.5,
                  site_overrides: dict[str, list[str]] | None = None,
                  sites: list[str] | None = None, resume: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """The job in FLARE's simulator (``nvflare simulator`` on the exported job folder): one
    process per site, threads == sites. A site failure stops the whole process group.
    ``resume``: continue an interrupted run directory from its last completed round (the
    server resumes from its checkpoint, every site from its state of that round; the sites'
    names and overrides are the ones the run started with)."""
    d = RunDirectory(out)
    flare_dir = (d.path / FLARE_DIR).resolve()
    launch = flare_dir / "launch.json"
    _refuse_while_running(flare_dir)
    if resume:
        if not launch.is_file():
            raise RunDirError(f"{out} has no FLARE run to resume ({launch} is missing)")
        saved = json.loads(launch.read_text())
        sites, site_overrides = saved["sites"], saved["site_overrides"]
        shutil.rmtree(d.path / ERRORS_DIR, ignore_errors=True)
        for sub in ("jobs", "staging", "workspace"):  # the job is exported afresh
            shutil.rmtree(flare_dir / sub, ignore_errors=True)
    else:
        check_partition(cfg, sites, site_overrides)
        d.create(cfg)
        flare_dir.mkdir(parents=True, exist_ok=True)
        launch.write_text(json.dumps({"sites": sites, "site_overrides": site_overrides}))
    # HE keys: the simulator provisions nothing, so they are made here with FLARE's builder
    he = str(provision_contexts(flare_dir / "he")[0].parent) if cfg.secagg.uses_he else ""
    build_job(cfg, run_dir=str(d.path.resolve()), staging=flare_dir / "staging",
              site_overrides=site_overrides, sites=sites,
              he_contexts=he).export_job(str(flare_dir / "jobs"))
    k = num_clients(cfg)
    cmd = [_nvflare(), "simulator", str(flare_dir / "jobs" / JOB_NAME), "-w",
           str(flare_dir / "workspace"), "-c", ",".join(site_names(k, sites)), "-t", str(k),
           "-l", "concise"]
    # every process of the run carries the tag; the guard stops them if this one is killed
    tag = launch_tag(flare_dir)
    env = {**os.environ, **_site_env(cfg.train.threads or 1), RUN_ENV: tag}
    t0 = time.perf_counter()
    guard = start_guard(tag, flare_dir / "guard.log")
    try:
        with open(flare_dir / "simulator.log", "ab") as out_log:
            proc = subprocess.Popen(cmd, stdout=out_log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                while proc.poll() is None:
                    if any((d.path / ERRORS_DIR).glob("*.txt")):
                        log("a site failed; stopping the FLARE simulator")
                        break
                    time.sleep(poll_s)
            finally:
                _stop_all(proc, flare_dir)
    finally:
        stop_guard(guard)
    summary = _check_result(d, flare_dir)
    summary["time"]["flare_wall_s"] = round(time.perf_counter() - t0, 2)
    d.write_summary(summary)
    return summary


ALLOW_PREFIX = "fedumm.runtime.flare."  # what a site's class_allow_list must admit


def allow_fedumm_components(prod_dir: Path) -> int:
    """Add fedumm's FLARE components to every site's ``class_allow_list`` (provisioned kits
    enforce one); a real deployment does the same in each site's ``local/resources.json``."""
    changed = 0
    for f in sorted(prod_dir.rglob("local/resources.json*")):
        if f.name not in ("resources.json", "resources.json.default"):
            continue
        res = json.loads(f.read_text())
        allow = res.get("class_allow_list")
        if isinstance(allow, list) and ALLOW_PREFIX not in allow:
            allow.append(ALLOW_PREFIX)
            f.write_text(json.dumps(res, indent=2))
            changed += 1
    return changed


def _deploy_poc(env, poc: Path, k: int, job, use_he: bool = False) -> str:
    """Provision the POC kits (with FLARE's HE contexts when ``use_he``), admit fedumm's
    components, start the services, submit ``job``.

    This is ``PocEnv.deploy`` with one step added, and the one place fedumm calls FLARE's
    private functions (``_start_poc``, ``PocEnv._get_session_manager``): provisioned kits
    enforce a ``class_allow_list`` that must name fedumm's components before the services
    start, and ``PocEnv.deploy`` provisions and starts in one call with no point in between.
    Revisit on FLARE upgrades (tested with nvflare 2.9)."""
    from nvflare.recipe.poc_env import SERVICE_START_TIMEOUT
    from nvflare.tool.poc.poc_commands import _start_poc, prepare_poc_provision

    prepare_poc_provision(clients=[], number_of_clients=k, workspace=str(poc), docker_image=None,
                          use_he=use_he)
    allow_fedumm_components(poc)
    _start_poc(poc_workspace=str(poc), gpu_ids=[], excluded=[env.username], services_list=[])
    time.sleep(SERVICE_START_TIMEOUT)
    return env._get_session_manager().submit_job(job)


def run_flare_poc(cfg: Config, out: str | Path, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Provision a POC deployment on 127.0.0.1 under the run directory (not ``~/.nvflare``),
    start it, submit the job, wait, and stop every process it started (also on failure)."""
    from nvflare.recipe.poc_env import PocEnv

    d = RunDirectory(out)
    flare_dir = (d.path / FLARE_DIR).resolve()
    _refuse_while_running(flare_dir)
    check_partition(cfg)  # before any service starts
    d.create(cfg)
    poc = flare_dir / "poc"
    flare_dir.mkdir(parents=True, exist_ok=True)
    old = {n: os.environ.get(n) for n in ("NVFLARE_POC_WORKSPACE", RUN_ENV, *_site_env(1))}
    tag = launch_tag(flare_dir)
    env, guard = None, start_guard(tag, flare_dir / "guard.log")
    t0 = time.perf_counter()
    try:
        os.environ["NVFLARE_POC_WORKSPACE"] = str(poc)
        os.environ[RUN_ENV] = tag  # inherited by every service: the guard finds them
        os.environ.update(_site_env(cfg.train.threads or 1))
        k = num_clients(cfg)
        env = PocEnv(num_clients=k)
        with open(flare_dir / "poc_admin.log", "w") as admin_log, \
                contextlib.redirect_stdout(admin_log):
            job_id = _deploy_poc(env, poc, k, build_job(
                cfg, run_dir=str(d.path.resolve()), staging=flare_dir / "staging"),
                use_he=cfg.secagg.uses_he)
            status = env.get_job_result(job_id, timeout=timeout_s)
            if status is None:
                env.abort_job(job_id)
                raise FlareRunError(f"the POC job {job_id} did not finish in {timeout_s} s")
    finally:
        with deferred_signals():  # a second Ctrl-C must not leave services running
            if env is not None:
                with contextlib.suppress(Exception):
                    env.stop(clean_up=False)
            _kill_leftovers(flare_dir)
            stop_guard(guard)
            for n, v in old.items():
                if v is None:
                    os.environ.pop(n, None)
                else:
                    os.environ[n] = v
    summary = _check_result(d, flare_dir)
    summary["time"]["flare_wall_s"] = round(time.perf_counter() - t0, 2)
    d.write_summary(summary)
    return summary


def export_flare_job(cfg: Config, out: str | Path,
                     site_overrides: dict[str, list[str]] | None = None,
                     sites: list[str] | None = None) -> Path:
    """A job folder for ``nvflare job submit`` on a real deployment: sites named ``sites``
    (default site-1..site-K), each with its ``key=value`` overrides. ``out`` follows the
    output policy (:mod:`fedumm.outputs`): new, empty, or an earlier export (which is
    replaced; files fedumm did not write are kept)."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="fedumm_job_") as staging:
        job = build_job(cfg, staging=Path(staging), site_overrides=site_overrides, sites=sites)
        folder = OutputFolder(out, "export-flare-job").claim()  # after the job validated
        write_tree(out, lambda root: job.export_job(str(root)))
    folder.prune()
    return out / JOB_NAME


def run_flare(cfg: Config, out: str | Path) -> dict[str, Any]:
    """``runtime=flare-sim`` or ``runtime=flare-poc``."""
    if cfg.runtime == "flare-sim":
        return run_flare_sim(cfg, out)
    if cfg.runtime == "flare-poc":
        with RunDirectory(out).lock():
            return run_flare_poc(cfg, out)
    raise ValueError(f"runtime={cfg.runtime!r} is not a FLARE runtime")

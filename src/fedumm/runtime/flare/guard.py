"""Takes a FLARE run's processes down with the fedumm process that started them.

NVIDIA FLARE's simulator and POC services run in sessions of their own (so that fedumm can stop
their process groups), and the simulator starts each site in yet another session: a SIGKILL of
``fedumm run`` used to leave them all running, writing into the run directory. Every process
of the run carries ``FEDUMM_RUN=<its FLARE folder>/launch-...`` in its environment
(:data:`fedumm.runtime.procs.RUN_ENV`), one tag per launch: a resume's check finds them all, a
guard stops only its own launch's. This guard, started by the runner in a session of its
own, waits for the runner to end; if it ends without stopping the guard first (it was killed),
the guard stops every process of the run (SIGTERM, then SIGKILL) and exits.

    python -m fedumm.runtime.flare.guard RUNNER_PID   (the folder in FEDUMM_GUARDS)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fedumm.runtime.procs import RUN_ENV, run_processes, stop

GUARDS_ENV = "FEDUMM_GUARDS"  # the guard's folder: not FEDUMM_RUN, so it is not one of them


def start_guard(folder: str | Path, log: Path) -> subprocess.Popen:
    """Start the guard of the launch whose processes carry ``FEDUMM_RUN=folder`` (one launch's
    tag: a killed run's guard must not stop the processes of its resume)."""
    env = {k: v for k, v in os.environ.items() if k != RUN_ENV}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid())],
                                env={**env, GUARDS_ENV: str(folder)}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_guard(guard: subprocess.Popen) -> None:
    """The runner stopped the run itself: end the guard (it has nothing to do)."""
    guard.kill()
    guard.wait(timeout=10)


def main(argv: list[str]) -> int:
    runner, folder = int(argv[0]), os.environ[GUARDS_ENV]
    while os.getppid() == runner:  # reparented: the runner has ended
        time.sleep(0.2)
    left = stop(lambda: run_processes(folder, by_command=True))
    if left:
        print(f"fedumm guard: processes {left} of {folder} did not stop", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

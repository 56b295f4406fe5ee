"""The processes of a run: tie them to their parent, find them, stop them with a deadline.

Linux only where it reads ``/proc`` (elsewhere nothing is found). Standard library only, so a
guard process that imports it starts at once (:mod:`fedumm.runtime.flare.guard`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator

# in the environment of every process a run starts, inherited by all of their descendants:
# how a run's processes are found even when they run in sessions of their own
RUN_ENV = "FEDUMM_RUN"
PR_SET_PDEATHSIG = 1  # prctl's option number (linux/prctl.h)


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> bool:
    """In a forked child: the kernel sends ``sig`` to this process when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``; it is tied to the parent *thread* that forked). A parent that
    died before this call ends the child at once. False where prctl is not available."""
    try:
        ok = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        ok = False
    if os.getppid() != parent_pid:  # orphaned already: the signal will never come
        os.kill(os.getpid(), sig)
    return ok


def watch_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """In a forked child whose creator may be a helper *thread* (``multiprocessing.Pool``
    forks replacement workers from one): a daemon thread that ends this process once its
    parent process has ended. :func:`die_with_parent` would be wrong there: its signal comes
    when the forking thread ends, e.g. as the pool shuts down, killing a worker that holds the
    pool's queue lock, and the pool's ``terminate`` then waits forever."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="fedumm-watch-parent", daemon=True).start()


def _pids() -> Iterator[int]:
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for name in entries:
        if name.isdigit():
            yield int(name)


def _read(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:  # gone, or another user's
        return b""


def command(pid: int, width: int = 80) -> str:
    """A process's command line, shortened to ``width`` characters."""
    text = _read(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
    return text if len(text) <= width else text[:width - 3] + "..."


def run_processes(tag: str, exclude: Iterable[int] = (), by_command: bool = False
                  ) -> list[int]:
    """The live processes of the run ``tag`` (a folder): those started with ``FEDUMM_RUN`` set
    to it or to a folder inside it (every process a run starts inherits it, also in a session
    of its own); with ``by_command`` also those naming it on their command line. Never this
    process."""
    skip = {os.getpid(), *exclude}
    key = tag.rstrip("/").encode()
    prefix = f"{RUN_ENV}=".encode()
    found = []
    for pid in _pids():
        if pid in skip:
            continue
        env = [e[len(prefix):] for e in _read(pid, "environ").split(b"\0")
               if e.startswith(prefix)]
        if any(v == key or v.startswith(key + b"/") for v in env) or (
                by_command and key in _read(pid, "cmdline")):
            found.append(pid)
    return sorted(found)


def holders(path: str | os.PathLike) -> list[int]:
    """The processes that hold ``path`` open (forked children inherit their parent's open
    files, and with them its ``flock``)."""
    target = os.path.realpath(path)
    found = []
    for pid in _pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    found.append(pid)
                    break
            except OSError:
                continue
    return sorted(found)


def describe(pids: Iterable[int]) -> str:
    """``123 (nvflare simulator ...), 456 (...)``."""
    return ", ".join(f"{p} ({command(p, 60) or '?'})" for p in pids)


def stop(find: Callable[[], list[int]], grace_s: float = 10.0, kill_s: float = 5.0
         ) -> list[int]:
    """SIGTERM to what ``find`` returns, ``grace_s`` for it to end, then SIGKILL to what is
    left (also what started meanwhile) and ``kill_s`` more. Returns the survivors."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_s)):
        pids = find()
        if not pids:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and find():
            time.sleep(0.1)
    return find()


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT and SIGTERM while a cleanup runs, so that a second Ctrl-C or SIGTERM cannot
    cut it short and leave processes behind; one that came is delivered afterwards (dropped when
    the block ends with an exception: the run is stopping already). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: came.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    if came:
        signal.raise_signal(came[0])

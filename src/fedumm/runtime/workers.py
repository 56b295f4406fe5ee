"""Forked worker processes that never leave their parent waiting on a dead one.

``multiprocessing.Pool`` replaces a worker that dies and the result of the task it held never
comes: its parent waits forever (a SIGTERM to the process group did that to ``workers=2``).
Here every wait on a worker also watches its process, so a dead worker fails the round with an
error naming it; each worker dies with its parent (``PR_SET_PDEATHSIG``), so a SIGKILL of the
run leaves none behind; and stopping them has a deadline.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from fedumm.runtime.procs import deferred_signals, die_with_parent
from fedumm.runtime.run_dir import RunFailedError


class WorkerDiedError(RunFailedError):
    """A worker process ended while its parent waited for it (killed, out of memory, ...)."""


class RemoteTraceback(Exception):
    """Where a worker's exception was raised (the ``__cause__`` of the one re-raised here)."""


def _portable(exc: BaseException) -> tuple[BaseException, str]:
    """``exc`` as it can cross a pipe (its type and message if it does not pickle)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc, tb


def _worker_main(conn, parent: int, serve: Callable[[Any], Any],
                 init: Callable[[], None]) -> None:
    die_with_parent(parent)
    init()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent closed its end
            return
        try:
            reply = (True, serve(msg))
        except BaseException as exc:
            reply = (False, _portable(exc))
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # nothing was sent
            conn.send((False, _portable(exc)))


def exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exit code {exitcode}"


class WorkerPool:
    """``n`` processes forked from this one, each answering every message with
    ``serve(message)`` (run in the child, on its forked copy of this process's objects)."""

    def __init__(self, n: int, serve: Callable[[Any], Any], init: Callable[[], None]) -> None:
        ctx = multiprocessing.get_context("fork")
        self._procs, self._conns = [], []
        for _ in range(n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(theirs, os.getpid(), serve, init),
                               daemon=True, name="fedumm-worker")
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def check(self) -> None:
        """Raise :class:`WorkerDiedError` if a worker has ended."""
        for proc in self._procs:
            if proc.exitcode is not None:
                raise self._death(proc)

    def _death(self, proc) -> WorkerDiedError:
        if proc.exitcode is not None and proc.exitcode < 0:
            # a stop sent to the whole process group (SIGTERM, Ctrl-C) reaches this process
            # too: let its handler turn it into the clean stop it is, not a failure
            time.sleep(0.2)
        return WorkerDiedError(
            f"worker process {proc.pid} ended ({exit_reason(proc.exitcode)}) while training "
            "clients; the round is lost, the last checkpoint is intact (continue with "
            "`fedumm run --resume`)")

    def send(self, msg: Any) -> None:
        """``msg`` to every worker; one that has died (its pipe is closed: BrokenPipeError)
        raises :class:`WorkerDiedError` naming it, as a death while waiting does."""
        for conn, proc in zip(self._conns, self._procs, strict=True):
            try:
                conn.send(msg)
            except OSError:
                proc.join(timeout=1.0)
                raise self._death(proc) from None

    def results(self, poll_s: float = 0.5) -> list[Any]:
        """Every worker's answer to the last message, in worker order. A worker's exception
        is raised here (with its traceback as the cause); a worker that dies first raises
        :class:`WorkerDiedError`."""
        out: list[Any] = [None] * len(self._conns)
        waiting = set(range(len(self._conns)))
        while waiting:
            wait([*(self._conns[i] for i in waiting), *(self._procs[i].sentinel
                                                        for i in waiting)], timeout=poll_s)
            for i in sorted(waiting):
                if self._conns[i].poll():  # an answer comes before the death that follows it
                    try:
                        ok, value = self._conns[i].recv()
                    except (EOFError, OSError):
                        self._procs[i].join(timeout=1.0)
                        raise self._death(self._procs[i]) from None
                    if not ok:
                        exc, tb = value
                        raise exc from RemoteTraceback(tb)
                    out[i] = value
                    waiting.discard(i)
                elif self._procs[i].exitcode is not None:
                    raise self._death(self._procs[i])
        return out

    def close(self, grace_s: float = 5.0) -> None:
        """Stop every worker now (SIGTERM, then SIGKILL after ``grace_s``); returns once all
        have ended."""
        with deferred_signals():
            for proc in self._procs:
                if proc.exitcode is None:
                    proc.terminate()
            deadline = time.monotonic() + grace_s
            for proc in self._procs:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
                if proc.exitcode is None:
                    proc.kill()
                    proc.join(timeout=grace_s)
            for conn in self._conns:
                conn.close()

"""The run directory contract (see DESIGN.md): config, metrics, checkpoint, summary, report.

A run folder follows the output policy (:mod:`fedumm.outputs`): it is new, empty or marked
``.fedumm-run``; every write is atomic (temporary file + rename), so an interrupted run or a
full disk never leaves a half-written checkpoint or summary that looks complete, and a file
fedumm did not write is never replaced. Every metric record is also written as TensorBoard
scalars in ``tb/`` (:mod:`fedumm.runtime.tracking`), a view of ``metrics.jsonl`` kept
consistent with it on resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from fedumm.config import Config, load_config
from fedumm.outputs import (
    OutputError,
    OutputFolder,
    append_text,
    write_file,
    write_tree,
)
from fedumm.runtime import tracking

# a run folder that cannot be used as asked (finished run, foreign folder, resume without a
# run) is an output error: one line through the command line
RunDirError = OutputError


class RunFailedError(RuntimeError):
    """A run ended without a result (e.g. a federated site failed); says where and why."""


class RunDirectory:
    CONFIG, METRICS, SUMMARY, CHECKPOINT, ADAPTERS, REPORT, PARTITION = (
        "config.yaml", "metrics.jsonl", "summary.json", "checkpoint", "adapters", "report.md",
        "partition.json")
    TENSORBOARD = "tb"
    DATA = "data.json"  # words of the data the backbone's tokenizer does not know
    MARKER, LOCK = ".fedumm-run", ".lock"
    ERROR = "error.txt"  # a failed sweep cell's traceback
    # what a run writes, recorded in the marker at once when the run starts
    FILES = (CONFIG, METRICS, SUMMARY, f"{CHECKPOINT}/state.pt", REPORT, PARTITION,
             "accuracy.png", "bytes.png", DATA)

    def __init__(self, path: str | Path, *, option: str = "--out") -> None:
        self.path = Path(path)
        self._tb: tracking.TensorBoardLog | None = None
        # file_like_ok: a sweep names its cells' run folders after grid values
        self._folder = OutputFolder(self.path, "run", option=option, file_like_ok=True)
        self._claimed = False

    def _out(self) -> OutputFolder:
        """The run folder claimed for this process's writes (checked and marked once)."""
        if not self._claimed:
            self._folder.claim()
            self._claimed = True
        return self._folder

    def is_marked(self) -> bool:
        """Whether fedumm made this folder for a run (``.fedumm-run``)."""
        return self._folder.is_marked()

    def check(self) -> None:
        """Refuse unless the folder is new, empty or a run folder fedumm made."""
        self._folder.check()

    @property
    def checkpoint_file(self) -> Path:
        return self.path / self.CHECKPOINT / "state.pt"

    def is_finished(self) -> bool:
        return (self.path / self.SUMMARY).is_file()

    def create(self, cfg: Config) -> None:
        """Start a new run. Refuses a folder that holds anything but an earlier attempt of a
        fedumm run that never checkpointed (a finished or interrupted run, or the user's own
        files, are never overwritten)."""
        self._folder.check()
        if self.is_finished():
            raise RunDirError(f"{self.path} already holds a finished run (summary.json); choose "
                              "another --out or delete it")
        if self.checkpoint_file.is_file():
            raise RunDirError(f"{self.path} holds an interrupted run; continue it with "
                              f"`fedumm run --resume {self.path}` or choose another --out")
        self._folder.claim([self.path / name for name in self.FILES])
        self._claimed = True
        write_file(self.path / self.CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_file(self.path / self.METRICS, b"")
        self.close()
        tracking.clear(self.path / self.TENSORBOARD)  # a previous attempt's curves

    def load_config(self) -> Config:
        """The config of the run to resume; only a folder fedumm marked as a run resumes
        (a ``config.yaml`` alone may sit among a user's own files)."""
        if not self.path.is_dir():
            raise RunDirError(f"{self.path} is not a run directory (no such folder); --resume "
                              "takes the folder of an interrupted run")
        if not self.is_marked():
            shown = ", ".join(self._folder.entries()[:5]) or "nothing"
            raise RunDirError(f"{self.path} is not a run directory fedumm started (no "
                              f"{self.MARKER}; it holds {shown}); nothing was changed. If "
                              f"fedumm did start it, create {self.path / self.MARKER} and run "
                              "the command again")
        if not (self.path / self.CONFIG).is_file():
            raise RunDirError(f"{self.path} is not a run directory (no {self.CONFIG})")
        if self.is_finished():
            raise RunDirError(f"{self.path} already finished; nothing to resume")
        return load_config(self.path / self.CONFIG)

    # ---------------------------------------------------------------- metrics
    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` and write its TensorBoard scalars (the
        first record this object logs replays the file into ``tb/``, so ``tb/`` mirrors it)."""
        self._out()
        append_text(self.path / self.METRICS, json.dumps(record) + "\n")
        if self._tb is None:
            self._rebuild_tensorboard(self._tolerant_metrics())
        else:
            self._tb.log(record)

    @contextlib.contextmanager
    def lock(self):
        """Hold the folder for the lifetime of a run: a second writer is refused."""
        self._folder.check()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create the run folder {self.path}: {exc.strerror}; "
                              "choose another --out") from exc
        f = open(self.path / self.LOCK, "a+")  # noqa: SIM115 (held until the block ends)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from fedumm.runtime.procs import describe, holders

            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            # forked workers share the lock: name every process that holds it (a worker left
            # by a killed run holds it too)
            pids = [p for p in holders(self.path / self.LOCK) if p != os.getpid()]
            who = f"; processes holding it: {describe(pids)} (wait for them to end, or stop " \
                f"them: kill {' '.join(map(str, pids))})" if pids else ""
            raise RunDirError(f"{self.path} is in use by {holder}{who}; wait for it or choose "
                              "another --out") from None
        f.truncate(0)
        f.write(f"fedumm process {os.getpid()}")
        f.flush()
        try:
            yield self
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop records of rounds after ``last_round`` (written before an interruption)."""
        # a line a kill cut short is dropped (the rounds it belonged to are redone)
        keep = [m for m in self._tolerant_metrics() if m.get("round", -1) <= last_round]
        self._out()
        write_file(self.path / self.METRICS, "".join(json.dumps(m) + "\n" for m in keep))
        self._rebuild_tensorboard(keep)  # the dropped rounds leave TensorBoard too

    # ---------------------------------------------------------------- TensorBoard
    def _tolerant_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``, skipping a line a kill cut short."""
        out = []
        try:
            lines = (self.path / self.METRICS).read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def _rebuild_tensorboard(self, records: list[dict[str, Any]]) -> None:
        """Make ``tb/`` the replay of ``records`` and keep its writer for the next ones."""
        self.close()
        self._tb = tracking.TensorBoardLog.rebuild(self.path / self.TENSORBOARD, records)
        weakref.finalize(self, self._tb.close)  # also at interpreter exit

    def close(self) -> None:
        """Close the TensorBoard writer (every record is flushed already; logging again
        reopens it)."""
        if self._tb is not None:
            tb, self._tb = self._tb, None
            tb.close()

    # ---------------------------------------------------------------- checkpoint
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        self._out()
        write_file(self.checkpoint_file, lambda f: torch.save(state, f))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint (None before the first round), checked before any of it is
        used: readable, the keys a round writes, finite server state. A client's own state
        (``transport``) is not checked: a diverged client may hold NaN optimizer moments and
        is rejected each round as in an uninterrupted run."""
        from fedumm.models.checksums import nonfinite_entry

        file = self.checkpoint_file
        if not file.is_file():
            return None
        unusable = f"; the run cannot resume from it (delete {file} to restart the run)"
        if file.stat().st_size == 0:
            raise RunDirError(f"{file} is empty{unusable}")
        try:  # tensors, numbers and strings only: a checkpoint cannot run code
            state = torch.load(file, weights_only=True)
        except Exception as exc:
            lines = str(exc).splitlines() or [""]
            raise RunDirError(f"{file} cannot be read ({type(exc).__name__}: "
                              f"{lines[0][:200]}){unusable}") from exc
        if not isinstance(state, dict):
            raise RunDirError(f"{file} holds a {type(state).__name__}, not a checkpoint"
                              f"{unusable}")
        missing = [k for k in ("round", "states", "strategy", "counters", "fingerprint")
                   if k not in state]
        if missing:
            raise RunDirError(f"{file} has no {missing[0]!r}: not a complete checkpoint"
                              f"{unusable}")
        if isinstance(state["round"], bool) or not isinstance(state["round"], int) or \
                state["round"] < 0:
            raise RunDirError(f"{file}: round {state['round']!r} is not a round number"
                              f"{unusable}")
        bad = nonfinite_entry({k: v for k, v in state.items() if k not in ("transport",
                                                                           "counters")})
        if bad is not None:
            raise RunDirError(f"{file}: {bad} holds NaN or infinite values{unusable}")
        return state

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        self._out()
        write_file(self.path / name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_text(self, name: str, text: str) -> None:
        self._out()
        write_file(self.path / name, text)

    def remove(self, name: str) -> None:
        """Delete a file of the run that fedumm wrote (never one it did not)."""
        self._out().remove(self.path / name)

    def write_folder(self, name: str, save: Callable[[Path], object]) -> Path:
        """A sub-folder written by code that takes a folder path (the PEFT adapters:
        ``run_dir.write_folder(run_dir.ADAPTERS, adapters.export)``), through the policy:
        staged, then every file copied atomically; a full disk is one line naming the file."""
        self._out()
        write_tree(self.path / name, save)
        return self.path / name

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json(self.SUMMARY, summary)
        self.close()  # the run is over

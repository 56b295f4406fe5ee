"""The run directory contract (see DESIGN.md): config, metrics, checkpoint, summary, report.

Writes are atomic (temporary file + rename), so an interrupted run never leaves a half-written
checkpoint or summary that looks complete. Every metric record is also written as TensorBoard
scalars in ``tb/`` (:mod:`fedumm.runtime.tracking`), a view of ``metrics.jsonl`` kept consistent
with it on resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import weakref
from pathlib import Path
from typing import Any

import torch

from fedumm.config import Config, load_config
from fedumm.runtime import tracking


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (finished run, or resume without a run)."""


class RunFailedError(RuntimeError):
    """A run ended without a result (e.g. a federated site failed); says where and why."""


@contextlib.contextmanager
def _temporary(path: Path):
    """A temporary file beside ``path`` that replaces it on success and is removed on any
    failure (a full disk leaves no partial file holding the space)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _temporary(path) as tmp:
        tmp.write_bytes(data)


class RunDirectory:
    CONFIG, METRICS, SUMMARY, CHECKPOINT, ADAPTERS, REPORT, PARTITION = (
        "config.yaml", "metrics.jsonl", "summary.json", "checkpoint", "adapters", "report.md",
        "partition.json")
    TENSORBOARD = "tb"
    MARKER, LOCK = ".fedumm-run", ".lock"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tb: tracking.TensorBoardLog | None = None

    @property
    def checkpoint_file(self) -> Path:
        return self.path / self.CHECKPOINT / "state.pt"

    def is_finished(self) -> bool:
        return (self.path / self.SUMMARY).is_file()

    def create(self, cfg: Config) -> None:
        """Start a new run. Refuses a folder that holds anything but an earlier attempt of a
        fedumm run that never checkpointed (a finished or interrupted run, or the user's own
        files, are never overwritten)."""
        self._refuse_foreign(allow_legacy=False)
        if self.is_finished():
            raise RunDirError(f"{self.path} already holds a finished run (summary.json); choose "
                              "another --out or delete it")
        if self.checkpoint_file.is_file():
            raise RunDirError(f"{self.path} holds an interrupted run; continue it with "
                              f"`fedumm run --resume {self.path}` or choose another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / self.MARKER).write_text("a fedumm run folder\n")
        except OSError as exc:
            raise RunDirError(f"cannot create the run folder {self.path}: {exc.strerror}"
                              ) from exc
        cfg.save(self.path / self.CONFIG)
        (self.path / self.METRICS).write_text("")
        self.close()
        tracking.clear(self.path / self.TENSORBOARD)  # a previous attempt's curves

    def load_config(self) -> Config:
        if not (self.path / self.CONFIG).is_file():
            raise RunDirError(f"{self.path} is not a run directory (no {self.CONFIG})")
        if self.is_finished():
            raise RunDirError(f"{self.path} already finished; nothing to resume")
        return load_config(self.path / self.CONFIG)

    # ---------------------------------------------------------------- metrics
    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` and write its TensorBoard scalars (the
        first record this object logs replays the file into ``tb/``, so ``tb/`` mirrors it)."""
        with open(self.path / self.METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            self._rebuild_tensorboard(self._tolerant_metrics())
        else:
            self._tb.log(record)

    def _refuse_foreign(self, allow_legacy: bool) -> None:
        """A clear error unless the folder is new, empty, or a fedumm run folder (marked; with
        ``allow_legacy`` also one with a config.yaml from before the marker existed)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a folder; choose another --out")
        entries = sorted(p.name for p in self.path.iterdir()
                         if p.name != self.LOCK) if self.path.is_dir() else []
        ours = (self.path / self.MARKER).is_file() or (
            allow_legacy and (self.path / self.CONFIG).is_file())
        if entries and not ours:
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise RunDirError(f"{self.path} exists and is not a fedumm run folder (it holds "
                              f"{shown}); choose a new --out: fedumm never writes into a "
                              "folder it did not create")

    @contextlib.contextmanager
    def lock(self):
        """Hold the folder for the lifetime of a run: a second writer is refused."""
        self._refuse_foreign(allow_legacy=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create the run folder {self.path}: {exc.strerror}"
                              ) from exc
        f = open(self.path / self.LOCK, "a+")  # noqa: SIM115 (held until the block ends)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"{self.path} is in use by {holder}; wait for it or choose "
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
        atomic_write_bytes(self.path / self.METRICS,
                            "".join(json.dumps(m) + "\n" for m in keep).encode())
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
        (self.path / self.CHECKPOINT).mkdir(parents=True, exist_ok=True)
        with _temporary(self.checkpoint_file) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_file.is_file():
            return None
        try:  # tensors, numbers and strings only: a checkpoint cannot run code
            return torch.load(self.checkpoint_file, weights_only=True)
        except Exception as exc:
            raise RunDirError(f"{self.checkpoint_file} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); the run cannot resume from "
                              "it") from exc

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / name,
                            (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json(self.SUMMARY, summary)
        self.close()  # the run is over

"""The run directory contract (see DESIGN.md): config, metrics, checkpoint, summary, report.

Writes are atomic (temporary file + rename), so an interrupted run never leaves a half-written
checkpoint or summary that looks complete. Every metric record is also written as TensorBoard
scalars in ``tb/`` (:mod:`fedumm.runtime.tracking`), a view of ``metrics.jsonl`` kept consistent
with it on resume.
"""

from __future__ import annotations

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RunDirectory:
    CONFIG, METRICS, SUMMARY, CHECKPOINT, ADAPTERS, REPORT, PARTITION = (
        "config.yaml", "metrics.jsonl", "summary.json", "checkpoint", "adapters", "report.md",
        "partition.json")
    TENSORBOARD = "tb"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tb: tracking.TensorBoardLog | None = None

    @property
    def checkpoint_file(self) -> Path:
        return self.path / self.CHECKPOINT / "state.pt"

    def is_finished(self) -> bool:
        return (self.path / self.SUMMARY).is_file()

    def create(self, cfg: Config) -> None:
        """Start a new run; refuses to overwrite a finished or interrupted one."""
        if self.is_finished():
            raise RunDirError(f"{self.path} already holds a finished run (summary.json); choose "
                              "another --out or delete it")
        if self.checkpoint_file.is_file():
            raise RunDirError(f"{self.path} holds an interrupted run; continue it with "
                              f"`fedumm run --resume {self.path}` or choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
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

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop records of rounds after ``last_round`` (written before an interruption)."""
        keep = [m for m in self.metrics() if m.get("round", -1) <= last_round]
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
        tmp = self.checkpoint_file.with_name("state.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_file)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_file.is_file():
            return None
        return torch.load(self.checkpoint_file, weights_only=False)

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / name,
                            (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json(self.SUMMARY, summary)
        self.close()  # the run is over

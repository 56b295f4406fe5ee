"""TensorBoard event files from the ``metrics.jsonl`` records of a run (``<run>/tb``).

Every record a runtime logs through :meth:`fedumm.runtime.run_dir.RunDirectory.log` becomes
scalars at ``step = round + 1`` (the frozen base, round -1, is step 0):

* ``eval``: ``eval/vqa_accuracy``, ``eval/geneval_overall``, ``eval/generation_quality``,
  ``eval/vqa_by_answer_type/<type>``, ``eval/geneval_by_task/<task>``;
* ``round``: ``train/und_loss`` and ``train/gen_loss`` (mean over the clients that report
  them), ``comm/upload_bytes`` (the round's sum) and ``comm/upload_bytes_cumulative``,
  ``clients/selected``, ``clients/rejected``, ``memory/peak_rss_mib``, ``quality/<modality>``
  (mean over clients) and ``aggregation/error/<group>`` when the record has it.

``metrics.jsonl`` is the source of truth; the event files are a view of it. A
:class:`TensorBoardLog` is therefore started with :meth:`TensorBoardLog.rebuild`, which replaces
the event files in the folder by a replay of the records given (keeping each point's original
wall time when the old files have it). A resumed run rebuilds from the records it kept, so
TensorBoard never holds a point of a round that was redone, nor two points for one step (a
record for a step already written is skipped), whatever reader shows the files.

Tracking never stops a run: any error is caught and reported once with :func:`warnings.warn`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

EVENT_FILE_PREFIX = "events.out.tfevents."
HEADLINE_EVAL = ("vqa_accuracy", "geneval_overall", "generation_quality")
EVAL_GROUPS = ("vqa_by_answer_type", "geneval_by_task")
LOSSES = ("und_loss", "gen_loss")
MIB = 2 ** 20
_WARNED: set[str] = set()  # the folders whose failure was reported (once per process)


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (bools and strings are not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _mean(values: Iterable[Any]) -> float | None:
    nums = [v for v in (_number(x) for x in values) if v is not None]
    return math.fsum(nums) / len(nums) if nums else None


def _per_client(field: Any) -> list[Mapping[str, Any]]:
    """The per-client dicts of a ``{client: {key: value}}`` field (anything else: none)."""
    if not isinstance(field, Mapping):
        return []
    return [v for v in field.values() if isinstance(v, Mapping)]


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of a ``round`` record, except the cumulative bytes (a running total)."""
    out: dict[str, float | None] = {}
    losses = _per_client(record.get("train_loss"))
    for key in LOSSES:
        out[f"train/{key}"] = _mean(m.get(key) for m in losses)
    out["comm/upload_bytes"] = _number(record.get("upload_bytes"))
    clients = record.get("clients")
    if isinstance(clients, (list, tuple)):
        out["clients/selected"] = float(len(clients))
    rejected = record.get("rejected") or []
    if isinstance(rejected, (list, tuple)):
        out["clients/rejected"] = float(len(rejected))
    for key in ("dropped", "late"):  # faults: clients that sent nothing, or too late
        if isinstance(record.get(key), (list, tuple)):
            out[f"clients/{key}"] = float(len(record[key]))
    privacy = record.get("privacy")
    if isinstance(privacy, Mapping):  # the run's epsilon so far (sample- and client-level)
        out["privacy/epsilon"] = _number(privacy.get("epsilon"))
        for level in ("sample", "client"):
            if isinstance(privacy.get(level), Mapping):
                out[f"privacy/{level}_epsilon"] = _number(privacy[level].get("epsilon"))
    rss = _number(record.get("peak_rss_bytes"))
    out["memory/peak_rss_mib"] = rss / MIB if rss is not None else None
    quality = _per_client(record.get("quality"))
    for modality in sorted({str(k) for q in quality for k in q}):
        out[f"quality/{modality}"] = _mean(q.get(modality) for q in quality)
    errors = record.get("aggregation_error")
    if isinstance(errors, Mapping):
        for group, value in errors.items():
            out[f"aggregation/error/{group}"] = _number(value)
    return {k: v for k, v in out.items() if v is not None}


def eval_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of an ``eval`` record."""
    out: dict[str, float | None] = {f"eval/{k}": _number(record.get(k)) for k in HEADLINE_EVAL}
    for group in EVAL_GROUPS:
        values = record.get(group)
        if isinstance(values, Mapping):
            for key, value in values.items():
                out[f"eval/{group}/{key}"] = _number(value)
    return {k: v for k, v in out.items() if v is not None}


def event_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob(EVENT_FILE_PREFIX + "*")) if log_dir.is_dir() else []


def clear(log_dir: str | Path) -> None:
    """Delete the event files in ``log_dir`` (nothing else)."""
    for f in event_files(Path(log_dir)):
        f.unlink(missing_ok=True)


def _wall_times(log_dir: Path) -> dict[tuple[str, int], float]:
    """``(tag, step) -> wall time`` of the scalars already in ``log_dir`` (first one wins)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[tuple[str, int], float] = {}
    for path in event_files(log_dir):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                out.setdefault((value.tag, int(event.step)), float(event.wall_time))
    return out


class TensorBoardLog:
    """Scalars of metric records in the TensorBoard event files of ``log_dir``.

    ``upload_bytes_before``: the upload bytes of rounds already written (to continue
    ``comm/upload_bytes_cumulative``). Use :meth:`rebuild` to start one in a folder that may
    hold event files already."""

    def __init__(self, log_dir: str | Path, *, upload_bytes_before: float = 0.0,
                 wall_times: Mapping[tuple[str, int], float] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.upload_bytes_cumulative = float(upload_bytes_before)
        self.last_step: dict[str, int] = {}  # tag -> the last step written
        self.last_round_step = -1
        self._wall_times = dict(wall_times or {})
        self._writer = None
        self._closed = False  # closed, or no writer can be made (warned)

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def rebuild(cls, log_dir: str | Path, records: Iterable[Mapping[str, Any]] = ()
                ) -> TensorBoardLog:
        """A log whose folder holds exactly the replay of ``records`` (in their order): the
        event files already there are replaced, their points' wall times kept."""
        log_dir = Path(log_dir)
        log = cls(log_dir)
        try:
            if event_files(log_dir):
                try:
                    log._wall_times = _wall_times(log_dir)
                except Exception:  # unreadable old files: replayed points get the time now
                    log._wall_times = {}
                clear(log_dir)
            for record in records:
                log.log(record)
        except Exception as e:  # tracking never stops a run
            log._warn(e)
        log._wall_times = {}  # only the replay reuses old times
        return log

    def _get_writer(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs `tensorboard`

                self.log_dir.mkdir(parents=True, exist_ok=True)
                self._writer = SummaryWriter(str(self.log_dir))
            except Exception:
                self._closed = True  # do not retry for every record
                raise
        return self._writer

    def flush(self) -> None:
        if self._writer is not None:
            try:
                self._writer.flush()
            except Exception as e:
                self._warn(e)

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except Exception as e:
                self._warn(e)

    def _warn(self, error: BaseException) -> None:
        key = str(self.log_dir.resolve())
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"TensorBoard logging to {self.log_dir} failed "
                          f"({type(error).__name__}: {error}); the run goes on and "
                          "metrics.jsonl has every record", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ records
    def scalars(self, record: Mapping[str, Any]) -> tuple[int, dict[str, float]] | None:
        """``(step, {tag: value})`` of a record, or None for a record without scalars. The
        running totals (cumulative bytes) advance when the record is a new round."""
        kind, rnd = record.get("type"), _number(record.get("round"))
        if rnd is None or kind not in ("round", "eval"):
            return None
        step = int(rnd) + 1
        if kind == "eval":
            return step, eval_scalars(record)
        if step <= self.last_round_step:  # a round already written: nothing new
            return step, {}
        values = round_scalars(record)
        self.upload_bytes_cumulative += values.get("comm/upload_bytes", 0.0)
        values["comm/upload_bytes_cumulative"] = self.upload_bytes_cumulative
        self.last_round_step = step
        return step, values

    def log(self, record: Mapping[str, Any]) -> None:
        """Write a record's scalars and flush; never raises (an error is warned about once).
        A tag's point at a step it already has is skipped (one value per step)."""
        if self._closed or not isinstance(record, Mapping):
            return
        try:
            found = self.scalars(record)
            if found is None:
                return
            step, values = found
            new = {tag: v for tag, v in values.items() if step > self.last_step.get(tag, -1)}
            if not new:
                return
            writer = self._get_writer()
            for tag, value in new.items():
                writer.add_scalar(tag, value, global_step=step,
                                  walltime=self._wall_times.get((tag, step)))
                self.last_step[tag] = step
            writer.flush()  # a run can be killed at any time
        except Exception as e:  # tracking never stops a run
            self._warn(e)

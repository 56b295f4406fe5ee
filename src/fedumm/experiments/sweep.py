"""Grids of runs: any config key can be an axis; cells run one after another and resume.

    fedumm sweep configs/paper_table1.yaml --grid clients=2,4 --grid partition.alpha=0.1,1.0

A sweep directory holds one run directory per cell plus ``sweep.json`` / ``sweep.csv`` (one row
per cell: its axis values and the figures of its ``summary.json``), rewritten after every cell
so an interrupted sweep loses nothing. On re-run a finished cell is skipped, an interrupted one
resumes, and a failed one is tried again; a failing cell is recorded and the sweep goes on.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedumm.config import (
    Config,
    ConfigError,
    SweepConfig,
    config_from_dict,
    load_config,
    parse_override,
)
from fedumm.outputs import OutputFolder, OutputWriteError, write_file
from fedumm.runtime.run_dir import RunDirectory

SWEEP_JSON, SWEEP_CSV = "sweep.json", "sweep.csv"
# summary.json figures copied into every row (dotted); per-client lists stay in the run dir
ROW_PREFIXES = ("final.", "base.", "communication.", "time.", "memory.")


METHOD = "method"  # the axis of named override bundles (``sweep.methods``)


@dataclass
class Cell:
    """One run of a sweep: a name (its folder) and the overrides that make its config."""

    name: str
    values: dict[str, Any]  # axis (or baseline) key -> value; "method" names a bundle
    baseline: bool = False
    bundle: dict[str, Any] | None = None  # the overrides of its method

    def overrides(self) -> list[str]:
        items = {k: v for k, v in self.values.items() if k != METHOD}
        items.update(self.bundle or {})
        return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in items.items()]


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``"partition.alpha=0.1,0.5"`` -> ("partition.alpha", [0.1, 0.5]); values read as YAML."""
    parts, _ = parse_override(text)
    raw = text.split("=", 1)[1]
    values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"grid axis {text!r}: no values; expected key=v1,v2,...")
    if len(set(map(str, values))) != len(values):
        raise ConfigError(f"grid axis {text!r}: a value is repeated")
    return ".".join(parts), values


def parse_baseline(text: str) -> dict[str, Any]:
    """``"strategy.name=centralized clients=1"`` -> {"strategy.name": "centralized", ...}."""
    out: dict[str, Any] = {}
    for item in text.split():
        parts, value = parse_override(item)
        out[".".join(parts)] = value
    if not out:
        raise ConfigError(f"baseline {text!r}: expected key=value [key=value ...]")
    return out


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``"fedprox: strategy.name=fedprox strategy.mu=0.01"`` -> ("fedprox", {...}); a method
    with no overrides (``"fedavg:"``) runs the base config."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise ConfigError(f"sweep method {text!r}: expected 'name: key=value ...' with a name "
                          "of letters, digits and _ . + -")
    return name, parse_baseline(rest) if rest.strip() else {}


def _slug(values: dict[str, Any]) -> str:
    text = "_".join(f"{k}-{v}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text) or "default"


def expand_grid(axes: list[tuple[str, list[Any]]],
                baselines: list[dict[str, Any]] | None = None,
                methods: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
    """Every combination of the axes (first axis slowest; the methods, when given, are the
    last axis), then one cell per baseline."""
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys) or METHOD in keys:
        raise ConfigError(f"grid: an axis is given twice or is named {METHOD!r} ({keys})")
    lists = [v for _, v in axes]
    if methods:
        keys, lists = [*keys, METHOD], [*lists, list(methods)]
    cells = []
    for combo in itertools.product(*lists):
        values = dict(zip(keys, combo, strict=True))
        cells.append(Cell(_slug(values), values,
                          bundle=methods.get(values[METHOD]) if methods else None))
    for b in baselines or []:
        cells.append(Cell("baseline_" + _slug(b), dict(b), baseline=True))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError("grid: two cells get the same folder name; make the values distinct")
    return cells


def merge_axes(base: list[str], extra: list[str]) -> list[tuple[str, list[Any]]]:
    """The config's ``sweep.grid`` with command-line axes replacing (or adding) keys."""
    merged: dict[str, list[Any]] = {}
    for text in [*base, *extra]:
        key, values = parse_axis(text)
        merged[key] = values
    return list(merged.items())


def _flatten(d: dict[str, Any], prefix: str = "", lists: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + ".", lists))
        elif lists or not isinstance(v, list):
            out[key] = v
    return out


def summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run's summary.json that a sweep row carries."""
    flat = _flatten(summary)
    keep = {k: v for k, v in flat.items() if k.startswith(ROW_PREFIXES)}
    keep.update({k: summary[k] for k in ("strategy", "rounds", "clients", "seed")
                 if k in summary})
    return keep


def _write_tables(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    write_file(out / SWEEP_JSON, json.dumps({**meta, "cells": rows}, indent=2) + "\n")
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_file(out / SWEEP_CSV, buf.getvalue())


def _check_same_config(run: Path, cfg: Config) -> None:
    """A cell folder from an earlier sweep must hold the same config, or results would mix."""
    saved = _flatten(load_config(run / RunDirectory.CONFIG).to_dict(), lists=True)
    now = _flatten(cfg.to_dict(), lists=True)
    diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if diff:
        raise ConfigError(f"{run} was run with another config (differs in {diff[:5]}); "
                          "use a new --out for a changed sweep")


RunFn = Callable[..., dict[str, Any]]


def run_sweep(raw: dict[str, Any], out: str | Path, *, grid: list[str] | None = None,
              baselines: list[str] | None = None, overrides: list[str] | None = None,
              run_fn: RunFn | None = None, progress: bool = True, jobs: int = 1,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every cell of a sweep into ``out``; returns the ``sweep.json`` content.

    ``raw`` is the YAML mapping of the base config (its ``sweep`` section gives the default
    grid and baselines); ``grid`` / ``baselines`` add to or replace them; ``overrides`` apply
    to every cell. Every cell's config is validated before the first run starts. ``jobs`` > 1
    runs that many cells at once, each in its own process (give each ``train.threads``).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if run_fn is None:
        from fedumm.runtime.dispatch import run_experiment as run_fn
    base = config_from_dict(raw, overrides)
    axes = merge_axes(base.sweep.grid, grid or [])
    base_lines = baselines if baselines else base.sweep.baselines
    methods = dict(parse_method(m) for m in base.sweep.methods)
    if len(methods) != len(base.sweep.methods):
        raise ConfigError("sweep.methods: two methods have the same name")
    cells = expand_grid(axes, [parse_baseline(b) for b in base_lines], methods)
    configs = {}
    for cell in cells:
        try:
            cfg = config_from_dict(raw, [*(overrides or []), *cell.overrides()])
        except ConfigError as exc:
            raise ConfigError(f"sweep cell {cell.name}: {exc}") from exc
        cfg.name = f"{base.name}/{cell.name}"
        cfg.sweep = SweepConfig()  # a cell is a plain run; the grid lives in sweep.json
        if jobs > 1 and cfg.workers > 1:  # a cell's process may not fork workers of its own
            raise ConfigError(f"sweep cell {cell.name}: workers={cfg.workers} with --jobs "
                              f"{jobs}; cells run in parallel processes, which cannot start "
                              "client workers: use either (workers=1 with --jobs N, or "
                              "--jobs 1 with workers=N)")
        configs[cell.name] = cfg
    out = Path(out)
    # the sweep folder and every cell folder follow the output policy; checked before any run
    sweep_folder = OutputFolder(out, "sweep")
    sweep_folder.check()
    for cell in cells:
        RunDirectory(out / cell.name).check()
    sweep_folder.claim()
    meta = {"name": base.name, "axes": [[k, v] for k, v in axes],
            "baselines": [c.values for c in cells if c.baseline],
            "methods": dict(methods)}
    rows: dict[int, dict[str, Any]] = {}
    t0 = time.perf_counter()
    todo: list[tuple[int, Cell, bool]] = []
    for i, cell in enumerate(cells):
        run = out / cell.name
        d = RunDirectory(run)
        if d.is_marked() and (run / RunDirectory.CONFIG).is_file():
            _check_same_config(run, configs[cell.name])
        if d.is_marked() and d.is_finished():
            summary = json.loads((run / RunDirectory.SUMMARY).read_text())
            rows[i] = {"cell": cell.name, "baseline": cell.baseline, **cell.values,
                       "status": "done", "reused": True, **summary_row(summary)}
            log(f"[{i + 1}/{len(cells)}] {cell.name}: finished earlier, skipped")
        else:
            todo.append((i, cell, d.checkpoint_file.is_file()))

    def record(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        done = [rows[j] for j in sorted(rows)]
        meta.update(wall_s=round(time.perf_counter() - t0, 2), cells_wall_s=cells_wall_s(done))
        _write_tables(out, meta, done)

    if jobs > 1 and len(todo) > 1:
        _run_parallel(todo, configs, out, run_fn, jobs, len(cells), record, log)
    else:
        for i, cell, resume in todo:
            log(f"[{i + 1}/{len(cells)}] {cell.name}: {'resuming' if resume else 'running'}")
            row = _run_cell(cell, configs[cell.name], out / cell.name, resume, run_fn, progress)
            log(_cell_line(i, len(cells), row))
            record(i, row)
    final = [rows[j] for j in sorted(rows)]
    meta.update(wall_s=round(time.perf_counter() - t0, 2), cells_wall_s=cells_wall_s(final))
    _write_tables(out, meta, final)
    return {**meta, "cells": final}


def _run_cell(cell: Cell, cfg: Config, run: Path, resume: bool, run_fn: RunFn,
              progress: bool) -> dict[str, Any]:
    """Run (or resume) one cell; its row, also when it fails (the sweep goes on)."""
    row: dict[str, Any] = {"cell": cell.name, "baseline": cell.baseline, **cell.values}
    try:
        summary = run_fn(None if resume else cfg, run, resume=resume, progress=progress)
    except OutputWriteError:  # a full disk fails every cell after it: stop with one line
        raise
    except Exception as exc:  # a failed cell is recorded; the sweep goes on
        RunDirectory(run).write_text(RunDirectory.ERROR, traceback.format_exc())
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    else:
        RunDirectory(run).remove(RunDirectory.ERROR)
        row.update(status="done", reused=False, **summary_row(summary))
    return row


def _cell_line(i: int, n: int, row: dict[str, Any]) -> str:
    head = f"[{i + 1}/{n}] {row['cell']}"
    if row["status"] != "done":
        return f"{head}: FAILED ({row['error']}); details in error.txt of the cell"
    return (f"{head}: VQA {row.get('final.vqa_accuracy')} | GenEval "
            f"{row.get('final.geneval_overall')} | {row.get('time.wall_s')} s")


_PARALLEL: tuple | None = None  # (configs, out, run_fn) for the forked cell processes


def _parallel_cell(task: tuple[int, Cell, bool]) -> tuple[int, dict[str, Any]]:
    configs, out, run_fn = _PARALLEL
    i, cell, resume = task
    return i, _run_cell(cell, configs[cell.name], out / cell.name, resume, run_fn, False)


def _run_parallel(todo: list[tuple[int, Cell, bool]], configs: dict[str, Config], out: Path,
                  run_fn: RunFn, jobs: int, n: int, record: Callable, log: Callable) -> None:
    """Cells ``jobs`` at a time in forked processes (each run sets its own thread count,
    ``train.threads``), rows recorded as cells finish; the results are those of running the
    cells one after another at the same thread count."""
    import multiprocessing

    global _PARALLEL
    _PARALLEL = (configs, out, run_fn)
    log(f"running {len(todo)} cells, {jobs} at a time")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs, initializer=_cell_worker_init, initargs=(os.getpid(),),
                  maxtasksperchild=1) as pool:  # a fresh process per cell
        for i, row in pool.imap_unordered(_parallel_cell, todo):
            log(_cell_line(i, n, row))
            record(i, row)


def _cell_worker_init(parent: int) -> None:
    """A cell process is stopped by the sweep, not by Ctrl-C, and ends when the sweep ends."""
    from fedumm.runtime.local import worker_signals
    from fedumm.runtime.procs import watch_parent

    worker_signals()
    watch_parent(parent)


def cells_wall_s(rows: list[dict[str, Any]]) -> float:
    """Seconds the finished cells' runs took (reused cells included): the sweep's cost."""
    return round(sum(r.get("time.wall_s", 0.0) for r in rows if r["status"] == "done"), 2)


def load_sweep(path: str | Path) -> dict[str, Any]:
    p = Path(path) / SWEEP_JSON
    if not p.is_file():
        raise FileNotFoundError(f"{path} is not a sweep directory (no {SWEEP_JSON})")
    return json.loads(p.read_text())

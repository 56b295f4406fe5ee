"""``report.md`` for a sweep: the paper's Table 1, GenEval per task, communication, convergence.

Reads only ``sweep.json`` and each cell's run directory (``metrics.jsonl``, ``partition.json``),
so a report can be rebuilt at any time, also from a sweep that is still running.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402

from fedumm.config import BASELINE_MODES  # noqa: E402
from fedumm.experiments.benchmark_report import benchmark_sections  # noqa: E402
from fedumm.experiments.plots import partition_heatmap  # noqa: E402
from fedumm.experiments.sweep import cells_wall_s, load_sweep  # noqa: E402
from fedumm.outputs import write_file  # noqa: E402
from fedumm.runtime.report import fmt_bytes, report_folder, save_figure  # noqa: E402
from fedumm.runtime.run_dir import RunDirectory  # noqa: E402

GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
VQA = "final.vqa_accuracy"


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _centralized(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r.get("strategy") == "centralized"
                 and r["status"] == "done"), None)


def _table_axes(sweep: dict) -> tuple[str | None, str | None, list[str]]:
    """Rows and columns of Table 1 (clients x alpha when both are axes), the other axes."""
    keys = [k for k, _ in sweep["axes"]]
    r_key = "clients" if "clients" in keys else (keys[0] if keys else None)
    rest = [k for k in keys if k != r_key]
    c_key = "partition.alpha" if "partition.alpha" in rest else (rest[0] if rest else None)
    return r_key, c_key, [k for k in rest if k != c_key]


def _values(sweep: dict, key: str | None) -> list[Any]:
    return next((v for k, v in sweep["axes"] if k == key), [None])


def _groups(rows: list[dict], other: list[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r.get("baseline"):
            out.setdefault(tuple(r.get(k) for k in other), []).append(r)
    return out


def table1(sweep: dict) -> list[str]:
    """VQA accuracy by rows x columns, with retention (% of the centralized baseline)."""
    rows = sweep["cells"]
    r_key, c_key, other = _table_axes(sweep)
    central = _centralized(rows)
    ref = central.get(VQA) if central else None
    lines: list[str] = []
    for group_vals, group in _groups(rows, other).items():
        if other:
            lines += [", ".join(f"`{k}={v}`" for k, v in zip(other, group_vals, strict=True)),
                      ""]
        cols = _values(sweep, c_key)
        lines += [f"| {r_key} \\ {c_key} | " + " | ".join(str(c) for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for rv in _values(sweep, r_key):
            cells = []
            for cv in cols:
                r = next((x for x in group if x.get(r_key) == rv and x.get(c_key) == cv), None)
                if r is None or r["status"] != "done":
                    cells.append("failed" if r else "")
                    continue
                acc = r.get(VQA)
                ret = f" ({100 * acc / ref:.1f}%)" if ref and acc is not None else ""
                cells.append(f"{_num(acc)}{ret}")
            lines.append(f"| {rv} | " + " | ".join(cells) + " |")
        lines.append("")
    if central:
        lines += [f"Centralized baseline (all training data on one site, same epochs): VQA "
                  f"**{_num(ref)}**; in parentheses: retention, % of centralized. Frozen base: "
                  f"{_num(central.get('base.vqa_accuracy'))}.", ""]
    return lines


def plot_table1(sweep: dict, out: Path) -> Path | None:
    r_key, c_key, other = _table_axes(sweep)
    if other or c_key is None:
        return None
    rows, cols = _values(sweep, r_key), _values(sweep, c_key)
    mat = np.full((len(rows), len(cols)), np.nan)
    for r in sweep["cells"]:
        if r.get("baseline") or r["status"] != "done":
            continue
        mat[rows.index(r[r_key]), cols.index(r[c_key])] = r.get(VQA, np.nan)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(cols), 1.2 + 0.6 * len(rows)))
    im = ax.imshow(mat, cmap="viridis", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.1f}", ha="center", va="center", color="w",
                        fontsize=9)
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(c_key)
    ax.set_ylabel(r_key)
    central = _centralized(sweep["cells"])
    title = "VQA accuracy (%)"
    if central:
        title += f"; centralized {central.get(VQA, float('nan')):.1f}"
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax)
    return save_figure(fig, out)


def geneval_table(rows: list[dict]) -> list[str]:
    lines = ["| cell | " + " | ".join(GENEVAL_TASKS) + " | overall |",
             "|---|" + "---|" * (len(GENEVAL_TASKS) + 1)]
    for r in rows:
        if r["status"] != "done":
            continue
        vals = [r.get(f"final.geneval_by_task.{t}") for t in GENEVAL_TASKS]
        lines.append(f"| {r['cell']} | " + " | ".join(
            "n/a" if v is None else f"{v:.2f}" for v in vals)
            + f" | {_num_or(r.get('final.geneval_overall'))} |")
    return lines + [""]


def _num_or(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def communication_table(rows: list[dict]) -> list[str]:
    """Bytes per client per round and per round (all clients, up + down), LoRA vs full FT."""
    lines = ["| cell | clients | upload / client / round | download / client / round | "
             "per round, all clients (LoRA) | per round, all clients (full FT) | reduction | "
             "total |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "done" or r.get("strategy") in BASELINE_MODES:
            continue
        up = r.get("communication.upload_bytes_per_client_round", 0.0)
        down = r.get("communication.download_bytes_per_client_round", 0.0)
        full, k = r.get("communication.full_model_bytes", 0), r.get("clients", 0)
        lines.append(
            f"| {r['cell']} | {k} | {fmt_bytes(up)} | {fmt_bytes(down)} | "
            f"{fmt_bytes((up + down) * k)} | {fmt_bytes(2 * full * k)} | "
            f"{r.get('communication.reduction_vs_full')}x | "
            f"{fmt_bytes(r.get('communication.total_bytes', 0))} |")
    return lines + [""]


def plot_convergence(sweep: dict, root: Path, out: Path) -> Path | None:
    """Accuracy vs round: one panel per row value (K), one line per column value (alpha)."""
    r_key, c_key, _ = _table_axes(sweep)
    done = [r for r in sweep["cells"] if r["status"] == "done" and not r.get("baseline")]
    if not done:
        return None
    panels = _values(sweep, r_key)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), sharey=True,
                             squeeze=False)
    central = _centralized(sweep["cells"])
    curve_c = _curve(root / central["cell"]) if central else None
    for ax, pv in zip(axes[0], panels, strict=True):
        for r in done:
            if r.get(r_key) != pv:
                continue
            xs, ys = _curve(root / r["cell"])
            ax.plot(xs, ys, "o-", ms=3, label=f"{c_key}={r.get(c_key)}" if c_key else r["cell"])
        if curve_c:
            ax.plot(*curve_c, "k--", lw=1, label="centralized")
        ax.set_title(f"{r_key}={pv}", fontsize=9)
        ax.set_xlabel("round (0 = frozen base)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("VQA accuracy (%)")
    with_lines = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
    if with_lines:
        with_lines[-1].legend(fontsize=7)
    return save_figure(fig, out)


def _curve(run: Path) -> tuple[list[int], list[float]]:
    evals = [m for m in RunDirectory(run).metrics()
             if m.get("type") == "eval" and "vqa_accuracy" in m]
    return [m["round"] + 1 for m in evals], [m["vqa_accuracy"] for m in evals]


def grid_sections(sweep: dict, sweep_dir: Path, out: Path) -> list[str]:
    """Table 1, GenEval per task, communication, convergence and partitions of a grid sweep."""
    rows = sweep["cells"]
    lines = ["## Table 1: VQA accuracy (official metric, %)", ""]
    lines += table1(sweep)
    png = plot_table1(sweep, out / "table1.png")
    if png:
        lines += [f"![table 1]({png.name})", ""]
    lines += ["## GenEval score per task (0-1)", ""] + geneval_table(rows)
    lines += ["## Communication", "",
              "Measured payload bytes (the codec's output), full fine-tuning = the whole model "
              "in the same dtype sent both ways.", ""] + communication_table(rows)
    png = plot_convergence(sweep, sweep_dir, out / "convergence.png")
    if png:
        lines += ["## Convergence", "", f"![convergence]({png.name})", ""]
    r_key, c_key, _ = _table_axes(sweep)
    kmax = max((r.get(r_key) for r in rows if not r.get("baseline") and r.get(r_key)
                is not None), default=None)
    heat = []
    for r in rows:
        part = sweep_dir / r["cell"] / RunDirectory.PARTITION
        if r.get(r_key) == kmax and not r.get("baseline") and part.is_file():
            title = f"{r_key}={kmax} {c_key}={r.get(c_key)}"
            heat.append(partition_heatmap(json.loads(part.read_text()),
                                          out / f"partition_{r['cell']}.png", title=title))
    if heat:
        lines += ["## Partitions", ""] + [f"![partition]({p.name})" for p in heat] + [""]
    return lines


def write_sweep_report(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    sweep_dir = Path(sweep_dir)
    sweep = load_sweep(sweep_dir)
    out = report_folder(sweep_dir, out, "sweep")
    rows = sweep["cells"]
    failed = [r for r in rows if r["status"] != "done"]
    lines = [f"# Sweep report: {sweep['name']}", "",
             f"{len(rows)} cells ({len(failed)} failed); axes: "
             + ", ".join(f"`{k}` = {v}" for k, v in sweep["axes"])
             + (f"; baselines: {sweep['baselines']}" if sweep.get("baselines") else "")
             + f". Time in the cells' runs: {cells_wall_s(rows) / 60:.1f} min.", ""]
    if sweep.get("methods"):  # a benchmark over named methods: one table per scenario
        lines += benchmark_sections(sweep, out)
    else:
        lines += grid_sections(sweep, sweep_dir, out)
    if failed:
        lines += ["## Failed cells", ""] + [f"- `{r['cell']}`: {r.get('error')}"
                                             for r in failed] + [""]
    return write_file(out / "report.md", "\n".join(lines))

"""Per-scenario tables and plots of a sweep over named methods (FedMLLM's benchmark).

A sweep with ``sweep.methods`` has one axis of scenarios (any other axis than ``seed``) and the
methods as its last axis; a ``seed`` axis makes every number a mean +- std over seeds. Each
scenario gets a table (zero-shot, every method, centralized; VQA, AUC, FedMLLM's hard-label
AUC, macro-F1, GenEval) with the best method per column in bold, and a bar plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402

from fedumm.experiments.sweep import METHOD  # noqa: E402
from fedumm.runtime.report import save_figure  # noqa: E402

COLUMNS = (("final.vqa_accuracy", "VQA"), ("final.auc", "AUC"),
           ("final.auc_hard", "AUC, hard labels"), ("final.macro_f1", "macro-F1"),
           ("final.geneval_overall", "GenEval"))
ZERO_SHOT = "zero-shot (frozen base)"
CENTRAL = "centralized"


def _scenario_key(sweep: dict) -> str | None:
    return next((k for k, _ in sweep["axes"] if k != "seed"), None)


def _stats(rows: list[dict], key: str) -> tuple[float, float, int] | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals)), len(vals)


def _fmt(stat: tuple[float, float, int] | None, digits: int) -> str:
    if stat is None:
        return "n/a"
    mean, std, n = stat
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def scenario_rows(sweep: dict, scenario: Any) -> dict[str, dict[str, Any]]:
    """Label -> {column key: (mean, std, n)} for one scenario: zero-shot, methods, central."""
    skey = _scenario_key(sweep)
    done = [r for r in sweep["cells"] if r["status"] == "done"]
    cells = [r for r in done if not r.get("baseline") and r.get(skey) == scenario]
    central = [r for r in done if r.get("baseline") and r.get("strategy") == "centralized"]
    out: dict[str, dict[str, Any]] = {}
    # the frozen base on the held-out set: the same in every cell of one seed
    base = {r.get("seed"): r for r in cells + central if r.get("base.vqa_accuracy") is not None}
    if base:
        out[ZERO_SHOT] = {k: _stats(list(base.values()), k.replace("final.", "base."))
                          for k, _ in COLUMNS}
    for name in sweep.get("methods", {}):
        mine = [r for r in cells if r.get(METHOD) == name]
        if mine:
            out[name] = {k: _stats(mine, k) for k, _ in COLUMNS}
    if central:
        out[CENTRAL] = {k: _stats(central, k) for k, _ in COLUMNS}
    return out


def scenario_table(sweep: dict, scenario: Any) -> list[str]:
    table = scenario_rows(sweep, scenario)
    methods = [m for m in table if m not in (ZERO_SHOT, CENTRAL)]
    best = {}
    for key, _ in COLUMNS:
        vals = {m: table[m][key][0] for m in methods if table[m].get(key)}
        best[key] = max(vals.values()) if vals else None
    lines = ["| method | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for m, stats in table.items():
        cells = []
        for key, _ in COLUMNS:
            text = _fmt(stats.get(key), 3 if key == "final.geneval_overall" else 2)
            if m in methods and stats.get(key) and stats[key][0] == best[key]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_scenario(sweep: dict, scenario: Any, out: Path) -> Path | None:
    """VQA, AUC and macro-F1 per method, zero-shot and centralized as reference lines."""
    table = scenario_rows(sweep, scenario)
    methods = [m for m in table if m not in (ZERO_SHOT, CENTRAL)]
    if not methods:
        return None
    panels = [(k, label) for k, label in COLUMNS if k in ("final.vqa_accuracy", "final.auc",
                                                          "final.macro_f1")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.8 + 0.32 * len(methods)),
                             sharey=True)
    y = np.arange(len(methods))
    for ax, (key, label) in zip(axes, panels, strict=True):
        means = [table[m][key][0] if table[m].get(key) else np.nan for m in methods]
        stds = [table[m][key][1] if table[m].get(key) else 0.0 for m in methods]
        ax.barh(y, means, xerr=stds, color="tab:blue", alpha=0.8)
        for ref, style in ((ZERO_SHOT, ":"), (CENTRAL, "--")):
            if table.get(ref, {}).get(key):
                ax.axvline(table[ref][key][0], color="k", ls=style, lw=1, label=ref)
        finite = [v for v in means if np.isfinite(v)]
        if finite:
            ax.set_xlim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
        ax.set_title(label, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, methods, fontsize=8)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{_scenario_key(sweep)} = {scenario}", fontsize=10)
    return save_figure(fig, out)


def benchmark_sections(sweep: dict, out: Path) -> list[str]:
    """The report's per-scenario sections (a table and a plot each)."""
    skey = _scenario_key(sweep)
    scenarios = next((v for k, v in sweep["axes"] if k == skey), [None])
    seeds = next((v for k, v in sweep["axes"] if k == "seed"), None)
    lines = ["Numbers are % (VQA: official metric; AUC from answer probabilities; hard-label "
             "AUC as FedMLLM computes it; macro-F1 of the multi-class tasks); GenEval 0-1. "
             "Best method per column in bold (zero-shot and centralized are references)."
             + (f" Mean ± std over seeds {seeds}." if seeds and len(seeds) > 1 else ""), ""]
    for scenario in scenarios:
        lines += [f"## {skey} = {scenario}", ""] + scenario_table(sweep, scenario)
        safe = str(scenario).replace("/", "_")
        png = plot_scenario(sweep, scenario, out / f"scenario_{safe}.png")
        if png:
            lines += [f"![{scenario}]({png.name})", ""]
    return lines

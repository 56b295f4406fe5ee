"""``report.md`` for a run directory: headline numbers, accuracy-vs-round and bytes plots.

Part of the run directory every runtime writes, so it lives with the runtime; sweep and
benchmark reports (:mod:`fedumm.experiments`) build on its helpers."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedumm.outputs import OutputExistsError, OutputFolder, save_png, write_file  # noqa: E402
from fedumm.runtime.run_dir import RunDirectory  # noqa: E402


def save_figure(fig, out: str | Path) -> Path:
    """Tight layout, write a PNG (creating folders; atomic, in the output folder the command
    claimed), close the figure."""
    fig.tight_layout()
    try:
        return save_png(fig, out, dpi=110)
    finally:
        plt.close(fig)


def report_folder(source: Path, out: str | Path | None, source_command: str) -> Path:
    """Claim where a report of ``source`` goes: the source folder itself (a run or sweep folder
    fedumm made, ``source_command``) or ``out``, a new, empty or earlier report folder."""
    if out is None or Path(out).resolve() == source.resolve():
        folder = OutputFolder(source, source_command)
        if not folder.is_marked():
            raise OutputExistsError(f"{source} is not a {source_command} folder fedumm made (no "
                                    f"{folder.marker.name}), so its report is not written into "
                                    "it: give --out NEW_FOLDER")
        folder.claim()
        return source
    OutputFolder(out, "report").claim()
    return Path(out)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def plot_accuracy(metrics: list[dict], out: Path, title: str) -> Path:
    evals = [m for m in metrics if m.get("type") == "eval" and "vqa_accuracy" in m]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = [m["round"] + 1 for m in evals]
    ax.plot(xs, [m["vqa_accuracy"] for m in evals], "o-", label="VQA accuracy (%)")
    gen = [m for m in evals if "geneval_overall" in m]
    if gen:
        ax2 = ax.twinx()
        ax2.plot([m["round"] + 1 for m in gen], [m["geneval_overall"] for m in gen], "s--",
                 color="tab:orange", label="GenEval overall")
        ax2.set_ylabel("GenEval overall (0-1)")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = frozen base)")
    ax.set_ylabel("VQA accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def plot_bytes(metrics: list[dict], full_model_bytes: int, out: Path) -> Path:
    rounds = [m for m in metrics if m.get("type") == "round"]
    cum, total = [], 0
    for m in rounds:
        total += m["upload_bytes"]
        cum.append(total)
    full = [full_model_bytes * len(m["clients"]) for m in rounds]
    full_cum = [sum(full[: i + 1]) for i in range(len(full))]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = [m["round"] + 1 for m in rounds]
    ax.plot(xs, [c / 2**20 for c in cum], "o-", label="LoRA adapters (measured)")
    ax.plot(xs, [c / 2**20 for c in full_cum], "x--", label="full fine-tuning (same dtype)")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative upload (MiB, log)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, out)


def write_run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``report.md`` + plots of a finished run, into ``out`` (default: the run directory)."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    dest = report_folder(run_dir, out, "run")
    metrics = RunDirectory(run_dir).metrics()
    acc_png = plot_accuracy(metrics, dest / "accuracy.png",
                            f"{summary['strategy']}, K={summary['clients']}")
    comm = summary["communication"]
    bytes_png = plot_bytes(metrics, comm["full_model_bytes"], dest / "bytes.png")
    fin, base, t = summary["final"], summary.get("base", {}), summary["time"]
    reduction = (f"{comm['reduction_vs_full']}x" if comm.get("reduction_vs_full")
                 else "n/a (nothing uploaded)")
    updates = summary.get("updates") or {}
    lines = [
        f"# Run report: {summary['name']}",
        "",
        f"Strategy `{summary['strategy']}`, {summary['clients']} clients, {summary['rounds']} "
        f"rounds, seed {summary['seed']}.",
        "",
        "| metric | frozen base | final |",
        "|---|---|---|",
        *[f"| {name} | {base.get(key, 'n/a')} | {fin[key]} |" for key, name in (
            ("vqa_accuracy", "VQA accuracy"), ("geneval_overall", "GenEval overall"),
            ("generation_quality", "generation held-out quality"),
            ("auc", "AUC, binary tasks"), ("auc_hard", "AUC from hard labels (FedMLLM)"),
            ("macro_f1", "macro-F1, multi-class tasks")) if fin.get(key) is not None],
        "",
        "| cost | value |",
        "|---|---|",
        f"| upload per client per round | {fmt_bytes(comm['upload_bytes_per_client_round'])} |",
        f"| full model (same dtype) | {fmt_bytes(comm['full_model_bytes'])} |",
        f"| reduction vs full fine-tuning | {reduction} |",
        f"| total bytes (up + down) | {fmt_bytes(comm['total_bytes'])} |",
        f"| wall time / client training | {t['wall_s']} s / {t['client_train_s']} s |",
        f"| peak RSS | {fmt_bytes(summary['memory']['peak_rss_bytes'])} |",
        "",
    ]
    if updates.get("rejected"):  # the server left updates out: say how many and why
        lines += [f"**{updates['rejected']} of {updates['rejected'] + updates['accepted']} "
                  f"client updates were rejected** (first: {updates['first_rejection']}); "
                  "each has a `rejected` record in `metrics.jsonl`.", ""]
    lost = {k: updates.get(k) for k in ("dropped", "late", "skipped_rounds")}
    if any(lost.values()):  # faults: who sent nothing or too late, rounds not aggregated
        lines += [f"Faults: {lost['dropped'] or 0} client-round(s) dropped out, "
                  f"{lost['late'] or 0} late, {lost['skipped_rounds'] or 0} round(s) skipped "
                  "(each round record's `outcome` in `metrics.jsonl` says why).", ""]
    if privacy := summary.get("privacy"):  # the run's differential-privacy guarantee
        levels = "; ".join(f"{level}-level epsilon {privacy[level]['epsilon']:.3g} at delta "
                           f"{privacy[level]['delta']:.3g}" for level in ("sample", "client")
                           if level in privacy)
        lines += [f"**Differential privacy:** ({privacy['epsilon']:.3g}, "
                  f"{privacy['delta']:.3g})-DP per {privacy['unit']} ({levels}).", ""]
    if fin.get("backdoor_success") is not None:  # a simulated backdoor attack ran
        lines += [f"Backdoor success (attack.kind=backdoor): {fin['backdoor_success']} "
                  f"(frozen base: {base.get('backdoor_success', 'n/a')}).", ""]
    if fin.get("vqa_by_family"):
        lines += ["VQA by question family (final vs base):", "", "| family | base | final |",
                  "|---|---|---|"]
        bf = base.get("vqa_by_family", {})
        lines += [f"| {k} | {bf.get(k, 'n/a')} | {v} |" for k, v in fin["vqa_by_family"].items()]
        lines.append("")
    if fin.get("classification"):
        lines += ["Classification tasks (final):", "",
                  "| task | classes | n | accuracy | macro-F1 | AUC | AUC, hard labels | "
                  "unparseable |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {k} | {len(v['classes'])} | {v['n']} | {v['accuracy']} | {v['macro_f1']} "
                  f"| {v['auc'] if v['auc'] is not None else 'n/a'} | "
                  f"{v['auc_hard'] if v['auc_hard'] is not None else 'n/a'} | {v['unparseable']} |"
                  for k, v in fin["classification"].items()]
        lines.append("")
    if fin.get("geneval_by_task"):
        lines += ["GenEval by task (final vs base):", "", "| task | base | final |",
                  "|---|---|---|"]
        bg = base.get("geneval_by_task", {})
        lines += [f"| {k} | {bg.get(k, 'n/a')} | {v} |" for k, v in fin["geneval_by_task"].items()]
        lines.append("")
    lines += [f"![accuracy]({acc_png.name})", "", f"![bytes]({bytes_png.name})", ""]
    return write_file(dest / "report.md", "\n".join(lines))

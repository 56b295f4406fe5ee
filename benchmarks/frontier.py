"""The accuracy-vs-bytes frontier (docs/communication.md) from three sweeps:

    fedumm sweep configs/frontier.yaml --out runs/frontier                  # codecs x aggregation
    .venv/bin/python benchmarks/frontier.py seeds                            # seeds 1, 2 of the
                                                                             # frontier cells
    fedumm sweep configs/frontier_tradeoff.yaml --out runs/frontier_tradeoff  # rank x epochs
    .venv/bin/python benchmarks/frontier.py report                           # table + plots

``seeds`` finds the Pareto-optimal cells of the first sweep (no other cell has more VQA for
fewer total bytes) plus the float32 / separate reference, and runs them again with seeds 1 and
2 (a sweep of its own, ``runs/frontier_seeds``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

RUNS = Path("runs")
DOCS = Path("docs")
REFERENCE = ("float32", "separate")
# settings beyond the grid that may reach the goal: FFA with 4-bit codes, entropy-coded, and
# at half the rank (run with seeds 0, 1, 2)
EXTRA = ("codec.upload=nf4+zlib lora.aggregation=ffa",
         "codec.upload=nf4 lora.aggregation=ffa lora.r=8 lora.alpha=16",
         "codec.upload=int8 lora.aggregation=ffa lora.r=8 lora.alpha=16")
JANUS_1B_PARAMS = 2_076_636_811  # `fedumm backbone info ... backbone.preset=janus-pro-1b`


def cells(sweep: Path, baselines_only: bool = False) -> list[dict]:
    """The finished cells of a sweep (only its baselines: a sweep without grid axes also runs
    the plain config once, a duplicate here)."""
    if not (sweep / "sweep.json").is_file():
        return []
    data = json.loads((sweep / "sweep.json").read_text())
    return [c for c in data["cells"] if c.get("status") == "done"
            and (c.get("baseline") or not baselines_only)]


def key(c: dict) -> tuple[str, str, str]:
    ranks = c.get("lora.client_ranks")
    rank = f"r={c['lora.r']}" if c.get("lora.r") not in (None, 16) else ""
    return (c.get("codec.upload", "float32"), c.get("lora.aggregation", "separate"),
            "ranks " + "/".join(map(str, ranks)) if ranks else rank)


def label(k: tuple[str, str, str]) -> str:
    return f"{k[0]} | {k[1]}" + (f" | {k[2]}" if k[2] else "")


def _ranks(text: str) -> str:
    """The table's rank column: ``4/8/16`` (per client), ``8`` or the default 16."""
    return text[6:] if text.startswith("ranks ") else text[2:] if text else "16"


def pareto(points: list[tuple[float, float, object]]) -> list[object]:
    """The items no other item beats on both fewer bytes and more accuracy."""
    out = []
    for b, a, item in points:
        if not any((b2 <= b and a2 >= a) and (b2 < b or a2 > a) for b2, a2, _ in points):
            out.append(item)
    return out


def run_seeds() -> None:
    main = cells(RUNS / "frontier")
    front = pareto([(c["communication.total_bytes"], c["final.vqa_accuracy"], key(c))
                    for c in main])
    chosen = list(dict.fromkeys([*front, (*REFERENCE, "")]))
    raw = yaml.safe_load(Path("configs/frontier.yaml").read_text())
    baselines = []
    for codec, agg, ranks in chosen:
        extra = f" lora.client_ranks=[{ranks[6:].replace('/', ',')}]" if ranks else ""
        for seed in (1, 2):
            baselines.append(f"codec.upload={codec} lora.aggregation={agg} seed={seed}{extra}")
    baselines += [f"{extra} seed={seed}" for extra in EXTRA for seed in (0, 1, 2)]
    raw["name"] = "frontier_seeds"
    raw["sweep"] = {"grid": [], "baselines": baselines}
    cfg = RUNS / "frontier_seeds.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    print(f"{len(chosen)} cells x 2 seeds: {[label(k) for k in chosen]}", flush=True)
    exe = Path(sys.executable).with_name("fedumm")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "fedumm.cli"]
    subprocess.run([*cmd, "sweep", str(cfg), "--out", str(RUNS / "frontier_seeds"), "--quiet"],
                   check=True)


def report() -> None:
    main = cells(RUNS / "frontier")
    seeds = cells(RUNS / "frontier_seeds", True) if (RUNS / "frontier_seeds").exists() else []
    by: dict[tuple, list[dict]] = {}
    for c in main + seeds:
        by.setdefault(key(c), []).append(c)
    ref = by[(*REFERENCE, "")][0]
    ref_up = ref["communication.upload_bytes_per_client_round"]
    ref_vqa = float(np.mean([c["final.vqa_accuracy"] for c in by[(*REFERENCE, "")]]))
    rows = []
    for k, cs in by.items():
        vqa = [c["final.vqa_accuracy"] for c in cs]
        up = cs[0]["communication.upload_bytes_per_client_round"]
        rows.append({"key": k, "n": len(cs), "vqa": float(np.mean(vqa)),
                     "vqa_std": float(np.std(vqa)) if len(cs) > 1 else None,
                     "geneval": float(np.mean([c["final.geneval_overall"] for c in cs])),
                     "up": up, "total": cs[0]["communication.total_bytes"],
                     "up_ratio": ref_up / up, "full": cs[0]["communication.full_model_bytes"]})
    rows.sort(key=lambda r: r["total"])
    front = set(pareto([(r["total"], r["vqa"], r["key"]) for r in rows]))
    within = [r for r in rows if r["vqa"] >= ref_vqa - 0.5]
    cheapest = min(within, key=lambda r: r["up"]) if within else None
    goal = [r for r in within if r["up_ratio"] >= 16]

    out_dir = DOCS / "communication"
    out_dir.mkdir(parents=True, exist_ok=True)
    for x, name in (("total", "total bytes (up + down, all rounds)"),
                    ("up", "upload bytes per client-round")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for agg, marker in (("separate", "o"), ("exact", "s"), ("ffa", "^")):
            pts = [r for r in rows if r["key"][1] == agg and not r["key"][2]]
            ax.scatter([r[x] for r in pts], [r["vqa"] for r in pts], marker=marker, label=agg)
        het = [r for r in rows if r["key"][2].startswith("ranks")]
        ax.scatter([r[x] for r in het], [r["vqa"] for r in het], marker="D", label="ranks 4/8/16")
        low = [r for r in rows if r["key"][2].startswith("r=")]
        ax.scatter([r[x] for r in low], [r["vqa"] for r in low], marker="v", label="ffa, r=8")
        fr = sorted((r for r in rows if r["key"] in front), key=lambda r: r[x])
        if x == "total":
            ax.plot([r[x] for r in fr], [r["vqa"] for r in fr], "k--", lw=0.8,
                    label="Pareto frontier")
        for r in rows:
            ax.annotate(r["key"][0], (r[x], r["vqa"]), fontsize=6, alpha=0.7)
        ax.axhline(ref_vqa - 0.5, color="grey", lw=0.6, ls=":", label="fp32 - 0.5 points")
        ax.set_xscale("log")
        ax.set_xlabel(name + " (log)")
        ax.set_ylabel("final VQA accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"frontier_{x}.png", dpi=130)
        plt.close(fig)

    trade = (cells(RUNS / "frontier_tradeoff", True) if (RUNS / "frontier_tradeoff").exists()
             else [])
    if trade:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        for e, marker in ((1, "o"), (2, "s"), (4, "^")):
            pts = sorted((c for c in trade if c.get("local_epochs") == e),
                         key=lambda c: c["lora.r"])
            axes[0].plot([c["communication.total_bytes"] for c in pts],
                         [c["final.vqa_accuracy"] for c in pts], marker=marker, label=f"E={e}")
            axes[1].plot([c["time.client_train_s"] for c in pts],
                         [c["final.vqa_accuracy"] for c in pts], marker=marker, label=f"E={e}")
            for c in pts:
                axes[0].annotate(f"r={c['lora.r']}", (c["communication.total_bytes"],
                                                     c["final.vqa_accuracy"]), fontsize=6)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("total bytes (log)")
        axes[1].set_xlabel("client compute time (s, all clients)")
        for ax in axes:
            ax.set_ylabel("final VQA accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "tradeoff.png", dpi=130)
        plt.close(fig)

    def mib(n: float) -> str:
        return f"{n / 2**20:.3f}"

    lines = [
        "# Communication: the accuracy-vs-bytes frontier",
        "",
        "The quickstart task (reference backbone, ShapesWorld) at K=16 clients, Dirichlet "
        "alpha=0.1 over answers, 4 rounds, LoRA r=16 on all four groups, FedAvg; download in "
        "float32. Every upload codec x every LoRA aggregation (`configs/frontier.yaml`), "
        "heterogeneous ranks 4/8/16, and seeds 1 and 2 of the Pareto-optimal cells "
        "(mean +- std over 3 seeds where n = 3). Measured on the project's 2-core CPU machine, "
        "one thread per run. Reproduce:",
        "",
        "```bash",
        "fedumm sweep configs/frontier.yaml --out runs/frontier",
        ".venv/bin/python benchmarks/frontier.py seeds",
        "fedumm sweep configs/frontier_tradeoff.yaml --out runs/frontier_tradeoff",
        ".venv/bin/python benchmarks/frontier.py report",
        "```",
        "",
        "![frontier](communication/frontier_total.png)",
        "![upload](communication/frontier_up.png)",
        "",
        "| upload codec | aggregation | ranks | n | VQA | GenEval | upload MiB / client-round |"
        " x fewer than fp32 | total MiB | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        std = f" +- {r['vqa_std']:.2f}" if r["vqa_std"] is not None else ""
        lines.append(f"| `{r['key'][0]}` | {r['key'][1]} | {_ranks(r['key'][2])} | "
                     f"{r['n']} | {r['vqa']:.2f}{std} | {r['geneval']:.3f} | {mib(r['up'])} | "
                     f"{r['up_ratio']:.1f} | {mib(r['total'])} | "
                     f"{'yes' if r['key'] in front else ''} |")
    full_ref = ref["communication.full_model_bytes"]
    lines += [
        "",
        f"Full fine-tuning would upload {mib(full_ref)} MiB per client-round for the reference "
        f"model in float32 (its {full_ref // 4:,} parameters), and "
        f"{JANUS_1B_PARAMS * 4 / 2**30:.2f}"
        f" GiB for Janus-Pro-1B (`fedumm backbone info`); the codecs' ratios above apply to "
        "both.",
        "",
        f"**Goal** (>= 16x fewer upload bytes than float32 adapters at <= 0.5 points VQA loss, "
        f"against float32 / separate at {ref_vqa:.2f}): "
        + ("met by " + ", ".join(f"`{label(r['key'])}` ({r['up_ratio']:.1f}x, VQA "
                                 f"{r['vqa']:.2f})" for r in goal) if goal else "not met here")
        + ".",
        "",
        "**Reading.** The seed-to-seed spread (std "
        + ", ".join(f"{r['vqa_std']:.1f}" for r in rows if r["vqa_std"] is not None)
        + " points over 3 seeds: the seeds change the Dirichlet partition) is larger than the "
        "0.5-point criterion, so differences of a point or two between cells are within noise; "
        "cells run with one seed (n = 1) are indicative only. What stands out beyond the noise: "
        "top-k sparsification loses 5-13 points in 4 rounds (error feedback returns what it "
        "dropped only in later rounds, and there are few), while 4-bit codes and FFA-LoRA cost "
        "nothing measurable; exact aggregation removes the aggregation error but its dense "
        "residual makes the download 5x larger than the adapters.",
        "",
        "**Cheapest setting within 0.5 points**: "
        + (f"`{label(cheapest['key'])}`, {mib(cheapest['up'])} MiB per client-round "
           f"({cheapest['up_ratio']:.1f}x fewer than float32), VQA {cheapest['vqa']:.2f}."
           if cheapest else "none."),
        "",
    ]
    if trade:
        best = max(trade, key=lambda c: c["final.vqa_accuracy"])
        base = next((c for c in trade if c["lora.r"] == 16 and c["local_epochs"] == 1), None)
        reading = [] if base is None else [
            f"At this fixed compute the best cell (one seed each) is r={best['lora.r']}, "
            f"E={best['local_epochs']} ({best['rounds']} rounds): VQA "
            f"{best['final.vqa_accuracy']:.2f} with "
            f"{best['communication.total_bytes'] / base['communication.total_bytes']:.2f}x the "
            f"bytes of r=16, E=1 (VQA {base['final.vqa_accuracy']:.2f}). A single round (E=4) "
            "loses points at every rank: one aggregation cannot average out the clients' "
            "heterogeneity. Client compute time is about the same in every cell (same total "
            "epochs), so the trade-off is bytes against accuracy.", ""]
        lines += ["## Computation vs communication", "",
                  "LoRA rank r x local epochs E at a fixed total compute (rounds x E = 4) "
                  "(`configs/frontier_tradeoff.yaml`); E=4 replaces the paper's E=5 so that the "
                  "total stays an integer number of rounds.", "",
                  "![tradeoff](communication/tradeoff.png)", "", *reading,
                  "| r | E | rounds | VQA | GenEval | total MiB | client compute s |",
                  "|---|---|---|---|---|---|---|"]
        for c in sorted(trade, key=lambda c: (c["lora.r"], c["local_epochs"])):
            lines.append(f"| {c['lora.r']} | {c['local_epochs']} | {c['rounds']} | "
                         f"{c['final.vqa_accuracy']:.2f} | {c['final.geneval_overall']:.3f} | "
                         f"{mib(c['communication.total_bytes'])} | {c['time.client_train_s']} |")
    (DOCS / "communication.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {DOCS / 'communication.md'}")


if __name__ == "__main__":
    {"seeds": run_seeds, "report": report}[sys.argv[1]]()

"""The measured price of each defence (docs/trust.md), on configs/trust.yaml (the quickstart
task at K=16, Dirichlet alpha=0.5, FedAvg, 4 rounds, one thread per run).

    .venv/bin/python benchmarks/trust.py robust [--seeds 0,1,2] [--jobs 2]  # rule x attack x
                                                  # {0, 10, 25}% malicious: VQA, GenEval,
                                                  # backdoor success
    .venv/bin/python benchmarks/trust.py dp [--jobs 2]       # accuracy against epsilon:
                                                  # sample-level and client-level (K=16 and
                                                  # K=256, 1/16 of the clients per round),
                                                  # LoRA (separate) and FFA-LoRA
    .venv/bin/python benchmarks/trust.py secagg   # time and bytes per round, plain vs SecAgg+,
                                                  # K=4 and 16, local runtime and FLARE's
                                                  # simulator and POC, and FLARE's HE
                                                  # there [--only flare / poc]; the
                                                  # protocol alone with 0 / 1 / 2 dropouts
    .venv/bin/python benchmarks/trust.py report   # the tables of every finished cell, as
                                                  # markdown (runs/bench/trust.md)

Every cell is one ``fedumm run`` in its own process, in ``runs/trust/<group>/<cell>``; a cell
whose summary.json exists is not run again, so an interrupted benchmark goes on where it
stopped. Several cells at once (``--jobs``) share the machine's cores: compare times only from
``--jobs 1``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIG = "configs/trust.yaml"
TABLES = ("<!-- benchmarks/trust.py report -->", "<!-- end of report -->")
ROOT = Path("runs/trust")
K = 16

# rule name -> overrides; f (the malicious clients a rule assumes) is set per cell
RULES: dict[str, list[str]] = {
    "fedavg": [],
    "fedumm (quality)": ["strategy.name=fedumm"],
    "median": ["strategy.robust=median"],
    "trimmed_mean": ["strategy.robust=trimmed_mean"],
    "norm_bound": ["strategy.robust=norm_bound"],
    "krum": ["strategy.robust=krum"],
    "multikrum": ["strategy.robust=multikrum"],
    "bulyan": ["strategy.robust=bulyan"],
}
ATTACKS = ("sign_flip", "scale", "noise", "lie", "label_flip", "backdoor")
FRACTIONS = (0.0, 0.1, 0.25)
EPSILONS = (math.inf, 8.0, 4.0, 1.0)
LORA = {"LoRA": "lora.aggregation=separate", "FFA": "lora.aggregation=ffa"}  # FFA-LoRA: B only
SAMPLE_CLIP = 1.0  # privacy.sample.max_grad_norm of the sample-level cells
CLIENT_CLIP = 2.0  # privacy.client.clip of the client-level cells: about the median update
# norm of this task's clients in round 0 (69% of them clipped at 2, none at 5)
# client-level at larger populations, Poisson sampled: 1/16 of 256 (as many per round as
# K=16 has) and 1/4 of 1024 (16x more per round: the noise on the mean falls with them)
POPULATIONS = ((256, 1 / 16), (1024, 1 / 4))


def _malicious(rule: str, frac: float) -> int:
    """The f a rule is told: the attackers' count (1 when there are none), within what the
    rule can take at K=16 (Bulyan: n >= 4f + 3, so f <= 3)."""
    f = max(1, round(frac * K))
    return min(f, 3) if "bulyan" in rule else f


def robust_cells(seeds: list[int]) -> list[tuple[str, list[str]]]:
    out = []  # no attack first, then 25%, then 10%: the strongest attacks first
    for seed in seeds:
        for frac in sorted(FRACTIONS, key=lambda f: (f > 0, -f)):
            for rule, ov in RULES.items():
                for attack in ATTACKS if frac else ("none",):
                    name = f"{rule.split()[0]}-{attack}-{int(frac * 100)}-s{seed}"
                    cell = [*ov, f"seed={seed}", f"strategy.robust_malicious="
                            f"{_malicious(rule, frac)}"]
                    if frac:
                        cell += [f"attack.kind={attack}", f"attack.fraction={frac}"]
                    out.append((name, cell))
    return out


def client_noise(epsilon: float, rate: float, rounds: int, delta: float) -> float:
    """The client-level noise multiplier that spends ``epsilon`` over ``rounds`` at ``rate``."""
    from fedumm.fl.accounting import client_level_epsilon

    lo, hi = 0.3, 200.0
    for _ in range(60):  # bisection: epsilon falls as the noise grows
        mid = math.sqrt(lo * hi)
        if client_level_epsilon(mid, rate, rounds, delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def dp_cells() -> list[tuple[str, list[str]]]:
    out = []
    for lora_name, lora in LORA.items():
        for eps in EPSILONS:
            tag = "inf" if math.isinf(eps) else f"{eps:g}"
            sample = [] if math.isinf(eps) else [
                f"privacy.sample.max_grad_norm={SAMPLE_CLIP}",
                f"privacy.sample.target_epsilon={eps}"]
            out.append((f"sample-{lora_name}-eps{tag}", [lora, *sample]))
            for k, rate in ((K, 1.0), *POPULATIONS):
                pop = [f"clients={k}"] + ([] if rate == 1.0 else [
                    "strategy.sampling=poisson", f"strategy.poisson_rate={rate}",
                    "data.train_scenes=1600", "partition.min_per_client=2"])
                client = [] if math.isinf(eps) else [
                    f"privacy.client.clip={CLIENT_CLIP}",
                    f"privacy.client.noise_multiplier="
                    f"{client_noise(eps, rate, 4, 1 / k):.4f}"]
                out.append((f"client-K{k}-{lora_name}-eps{tag}", [lora, *pop, *client]))
    return out


def secagg_cells() -> list[tuple[str, list[str]]]:
    """Plain and SecAgg+ rounds, in the local runtime (clients in one process) and on FLARE,
    its simulator and a POC deployment on loopback (one process per site: the protocol's
    messages travel as FLARE tasks), and FLARE's HE there."""
    out = []
    for runtime in ("local", "flare-sim", "flare-poc"):
        where = {"local": "", "flare-sim": "flare-", "flare-poc": "poc-"}[runtime]
        for k in (4, 16):
            for on in (False, True):
                out.append((f"K{k}-{where}{'secagg' if on else 'plain'}",
                            [f"clients={k}", f"secagg.enabled={str(on).lower()}",
                             f"runtime={runtime}"]))
            if where:  # FLARE's homomorphic encryption (TenSEAL), FLARE runs only
                out.append((f"K{k}-{where}he", [f"clients={k}", "secagg.enabled=true",
                                                "secagg.method=he", f"runtime={runtime}"]))
    return out


def base_cells() -> list[tuple[str, list[str]]]:
    """The frozen base's scores on this task, backdoor triggers included (what every table
    starts from): one round of a backdoored run, scored before it (round -1)."""
    return [("frozen", ["eval.base=true", "rounds=1", "attack.kind=backdoor",
                        "attack.fraction=0.25"])]


def frozen_base() -> dict:
    """The frozen base's VQA, GenEval and backdoor success, or {} before ``base`` ran."""
    s = _summary("base", "frozen")
    return (s or {}).get("base", {})


GROUPS = {"robust": robust_cells, "dp": dp_cells, "secagg": secagg_cells, "base": base_cells}


def protocol_times(length: int, repeats: int = 3) -> list[dict]:
    """SecAgg+ alone on ``length`` uint32 entries (the run's adapter size): seconds of each
    stage and bytes up per client, K = 4 and 16, complete graph, threshold half the round,
    with 0, 1 or 2 clients dropping after the key stages (their masks removed from shares);
    the median of ``repeats``."""
    import numpy as np

    from fedumm.fl.secagg import run_secure_sum
    from fedumm.fl.secure_sum import neighbour_graph

    rows = []
    for k in (4, 16):
        ids = list(range(k))
        rng = np.random.default_rng(0)
        vectors = {i: rng.integers(0, 2**22, length, dtype=np.uint32) for i in ids}
        for drops in (0, 1, 2):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                res = run_secure_sum(0, ids, vectors.__getitem__, length,
                                     neighbour_graph(ids, 0, 0, 0), max(2, k // 2),
                                     dropped_before_input=ids[:drops])
                times.append((time.perf_counter() - t, res))
            wall, res = sorted(times, key=lambda x: x[0])[len(times) // 2]
            up = sum(u for u, _ in res.traffic.values())
            rows.append({"K": k, "dropped": drops, "seconds": round(wall, 4),
                         **{f"{n}_s": round(v, 4) for n, v in res.seconds.items()},
                         "bytes_up_per_client": up // (k - drops)})
            print(rows[-1], flush=True)
    return rows


def run_cell(group: str, name: str, overrides: list[str]) -> dict | None:
    out = ROOT / group / name
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    # an interrupted cell goes on from its last round
    cmd = [sys.executable, "-m", "fedumm.cli", "run", "--quiet"] + (
        ["--resume", str(out)] if out.is_dir() else [CONFIG, *overrides, "--out", str(out)])
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    status = "done" if res.returncode == 0 else f"failed: {res.stderr.strip()[-300:]}"
    print(f"{group}/{name}: {status} ({time.perf_counter() - t:.0f} s)", flush=True)
    if res.returncode:
        return None
    return json.loads((out / "summary.json").read_text())


def run_group(group: str, cells: list[tuple[str, list[str]]], jobs: int) -> None:
    (ROOT / group).mkdir(parents=True, exist_ok=True)
    known = ROOT / group / "cells.json"  # every cell any invocation asked for (the report's)
    before = json.loads(known.read_text()) if known.is_file() else {}
    known.write_text(json.dumps({**before, **dict(cells)}, indent=1))
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda c: run_cell(group, *c), cells))


# ------------------------------------------------------------------ report

def _summary(group: str, name: str) -> dict | None:
    p = ROOT / group / name / "summary.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _fmt(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _robust_rows() -> dict[tuple[str, str, str], list[dict]]:
    """(rule, attack, malicious %) -> the summaries of its finished seeds."""
    known = ROOT / "robust" / "cells.json"
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for name in json.loads(known.read_text()) if known.is_file() else {}:
        s = _summary("robust", name)
        if s is not None:
            rule, attack, frac, _ = name.rsplit("-", 3)
            rows.setdefault((rule, attack, frac), []).append(s)
    return rows


def _stat(ss: list[dict], key: str, scale: float = 1.0, digits: int = 1) -> str:
    """Mean over seeds (and the standard deviation when there are several)."""
    vals = [scale * s["final"][key] for s in ss if s["final"].get(key) is not None]
    if not vals:
        return "n/a"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def robust_table() -> list[str]:
    """One table per share of malicious clients: rules x attacks, VQA accuracy (GenEval) of
    the final model; for the backdoor also its success rate (%)."""
    rows = _robust_rows()
    if not rows:
        return []
    rules = list(dict.fromkeys(r for r, _, _ in rows))
    lines: list[str] = []
    for frac in ("25", "10"):
        attacks = [a for a in ATTACKS if any((r, a, frac) in rows for r in rules)]
        if not attacks:
            continue
        lines += [f"**{frac}% malicious** (VQA accuracy / GenEval; no attack: the rule alone)",
                  "", "| rule | no attack | " + " | ".join(attacks) + " | backdoor success % |",
                  "|---" * (len(attacks) + 3) + "|"]
        for rule in rules:
            cells = [rows.get((rule, "none", "0"))] + [rows.get((rule, a, frac))
                                                       for a in attacks]
            text = [f"{_stat(c, 'vqa_accuracy')} / {_stat(c, 'geneval_overall', digits=3)}"
                    if c else "-" for c in cells]
            bd = rows.get((rule, "backdoor", frac))
            lines.append(f"| {rule} | " + " | ".join(text) + " | "
                         f"{_stat(bd, 'backdoor_success', 100) if bd else '-'} |")
        seeds = {len(v) for k, v in rows.items() if k[2] in (frac, "0")}
        lines += ["", "(seeds per cell: " + " or ".join(map(str, sorted(seeds))) + "; "
                  "mean ± standard deviation where there are several)", ""]
    return lines


def dp_table() -> list[str]:
    names = [n for n, _ in dp_cells()] if (ROOT / "dp").is_dir() else []
    lines = ["| level | population | adapters | target epsilon | epsilon spent | VQA | GenEval |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        s = _summary("dp", name)
        if s is None:
            continue
        parts = name.split("-")
        level, eps = parts[0], parts[-1][3:]
        pop = parts[1] if level == "client" else "K16"
        spent = (s.get("privacy") or {}).get("epsilon")
        lines.append(f"| {level} | {pop} | {parts[-2]} | {eps} | {_fmt(spent, 2)} | "
                     f"{_fmt(s['final'].get('vqa_accuracy'))} | "
                     f"{_fmt(s['final'].get('geneval_overall'), 3)} |")
    return lines if len(lines) > 2 else []


def secagg_table() -> list[str]:
    """Plain against SecAgg+ at K=4 and 16: time per round (all of it, and the server's part:
    training and evaluation excluded) and bytes each client sends per round (under SecAgg+
    the protocol's messages: keys, shares, masked vectors)."""
    lines = ["| K | aggregation | s per round | of which not training | upload bytes per "
             "client-round | VQA |", "|---|---|---|---|---|---|"]
    plain: dict[str, tuple[float, float]] = {}
    for name, _ in secagg_cells():
        s = _summary("secagg", name)
        if s is None:
            continue
        k, how = name.split("-", 1)
        where, _, how_ = how.rpartition("-")  # "flare-secagg": FLARE's simulator
        t, rounds = s["time"], s["rounds"]
        per_round = (t["wall_s"] - t["eval_s"]) / rounds
        up = s["communication"]["upload_bytes_per_client_round"]
        ratio = ""
        if how_ == "plain":
            plain[k + where] = (per_round, up)
        elif k + where in plain:
            base = plain[k + where]
            ratio = f" ({per_round / base[0]:.2f}x time, {up / base[1]:.3f}x bytes)"
        how = {"flare": f"{how_}, FLARE simulator", "poc": f"{how_}, FLARE POC"}.get(where,
                                                                                   how_)
        lines.append(f"| {k[1:]} | {how}{ratio} | {per_round:.2f} | "
                     f"{(t['wall_s'] - t['client_train_s'] - t['eval_s']) / rounds:.3f} | "
                     f"{up:,.0f} | {_fmt(s['final'].get('vqa_accuracy'))} |")
    return lines if len(lines) > 2 else []


def protocol_table() -> list[str]:
    p = ROOT / "secagg" / "protocol.json"
    if not p.is_file():
        return []
    rows = json.loads(p.read_text())
    lines = ["| K | dropped after the key stages | total s | key agreement s | masking s | "
             "unmasking s | bytes up per client |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['dropped']} | {r['seconds']:.3f} | "
                     f"{r['key_agreement_s']:.3f} | {r['masking_s']:.3f} | "
                     f"{r['unmasking_s']:.3f} | {r['bytes_up_per_client']:,} |")
    return lines


def plot_dp(out_dir: Path) -> Path | None:
    """VQA accuracy against the epsilon spent (inf: no DP, drawn at the right edge), one line
    per (level, population, adapters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    for name, _ in dp_cells():
        s = _summary("dp", name)
        if s is None or s["final"].get("vqa_accuracy") is None:
            continue
        parts = name.split("-")
        eps = math.inf if parts[-1] == "epsinf" else float(parts[-1][3:])
        label = f"{parts[0]}-level, {parts[1] if parts[0] == 'client' else 'K16'}, {parts[-2]}"
        lines.setdefault(label, []).append((eps, s["final"]["vqa_accuracy"]))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = {1.0: 0, 4.0: 1, 8.0: 2, math.inf: 3}
    for label, pts in sorted(lines.items()):
        pts = sorted((xs[e], v) for e, v in pts if e in xs)
        ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o",
                linestyle="--" if "FFA" in label else "-", label=label)
    if (base := frozen_base().get("vqa_accuracy")) is not None:
        ax.axhline(base, color="grey", linestyle=":", label=f"frozen base ({base:.1f})")
    ax.set_xticks(list(xs.values()), ["1", "4", "8", "no DP"])
    ax.set_xlabel("epsilon (privacy.delta = 1/n per client, 1/K for client-level)")
    ax.set_ylabel("VQA accuracy (%)")
    ax.set_title("Accuracy against epsilon (ShapesWorld, 4 rounds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "epsilon.png"
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def report() -> Path:
    if (fig := plot_dp(Path("docs/trust"))) is not None:
        print(f"plot: {fig}")
    parts = []
    if base := frozen_base():
        parts += ["The frozen base: VQA {:.1f}, GenEval {:.3f}, backdoor success {:.1f}% (how "
                  "often it answers the target or draws the target colour anyway)".format(
                      base["vqa_accuracy"], base["geneval_overall"],
                      100 * base["backdoor_success"]), ""]
    for title, table in (("Robust rules x attacks (K=16)", robust_table()),
                         ("Accuracy against epsilon", dp_table()),
                         ("Secure aggregation", secagg_table()),
                         ("SecAgg+ alone, with dropouts", protocol_table())):
        if table:
            parts += [f"## {title}", "", *table, ""]
    out = Path("runs/bench/trust.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + "\n")
    doc = Path("docs/trust.md")  # the tables between its markers are this report's
    if doc.is_file() and TABLES[0] in (text := doc.read_text()):
        head, rest = text.split(TABLES[0], 1)
        doc.write_text(head + TABLES[0] + "\n" + "\n".join(parts).replace("## ", "### ")
                       + "\n" + TABLES[1] + rest.split(TABLES[1], 1)[1])
    print(out.read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("group", choices=[*GROUPS, "report"])
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (robust)")
    ap.add_argument("--jobs", type=int, default=1, help="cells at once")
    ap.add_argument("--only", default="", help="comma-separated parts of cell names: run the "
                    "cells whose name holds one, e.g. backdoor-25,scale-25 (robust)")
    args = ap.parse_args()
    if args.group == "report":
        report()
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = GROUPS[args.group](seeds) if args.group == "robust" else GROUPS[args.group]()
    if args.only:
        cells = [c for c in cells if any(part in c[0] for part in args.only.split(","))]
    run_group(args.group, cells, args.jobs)
    if args.group == "secagg":  # the protocol alone, at the runs' adapter size
        s = _summary("secagg", "K4-plain")
        length = s["adapters"]["total_adapters"] if s else 294_016
        (ROOT / "secagg" / "protocol.json").write_text(json.dumps(protocol_times(length)))
    report()


if __name__ == "__main__":
    main()

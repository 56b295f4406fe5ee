"""Peer benchmark: one federated workload on four runners, at K=4 and K=16 clients.

The workload is ``configs/quickstart.yaml`` (reference backbone, ShapesWorld, 4 rounds, LoRA
r=16) with ``clients=K eval.every=0`` (only the final evaluation), run by

* ``local``      fedumm's local runtime, clients one after another, ``train.threads=1``
* ``local-w2``   fedumm's local runtime, 2 clients at once: the run's process and 1 forked
  worker, 1 thread each (``train.threads=2 workers=2``)
* ``flare-sim``  fedumm on NVIDIA FLARE's simulator (one process per site, 1 thread each),
  ``train.threads=1 runtime=flare-sim``
* ``flower``     Flower's simulation (Ray backend) driving fedumm's ClientTrainer
  (``peers_flower.py``): 1 CPU and 1 thread per client, 2 at once, ``train.threads=1``

Each run is a subprocess. A sampler thread in this process, every 0.2 s, sums the RSS
(``/proc/<pid>/stat``) of the run's processes (the process tree of the command, plus any process
whose command line names the run directory) and reads the new lines of the run's
``metrics.jsonl``: the time a ``{"type": "round"}`` record first appears is the end of that
round (0.2 s resolution; every runner logs the record after aggregating the round). Every
``--pss-period`` s (default 1) it also sums PSS (``/proc/<pid>/smaps_rollup``), which splits
pages shared between processes (the forked workers' copy-on-write backbone) among them; reading
it walks the page tables (~20 ms for a 1 GB process), hence the longer period. Reported per run:
command wall time, time from launch to the end of round 1 (start-up included), mean round time
over rounds 2..R, peak summed RSS and PSS, final VQA accuracy, the sampler's own CPU time.

``flower-fedumm-agg`` (not run by default) is the Flower runner with fedumm's per-group
aggregation instead of Flower's FedAvg: it must end with the fedumm runners' accuracy.

    .venv/bin/python benchmarks/peers.py [--clients 4,16] [--runners local,flower,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import OUT, save

CONFIG = "configs/quickstart.yaml"
HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
RUNNERS = ("local", "local-w2", "flare-sim", "flower")
CHECKS = ("flower-fedumm-agg",)  # not in the default list: Flower with fedumm's aggregation
PAGE = os.sysconf("SC_PAGE_SIZE")


def command(runner: str, k: int, out: Path, extra: list[str]) -> list[str]:
    base = [f"clients={k}", "eval.every=0", "eval.base=false", *extra]
    fedumm = [str(VENV_BIN / "fedumm"), "run", CONFIG]
    tail = ["--out", str(out), "--quiet", "--json"]
    if runner == "local":
        return [*fedumm, *base, "train.threads=1", *tail]
    if runner == "local-w2":
        return [*fedumm, *base, "train.threads=2", "workers=2", *tail]
    if runner == "flare-sim":
        return [*fedumm, *base, "train.threads=1", "runtime=flare-sim", *tail]
    if runner in ("flower", "flower-fedumm-agg"):
        agg = ["--aggregate", "fedumm"] if runner == "flower-fedumm-agg" else []
        return [sys.executable, str(HERE / "peers_flower.py"), CONFIG, *base, "train.threads=1",
                "--out", str(out), "--json", *agg]
    raise ValueError(f"unknown runner {runner!r}; valid: {', '.join(RUNNERS + CHECKS)}")


# --------------------------------------------------------------------------- sampling

def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, RSS bytes) of every process (Linux /proc)."""
    procs = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            procs[int(stat.parent.name)] = (int(fields[1]), int(fields[21]) * PAGE)
        except (OSError, ValueError, IndexError):
            continue
    return procs


def _mentions(pid: int, needles: tuple[bytes, ...]) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(n in cmdline for n in needles)


def _pss(pid: int) -> int | None:
    """Proportional set size (bytes) from smaps_rollup; None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class Sampler:
    """Every ``period`` s: summed RSS / PSS of the run's processes and the rounds logged."""

    def __init__(self, root: int, out: Path, t0: float, period: float = 0.2,
                 pss_period: float = 1.0) -> None:
        self.root, self.out, self.t0, self.period = root, out, t0, period
        self.pss_period = pss_period
        self._next_pss = 0.0
        self.cpu_s = 0.0  # CPU time the sampler itself used (it competes with the run)
        self.needles = (str(out).encode(), str(out.resolve()).encode())
        self.me = os.getpid()
        self.peak_rss = self.peak_pss = 0
        self.peak_procs: list[str] = []
        self.pss_unreadable = 0
        self.samples = self.pss_samples = 0
        self.round_end_s: dict[int, float] = {}
        self._offset = 0
        self._partial = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._read_rounds()  # rounds logged between the last sample and the exit

    def _run_pids(self) -> list[int]:
        procs = _processes()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        found, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            if pid in procs and pid not in found:
                found.add(pid)
                todo += children.get(pid, [])
        found |= {p for p in procs if p not in found and p != self.me
                  and _mentions(p, self.needles)}
        self._rss = {p: procs[p][1] for p in found}
        return sorted(found)

    def _sample(self) -> None:
        pids = self._run_pids()
        rss = sum(self._rss.values())
        self.samples += 1
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.peak_procs = sorted(_comm(p) for p in pids)
        now = time.perf_counter()
        # smaps_rollup walks the page tables (~20 ms for a 1 GB process): less often
        if now < self._next_pss:
            return
        self._next_pss = now + self.pss_period
        pss = 0
        for p in pids:
            v = _pss(p)
            if v is None:  # unreadable (or gone): count its RSS, an upper bound
                self.pss_unreadable += 1
                v = self._rss[p]
            pss += v
        self.pss_samples += 1
        self.peak_pss = max(self.peak_pss, pss)

    def _read_rounds(self) -> None:
        path = self.out / "metrics.jsonl"
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        now = time.perf_counter() - self.t0
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("type") == "round" and rec.get("round") not in self.round_end_s:
                self.round_end_s[int(rec["round"])] = round(now, 2)

    def _loop(self) -> None:
        while not self._stop.is_set():
            c = time.thread_time()
            self._sample()
            self._read_rounds()
            self.cpu_s += time.thread_time() - c
            self._stop.wait(self.period)


# --------------------------------------------------------------------------- one run

def measure(runner: str, k: int, extra: list[str], pss_period: float = 1.0) -> dict:
    out = OUT / "peers" / f"{runner}_k{k}"
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(runner, k, out, extra)
    log = out.parent / f"{runner}_k{k}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {runner} K={k}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        sampler = Sampler(proc.pid, out, t0, pss_period=pss_period).start()
        stdout, _ = proc.communicate()
        wall = time.perf_counter() - t0
        sampler.stop()
    if proc.returncode:
        raise SystemExit(f"{runner} K={k} failed (rc={proc.returncode}); see {log}")
    s = json.loads(stdout.decode().strip().splitlines()[-1])
    ends = [sampler.round_end_s[r] for r in sorted(sampler.round_end_s)]
    per_round = [round(b - a, 2) for a, b in zip(ends, ends[1:], strict=False)]
    leftovers = [p for p in _processes() if p != os.getpid() and _mentions(
        p, sampler.needles)]
    row = {
        "runner": runner, "clients": k, "command": cmd,
        "wall_s": round(wall, 1),
        "run_wall_s": s["time"]["wall_s"], "client_train_s": s["time"]["client_train_s"],
        "eval_s": s["time"].get("eval_s"),
        "round_end_s": ends, "round1_s": ends[0] if ends else None,
        "round_s": per_round,
        "mean_round_s": round(sum(per_round) / len(per_round), 2) if per_round else None,
        "peak_rss_mib": round(sampler.peak_rss / 2**20, 1),
        "peak_pss_mib": round(sampler.peak_pss / 2**20, 1),
        "processes_at_peak": len(sampler.peak_procs),
        "process_names_at_peak": sorted(set(sampler.peak_procs)),
        "samples": sampler.samples, "pss_samples": sampler.pss_samples,
        "pss_unreadable": sampler.pss_unreadable, "sampler_cpu_s": round(sampler.cpu_s, 1),
        "vqa_accuracy": s["final"]["vqa_accuracy"],
        "leftover_processes": len(leftovers),
    }
    print(f"    wall {row['wall_s']} s, round 1 at {row['round1_s']} s, mean round "
          f"{row['mean_round_s']} s, peak RSS {row['peak_rss_mib']} MiB / PSS "
          f"{row['peak_pss_mib']} MiB ({row['processes_at_peak']} processes), VQA "
          f"{row['vqa_accuracy']}", flush=True)
    return row


STATS = ("wall_s", "round1_s", "mean_round_s", "peak_rss_mib", "peak_pss_mib")


def summarize(rows: list[dict]) -> list[dict]:
    """Per (K, runner): the median of each measure over the repetitions, with min and max."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["clients"], r["runner"]), []).append(r)
    out = []
    for (k, runner), rs in groups.items():
        row = {"clients": k, "runner": runner, "repetitions": len(rs),
               "processes_at_peak": max(r["processes_at_peak"] for r in rs),
               "vqa_accuracy": sorted({r["vqa_accuracy"] for r in rs})}
        for key in STATS:
            vals = sorted(r[key] for r in rs if r[key] is not None)
            row[key] = {"median": round(statistics.median(vals), 2), "min": vals[0],
                        "max": vals[-1]} if vals else None
        out.append(row)
    return out


def _cell(stat: dict | None, fmt: str = "{:.1f}") -> str:
    if stat is None:
        return "-"
    if stat["min"] == stat["max"]:
        return fmt.format(stat["median"])
    return f"{fmt.format(stat['median'])} ({fmt.format(stat['min'])}-{fmt.format(stat['max'])})"


def table(summary: list[dict]) -> str:
    """Markdown: medians over the repetitions, (min-max) where they differ."""
    head = ("| K | runner | wall s | end of round 1 s | mean round s (2..R) | peak RSS MiB "
            "| peak PSS MiB | processes | VQA |")
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        vqa = " / ".join(f"{v:.2f}" for v in r["vqa_accuracy"])
        lines.append(f"| {r['clients']} | {r['runner']} | {_cell(r['wall_s'])} | "
                     f"{_cell(r['round1_s'])} | {_cell(r['mean_round_s'], '{:.2f}')} | "
                     f"{_cell(r['peak_rss_mib'], '{:.0f}')} | {_cell(r['peak_pss_mib'], '{:.0f}')}"
                     f" | {r['processes_at_peak']} | {vqa} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="4,16")
    ap.add_argument("--runners", default=",".join(RUNNERS))
    ap.add_argument("--repeat", type=int, default=3,
                    help="passes over all (K, runner) cells; the table gives medians")
    ap.add_argument("--name", default="peers", help="JSON name under runs/bench/")
    ap.add_argument("--pss-period", type=float, default=1.0,
                    help="seconds between PSS samples (RSS: every 0.2 s)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="run nothing: pool the runs of earlier JSON files into --name")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides (e.g. rounds=1 "
                    "data.train_scenes=100 for a quick try)")
    args = ap.parse_args()
    rows: list[dict] = []
    payload = {"machine": _machine(), "config": CONFIG, "overrides": args.overrides,
               "rows": rows}
    if args.merge:
        for i, f in enumerate(args.merge):
            for r in json.loads(Path(f).read_text())["rows"]:
                rows.append({**r, "rep": i})
    else:
        for rep in range(args.repeat):
            for k in (int(x) for x in args.clients.split(",")):
                for runner in args.runners.split(","):
                    rows.append({**measure(runner, k, list(args.overrides), args.pss_period),
                                 "rep": rep})
                    payload["summary"] = summarize(rows)
                    save(args.name, payload)  # after every run: a partial table survives
    payload["summary"] = summarize(rows)
    path = save(args.name, payload)
    print(table(payload["summary"]))
    print(f"-> {path}")


def _machine() -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("nvflare", "flwr", "ray"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:  # not installed: left out
            continue
    return {"cpus": os.cpu_count(), "platform": platform.platform(), **versions}


if __name__ == "__main__":
    main()

"""The NVIDIA FLARE simulator vs the local runtime on the quickstart config, back to back.

For each K: wall time of the whole command (start-up and teardown included), the time inside
the rounds, the per-round overhead of FLARE over local ((FLARE in-run wall - local wall) /
rounds), FLARE's fixed start-up + teardown (command wall - controller wall) and the peak of the
summed RSS of every process of the run (FLARE: simulator, server, one process per site),
sampled every 0.2 s. Also checks that both runtimes ended with the same VQA accuracy.

    .venv/bin/python benchmarks/flare_vs_local.py [--clients 4,16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import OUT, save

CONFIG = "configs/quickstart.yaml"


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            children.setdefault(int(fields[1]), []).append(pid)
            rss[pid] = int(fields[21]) * 4096
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def measure(runtime: str, k: int) -> dict:
    out = OUT / f"flare_vs_local_{runtime}_k{k}"
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "fedumm.cli", "run", CONFIG, f"clients={k}",
           f"runtime={runtime}", "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if rc:
        raise SystemExit(f"{runtime} K={k} failed (rc={rc})")
    s = json.loads((out / "summary.json").read_text())
    return {"runtime": runtime, "clients": k, "command_wall_s": round(wall, 1),
            "run_wall_s": s["time"]["wall_s"], "client_train_s": s["time"]["client_train_s"],
            "eval_s": s["time"]["eval_s"], "rounds": s["rounds"],
            "peak_rss_mib": round(peak[0] / 2**20, 1),
            "vqa_accuracy": s["final"]["vqa_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="4,16")
    args = ap.parse_args()
    rows = []
    for k in (int(x) for x in args.clients.split(",")):
        local, flare = measure("local", k), measure("flare-sim", k)
        rows.append({"clients": k, "local": local, "flare": flare,
                     "per_round_overhead_s": round(
                         (flare["run_wall_s"] - local["run_wall_s"]) / local["rounds"], 2),
                     "flare_startup_teardown_s": round(
                         flare["command_wall_s"] - flare["run_wall_s"], 1),
                     "wall_ratio": round(flare["command_wall_s"] / local["command_wall_s"], 2),
                     "rss_ratio": round(flare["peak_rss_mib"] / local["peak_rss_mib"], 2),
                     "same_accuracy": flare["vqa_accuracy"] == local["vqa_accuracy"]})
    print(f"{'K':>3} {'runtime':>10} {'wall s':>8} {'in-run s':>9} {'peak RSS MiB':>13} "
          f"{'VQA':>6}")
    for r in rows:
        for side in ("local", "flare"):
            m = r[side]
            print(f"{r['clients']:>3} {m['runtime']:>10} {m['command_wall_s']:>8} "
                  f"{m['run_wall_s']:>9} {m['peak_rss_mib']:>13} {m['vqa_accuracy']:>6}")
        print(f"    per-round overhead {r['per_round_overhead_s']} s, FLARE start-up + teardown "
              f"{r['flare_startup_teardown_s']} s, wall x{r['wall_ratio']}, RSS "
              f"x{r['rss_ratio']}, same accuracy: {r['same_accuracy']}")
    print(f"-> {save('flare_vs_local', {'rows': rows})}")


if __name__ == "__main__":
    main()

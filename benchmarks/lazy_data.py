"""Lazy data: peak RSS of building the clients of a 100,000-record conversation JSONL (one
image file per record, on disk) against a 1,000-record one, each in a fresh process.

Reading keeps an index (text, answer, labels, image path per record); no image is opened.
Goal: the difference is index-sized, well under 100 MB.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import save
from PIL import Image

WORDS = ["red", "blue", "green", "small", "large", "circle", "square", "triangle", "left",
         "right", "above", "below"]

CHILD = r"""
import json, resource, sys, time
import numpy as np
from fedumm.config import load_config
from fedumm.data.clients import split_clients
from fedumm.data.readers import read_samples
from fedumm.fl.client import make_client_data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
cfg = load_config(None, ["data.format=files", f"data.understanding={sys.argv[1]}",
                         "clients=16", "partition.label=question_type"])
train = read_samples(cfg.data, "train")
split = split_clients(train, cfg.partition, cfg.clients, cfg.seed)
clients = [make_client_data(k, train, p, split.missing, 0.1, 0)
           for k, p in enumerate(split.parts)]
print(json.dumps({"samples": len(train), "seconds": round(time.perf_counter() - t, 2),
                  "rss_before_kb": before,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def write_jsonl(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS, 8))
            f.write(json.dumps({"id": f"r{i}", "image": f"images/{i}.png",
                                "conversations": [
                                    {"from": "human", "value": f"<image>\nIs there a {q}?"},
                                    {"from": "gpt", "value": str(rng.choice(["yes", "no"]))}]})
                    + "\n")


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fedumm_lazy_") as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, format="PNG")
        for i in range(100_000):  # one image file per record (each is checked to exist)
            (root / "images" / f"{i}.png").write_bytes(buf.getvalue())
        rows = {}
        for n in (1_000, 100_000):
            write_jsonl(root / f"u{n}.jsonl", n)
            rows[f"n{n}"] = measure(root / f"u{n}.jsonl")
            rows[f"n{n}"]["file_bytes"] = (root / f"u{n}.jsonl").stat().st_size
            print(n, rows[f"n{n}"], flush=True)
    diff = (rows["n100000"]["peak_rss_kb"] - rows["n1000"]["peak_rss_kb"]) * 1024
    rows["peak_rss_difference_mb"] = round(diff / 2**20, 1)
    rows["bytes_per_extra_record"] = round(diff / 99_000)
    rows["peak_rss_ratio"] = round(rows["n100000"]["peak_rss_kb"] / rows["n1000"]["peak_rss_kb"],
                                   3)
    print(json.dumps(rows, indent=1))
    print(f"saved {save('lazy_data', rows)}")


if __name__ == "__main__":
    main()

"""Wire codecs: encode / decode throughput (MB/s of float32 input) and round-trip error on a
100 MB adapter-like state (LoRA-shaped tensors of normal values), per codec.

Error: relative L2 of the decoded state against the original (top-k: of the kept part too, as
the dropped entries are what error feedback carries to the next round).
"""

from __future__ import annotations

import time

import torch
from common import save

from fedumm.fl import codecs

SPECS = ("float32", "bfloat16", "float16", "int8", "int8b", "nf4", "fp4", "topk:0.1",
         "topk:0.01", "topk:0.05+int8", "topk:0.01+int8", "nf4+zlib", "int8+zlib")


def state(total_mb: int = 100) -> dict[str, torch.Tensor]:
    """LoRA A (16 x 4096) and B (4096 x 16) pairs adding up to ``total_mb`` of float32."""
    g = torch.Generator().manual_seed(0)
    per_pair = 2 * 16 * 4096
    n_pairs = total_mb * 2**20 // 4 // per_pair
    out = {}
    for i in range(n_pairs):
        out[f"layers.{i}.lora_A.weight"] = torch.randn(16, 4096, generator=g) * 0.02
        out[f"layers.{i}.lora_B.weight"] = torch.randn(4096, 16, generator=g) * 0.002
    return out


def main() -> None:
    torch.set_num_threads(2)
    x = state()
    mb = sum(v.numel() for v in x.values()) * 4 / 2**20
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in x.values()))
    rows = {}
    for spec in SPECS:
        t = time.perf_counter()
        payload = codecs.encode(x, spec)
        enc = time.perf_counter() - t
        t = time.perf_counter()
        y = codecs.decode(payload)
        dec = time.perf_counter() - t
        err = torch.sqrt(sum(((x[k].double() - y[k].double()) ** 2).sum() for k in x)) / norm
        rows[spec] = {"encode_mb_s": round(mb / enc, 1), "decode_mb_s": round(mb / dec, 1),
                      "bytes_vs_float32": round(len(payload) / (mb * 2**20), 4),
                      "relative_l2_error": float(f"{float(err):.3g}")}
        print(spec, rows[spec], flush=True)
    print(f"saved {save('codecs', {'state_mb': round(mb, 1), 'codecs': rows})}")


if __name__ == "__main__":
    main()

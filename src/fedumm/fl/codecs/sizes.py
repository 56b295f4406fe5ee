"""What a codec costs: wire bytes per value (computed) and encode/decode speed (measured)."""

from __future__ import annotations

import time

import torch

from fedumm.fl.codecs.container import decode, encode
from fedumm.fl.codecs.spec import CodecSpec, parse_codec
from fedumm.fl.codecs.topk import index_width


def bytes_per_value(spec: CodecSpec | str, numel: int = 1_000_000) -> float:
    """Approximate wire bytes per parameter of one dense tensor of ``numel`` entries.

    Counts values, codes, absmax scales and top-k positions; leaves out the container header
    (a few hundred bytes per payload) and any entropy coding.
    """
    spec = parse_codec(spec)
    if numel <= 0:
        raise ValueError("numel must be positive")
    k = spec.keep(numel)
    nbytes = spec.base_step.nbytes(k)
    if spec.sparse:
        nbytes += k * index_width(numel) // 8
    return nbytes / numel


def throughput(spec: CodecSpec | str, numel: int = 25_000_000, seed: int = 0) -> dict:
    """Encode/decode speed of one random-normal float32 tensor of ``numel`` entries.

    MB/s count float32 input bytes (``4 * numel / 1e6`` per second), on this machine's CPU.
    """
    spec = parse_codec(spec)
    x = {"x": torch.randn(numel, generator=torch.Generator().manual_seed(seed))}
    t0 = time.perf_counter()
    payload = encode(x, spec)
    t1 = time.perf_counter()
    decode(payload)
    t2 = time.perf_counter()
    mb = 4 * numel / 1e6
    return {
        "codec": str(spec),
        "numel": numel,
        "bytes": len(payload),
        "ratio_vs_float32": len(payload) / (4 * numel),
        "encode_s": t1 - t0,
        "decode_s": t2 - t1,
        "encode_mb_s": mb / max(t1 - t0, 1e-12),
        "decode_mb_s": mb / max(t2 - t1, 1e-12),
    }

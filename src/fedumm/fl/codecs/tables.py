"""4-bit table codes with blockwise absmax (default block 64): each value becomes the index of
the nearest level of a 16-entry table in [-1, 1] times its block's absmax. Two codes share a
byte (low nibble first) across the whole ``codes`` stream, so one odd tensor does not pad."""

from __future__ import annotations

from typing import ClassVar

import torch

from fedumm.fl.codecs.base import BlockwiseCodec
from fedumm.registry import CODECS

# NF4 (4-bit NormalFloat): the 16 levels published with QLoRA (Dettmers et al. 2023,
# arXiv:2305.14314, appendix E) and hard-coded in bitsandbytes (`get_4bit_type("nf4")` in
# bitsandbytes/functional.py, same values as the NF4 lookup in csrc/kernels.cu). Sorted ascending,
# exact float32 constants.
NF4_TABLE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

# FP4 E2M1 (1 sign, 2 exponent, 1 mantissa bit, bias 1, no inf/nan) as defined in the OCP
# Microscaling Formats (MX) v1.0 spec: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Divided by the
# largest (6) so the table spans [-1, 1]; +0 and -0 are one level, so 15 of the 16 codes are used.
# (bitsandbytes' own "fp4" table differs: it uses other exponent bias/subnormal choices.)
_E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP4_TABLE = torch.tensor(
    [-m / 6.0 for m in reversed(_E2M1_MAGNITUDES[1:])] + [m / 6.0 for m in _E2M1_MAGNITUDES],
    dtype=torch.float32,
)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.zeros(1, dtype=torch.uint8)])
    return codes[0::2] | (codes[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty(packed.numel() * 2, dtype=torch.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]


class TableCodec(BlockwiseCodec):
    """Nearest-level codes of ``table`` (uint8, packed two per byte) and block absmax scales."""

    table: ClassVar[torch.Tensor]

    def __init__(self, block: int | None = None) -> None:
        super().__init__(block)
        self.midpoints = (self.table[1:] + self.table[:-1]) / 2

    def stream_dtypes(self) -> dict[str, torch.dtype]:
        return {"codes": torch.uint8, "scales": torch.float32}

    def encode(self, v: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        scales, per_value = self.scales(v)
        safe = torch.where(per_value > 0, per_value, torch.ones_like(per_value))  # absmax 0 -> 0.0
        return {"codes": torch.bucketize(v / safe, self.midpoints).to(torch.uint8),
                "scales": scales}

    def decode(self, n: int, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = parts["codes"]
        if codes.numel() and int(codes.max()) >= self.table.numel():
            raise ValueError(f"corrupt payload: {self.name} code outside its table")
        return self.table[codes.long()] * self.per_value(parts["scales"], n)

    def pack(self, streams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "codes" in streams:
            streams["codes"] = pack_nibbles(streams["codes"])
        return streams

    def unpack(self, streams: dict[str, torch.Tensor], total: int) -> dict[str, torch.Tensor]:
        if streams["codes"].numel() != (total + 1) // 2:
            raise ValueError("corrupt payload: stream 'codes' has the wrong length")
        streams["codes"] = unpack_nibbles(streams["codes"], total)
        return streams

    def nbytes(self, n: int) -> int:
        return (n + 1) // 2 + 4 * self.counts(n)["scales"]


class NF4(TableCodec):
    name = "nf4"
    rank = 5
    table = NF4_TABLE


class FP4(TableCodec):
    name = "fp4"
    rank = 6
    table = FP4_TABLE


for _step in (NF4, FP4):
    CODECS.register(_step.name, _step)

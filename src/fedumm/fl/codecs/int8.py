"""Symmetric int8 absmax codes (-127..127): one scale per tensor (``int8``) or per block of N
values (``int8b``, also spelled ``int8:block=N``; default block 64)."""

from __future__ import annotations

import torch

from fedumm.fl.codecs.base import DEFAULT_BLOCK, BaseCodec, BlockwiseCodec
from fedumm.registry import CODECS


def quantize(v: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 codes of v, given each value's absmax (codes -127..127; absmax 0 -> 0)."""
    scale = absmax / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(v / safe).clamp_(-127, 127).to(torch.int8)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.float32) * (absmax / 127.0)


_STREAMS = {"codes": torch.int8, "scales": torch.float32}


class Int8(BaseCodec):
    """Per-tensor absmax: ``codes`` (int8) and one float32 scale per tensor (0 when empty)."""

    name = "int8"
    rank = 3

    @classmethod
    def takes(cls, arg: str | None) -> bool:
        return Int8Block.takes(arg)  # int8:block=N is the blockwise step

    @classmethod
    def parse(cls, arg: str | None) -> tuple[str, int | None]:
        return (cls.name, None) if arg is None else Int8Block.parse(arg)

    def stream_dtypes(self) -> dict[str, torch.dtype]:
        return dict(_STREAMS)

    def counts(self, n: int) -> dict[str, int]:
        return {"codes": n, "scales": 1}

    def encode(self, v: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        absmax = v.abs().amax().reshape(1) if v.numel() else torch.zeros(1)
        return {"codes": quantize(v, absmax.expand(v.numel())), "scales": absmax}

    def decode(self, n: int, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequantize(parts["codes"], parts["scales"])


class Int8Block(BlockwiseCodec):
    """Blockwise absmax: ``codes`` (int8) and one float32 scale per block."""

    name = "int8b"
    rank = 4

    @classmethod
    def spellings(cls) -> tuple[str, ...]:
        return ("int8b", "int8:block=N")

    def spelling(self) -> str:
        return self.name if self.block == DEFAULT_BLOCK else f"int8:block={self.block}"

    def stream_dtypes(self) -> dict[str, torch.dtype]:
        return dict(_STREAMS)

    def encode(self, v: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        scales, per_value = self.scales(v)
        return {"codes": quantize(v, per_value), "scales": scales}

    def decode(self, n: int, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequantize(parts["codes"], self.per_value(parts["scales"], n))


for _step in (Int8, Int8Block):
    CODECS.register(_step.name, _step)

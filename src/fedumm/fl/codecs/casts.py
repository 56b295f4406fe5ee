"""Plain casts: the values themselves in float32, bfloat16 or float16 (one ``values`` stream).
The names are the training / storage dtypes of :mod:`fedumm.models.dtypes`."""

from __future__ import annotations

from typing import ClassVar

import torch

from fedumm.fl.codecs.base import BaseCodec
from fedumm.models.dtypes import DTYPES
from fedumm.registry import CODECS


class Cast(BaseCodec):
    """Dense values cast to ``DTYPES[name]``; decoded back to float32."""

    dense_cast: ClassVar[bool] = True

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def stream_dtypes(self) -> dict[str, torch.dtype]:
        return {"values": self.dtype}

    def counts(self, n: int) -> dict[str, int]:
        return {"values": n}

    def encode(self, v: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        return {"values": v.to(self.dtype)}

    def decode(self, n: int, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["values"].to(torch.float32)


class Float32(Cast):
    name = "float32"
    rank = 0
    lossless = True


class BFloat16(Cast):
    name = "bfloat16"
    rank = 1


class Float16(Cast):
    name = "float16"
    rank = 2

    def encode(self, v: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        out = v.to(self.dtype)
        # float16 tops out at 65504: a larger value would arrive as inf
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"tensor {key!r}: values exceed the float16 range (|x| > 65504)")
        return {"values": out}


for _step in (Float32, BFloat16, Float16):
    CODECS.register(_step.name, _step)

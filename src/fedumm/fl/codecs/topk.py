"""Top-k sparsification: ``topk:FRACTION`` keeps that share of each tensor's largest-magnitude
entries (at least one), ``topk:COUNT`` that many (capped at numel). The kept values go to the
base step; their flat positions travel in ``index8``/``index16``/``index32``/``index64``, the
smallest unsigned width that holds every position of that tensor."""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch

from fedumm.fl.codecs.base import SPARSIFIER
from fedumm.registry import CODECS

# Storage dtype of each index width; 16- and 32-bit positions are stored in the signed dtype of
# that size (safetensors/torch have no portable uint16/uint32) and read back modulo 2**bits.
INDEX_DTYPES = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


class TopK:
    """The ``topk`` step: parsing, validation and spelling of its argument, and the kept count."""

    role: ClassVar[str] = SPARSIFIER
    name: ClassVar[str] = "topk"
    rank: ClassVar[int] = 0
    help: ClassVar[str] = (
        "'topk:FRACTION' (0 < FRACTION <= 1, written with a '.', e.g. topk:0.05) or "
        "'topk:COUNT' (an integer >= 1, e.g. topk:1000)"
    )

    @staticmethod
    def takes(arg: str | None) -> bool:
        return arg is not None and re.fullmatch(r".+", arg) is not None  # one line, not empty

    @staticmethod
    def parse(arg: str) -> tuple[float | None, int | None]:
        """(fraction, count) of a ``topk:ARG`` argument; ValueError saying what is wrong."""
        arg = arg.strip()
        if re.fullmatch(r"[0-9]+", arg):
            count = int(arg)
            if count < 1:
                raise ValueError("topk count must be >= 1")
            return None, count
        try:
            fraction = float(arg)
        except ValueError:
            raise ValueError(f"topk argument {arg!r} is neither a fraction nor a count") from None
        if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(f"topk fraction {arg!r} must satisfy 0 < fraction <= 1")
        return fraction, None

    @staticmethod
    def check(fraction: float | None, count: int | None) -> None:
        if fraction is not None and count is not None:
            raise ValueError("codec: give topk as a fraction or as a count, not both")
        if fraction is not None and not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(f"codec topk fraction {fraction!r}: expected 0 < f <= 1")
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or count < 1
        ):
            raise ValueError(f"codec topk count {count!r}: expected an integer >= 1")

    @staticmethod
    def spelling(fraction: float | None, count: int | None) -> str:
        return f"topk:{fraction!r}" if fraction is not None else f"topk:{count}"

    @staticmethod
    def keep(fraction: float | None, count: int | None, numel: int) -> int:
        """How many entries of a tensor with ``numel`` entries are kept."""
        if numel <= 0:
            return 0
        if count is not None:
            return min(count, numel)
        if fraction is not None:
            # round half up (avoids banker's rounding), at least one entry
            return min(numel, max(1, int(math.floor(fraction * numel + 0.5))))
        return numel


def positions(a: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending flat positions of the k largest values of ``a`` (magnitudes); ties go to the
    lower position."""
    n = a.numel()
    if k >= n:
        return torch.arange(n, dtype=torch.int64)
    threshold = torch.kthvalue(a, n - k + 1).values  # the k-th largest magnitude
    above = a > threshold
    ties = torch.nonzero(a == threshold).flatten()[: k - int(above.sum())]
    mask = above
    mask[ties] = True
    return torch.nonzero(mask).flatten()


def index_width(numel: int) -> int:
    """Bits of the unsigned integer that holds every flat position of a tensor."""
    for bits in (8, 16, 32):
        if numel <= 1 << bits:
            return bits
    return 64


def store_index(idx: torch.Tensor, bits: int) -> torch.Tensor:
    if bits in (16, 32):
        idx = torch.where(idx >= 1 << (bits - 1), idx - (1 << bits), idx)
    return idx.to(INDEX_DTYPES[bits])


def load_index(stored: torch.Tensor, bits: int) -> torch.Tensor:
    idx = stored.to(torch.int64)
    if bits in (16, 32):
        idx = idx & ((1 << bits) - 1)
    return idx


CODECS.register(TopK.name, TopK)

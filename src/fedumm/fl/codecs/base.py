"""What a base step is: the encoding of one flat float32 vector into named streams and back.

A codec spelling has at most one sparsifier, exactly one base and at most one entropy step; each
step class says which of these it is with its ``role``. A base step is registered under its
``name`` in :data:`fedumm.registry.CODECS`; it is built with its block size (None when it takes
none) and owns everything that depends on it: parsing its argument, the streams it writes, their
dtypes and lengths, and the bytes a value costs.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch

from fedumm.registry import CODECS

SPARSIFIER, BASE, ENTROPY = "sparsifier", "base", "entropy"
DEFAULT_BLOCK = 64
MAX_BLOCK = 1 << 24
_BLOCK_ARG = re.compile(r"block=([0-9]+)")


class BaseCodec:
    """One base encoding. Subclasses set ``name`` and implement encode / decode / counts."""

    role: ClassVar[str] = BASE
    name: ClassVar[str]
    # where the step appears in the accepted-spellings help (built-ins first, then by name)
    rank: ClassVar[int] = 100
    # decode(encode(x)) == x for float32 input
    lossless: ClassVar[bool] = False
    # the streams hold the values themselves, dense, in a float dtype (no codes, no scales)
    dense_cast: ClassVar[bool] = False

    def __init__(self, block: int | None = None) -> None:
        self.check_block(block)
        self.block = block

    # ---- spelling

    @classmethod
    def spellings(cls) -> tuple[str, ...]:
        """How the step may be written, for the accepted-spellings help."""
        return (cls.name,)

    @classmethod
    def takes(cls, arg: str | None) -> bool:
        """Whether ``name:arg`` (``arg`` None: the bare name) is a form of this step."""
        return arg is None

    @classmethod
    def parse(cls, arg: str | None) -> tuple[str, int | None]:
        """(registered base name, block) of an accepted form; ValueError on a bad argument."""
        return cls.name, None

    @classmethod
    def check_block(cls, block: object) -> None:
        if block is not None:
            raise ValueError(f"codec base {cls.name!r} takes no block size")

    def spelling(self) -> str:
        """The canonical spelling of this step (inverse of :meth:`parse`)."""
        return self.name

    # ---- streams

    def stream_dtypes(self) -> dict[str, torch.dtype]:
        """The streams this step writes and their dtypes, in reading order."""
        raise NotImplementedError

    def counts(self, n: int) -> dict[str, int]:
        """Entries of each stream that one tensor of ``n`` (kept) values uses."""
        raise NotImplementedError

    def encode(self, v: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        """Streams of one flat float32 vector (``key`` names the tensor in errors)."""
        raise NotImplementedError

    def decode(self, n: int, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat float32 vector of ``n`` values from its slices of each stream."""
        raise NotImplementedError

    def pack(self, streams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Last touch on the concatenated streams of all tensors before they are written."""
        return streams

    def unpack(self, streams: dict[str, torch.Tensor], total: int) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`pack`, given the total count of values of all tensors."""
        return streams

    def nbytes(self, n: int) -> int:
        """Wire bytes of one tensor of ``n`` values (streams only, no header)."""
        dtypes = self.stream_dtypes()
        return sum(c * dtypes[s].itemsize for s, c in self.counts(n).items())


class BlockwiseCodec(BaseCodec):
    """A base step with one float32 absmax scale per block of ``block`` values (``name:block=N``,
    default 64): ``scales`` holds the block maxima, ``codes`` one code per value."""

    @classmethod
    def spellings(cls) -> tuple[str, ...]:
        return (cls.name, f"{cls.name}:block=N")

    @classmethod
    def takes(cls, arg: str | None) -> bool:
        return arg is None or _BLOCK_ARG.fullmatch(arg) is not None

    @classmethod
    def parse(cls, arg: str | None) -> tuple[str, int | None]:
        return cls.name, parse_block(arg)

    @classmethod
    def check_block(cls, block: object) -> None:
        if not isinstance(block, int) or not 1 <= block <= MAX_BLOCK:
            raise ValueError(f"codec {cls.name}: block must be an integer in 1..{MAX_BLOCK}")

    def spelling(self) -> str:
        return self.name if self.block == DEFAULT_BLOCK else f"{self.name}:block={self.block}"

    def counts(self, n: int) -> dict[str, int]:
        return {"codes": n, "scales": -(-n // self.block)}

    def scales(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(absmax of each block, each value's block absmax)."""
        n = v.numel()
        nblocks = -(-n // self.block)
        padded = torch.zeros(nblocks * self.block, dtype=torch.float32)
        padded[:n] = v.abs()
        scales = padded.view(nblocks, self.block).amax(dim=1)
        return scales, self.per_value(scales, n)

    def per_value(self, scales: torch.Tensor, n: int) -> torch.Tensor:
        return scales.repeat_interleave(self.block)[:n] if self.block > 1 else scales[:n]


def parse_block(arg: str | None) -> int:
    """The block size of a ``block=N`` argument (None: the default); ValueError out of range."""
    if arg is None:
        return DEFAULT_BLOCK
    m = _BLOCK_ARG.fullmatch(arg)
    assert m is not None  # takes() admitted it
    block = int(m.group(1))
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block size {block} must be in 1..{MAX_BLOCK}")
    return block


def steps(role: str) -> list[tuple[str, type]]:
    """(name, class) of the registered steps of one role, in help order."""
    found = [(name, CODECS.get(name)) for name in CODECS.names()]
    mine = [(name, cls) for name, cls in found if getattr(cls, "role", None) == role]
    return sorted(mine, key=lambda item: (getattr(item[1], "rank", 100), item[0]))


def lookup(name: str, role: str | None = None) -> type | None:
    """The registered step class of ``name`` (of ``role`` when given), or None."""
    if not isinstance(name, str) or name not in CODECS:
        return None
    cls = CODECS.get(name)
    return cls if role is None or getattr(cls, "role", None) == role else None

"""Entropy steps: lossless compression of the whole container, last in a spelling. A wrapped
payload starts with ``MAGIC`` and one method byte; an unwrapped one is a safetensors container."""

from __future__ import annotations

import zlib
from typing import ClassVar

from fedumm.fl.codecs.base import ENTROPY, steps
from fedumm.registry import CODECS

MAGIC = b"FUMZ"  # as a little-endian safetensors header length this would be ~1.5 GB: never real
ZLIB_LEVEL = 6
ZSTD_LEVEL = 3


class EntropyStep:
    """One compressor; ``method`` is its byte after ``MAGIC`` (unique among entropy steps)."""

    role: ClassVar[str] = ENTROPY
    name: ClassVar[str]
    method: ClassVar[int]
    rank: ClassVar[int] = 100

    @staticmethod
    def takes(arg: str | None) -> bool:
        return arg is None

    @classmethod
    def require(cls) -> None:
        """ImportError naming the optional package and its pip command when this step needs
        one that is not installed. Resolving a spelling asks it, so a config naming the step
        is refused when it loads instead of failing at the first payload."""

    @classmethod
    def compress(cls, data: bytes) -> bytes:
        raise NotImplementedError

    @classmethod
    def decompress(cls, body: bytes) -> bytes:
        """The inflated body; ValueError when it does not inflate."""
        raise NotImplementedError


class Zlib(EntropyStep):
    name = "zlib"
    method = 1
    rank = 0

    @classmethod
    def compress(cls, data: bytes) -> bytes:
        return zlib.compress(data, ZLIB_LEVEL)

    @classmethod
    def decompress(cls, body: bytes) -> bytes:
        try:
            return zlib.decompress(body)
        except zlib.error as exc:
            raise ValueError(f"corrupt or truncated payload: zlib body does not inflate ({exc})"
                             ) from None


def _zstd():
    try:
        import zstandard
    except ImportError as exc:
        raise ImportError(
            "codec step 'zstd' needs the optional 'zstandard' package (pip install zstandard); "
            "use 'zlib' (standard library) instead"
        ) from exc
    return zstandard


class Zstd(EntropyStep):
    name = "zstd"
    method = 2
    rank = 1

    @classmethod
    def require(cls) -> None:
        _zstd()

    @classmethod
    def compress(cls, data: bytes) -> bytes:
        return _zstd().ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)

    @classmethod
    def decompress(cls, body: bytes) -> bytes:
        zstandard = _zstd()
        try:
            return zstandard.ZstdDecompressor().decompress(body)
        except zstandard.ZstdError as exc:
            raise ValueError(f"corrupt or truncated payload: zstd body does not inflate ({exc})"
                             ) from None


def wrap(container: bytes, name: str) -> bytes:
    step = CODECS.get(name)
    return MAGIC + bytes([step.method]) + step.compress(container)


def unwrap(payload: bytes) -> tuple[bytes, str | None]:
    """(container, name of the entropy step that wrapped it, None when none did)."""
    if payload[: len(MAGIC)] != MAGIC:
        return payload, None
    if len(payload) <= len(MAGIC):
        raise ValueError("corrupt or truncated payload: entropy prefix without a body")
    byte = payload[len(MAGIC)]
    for name, step in steps(ENTROPY):
        if step.method == byte:
            return step.decompress(payload[len(MAGIC) + 1:]), name
    raise ValueError(f"corrupt payload: unknown entropy method byte {byte}")


for _step in (Zlib, Zstd):
    CODECS.register(_step.name, _step)

"""The wire codec: self-describing, CPU-only encoding of adapter payloads
(``dict[str, Tensor]`` -> ``bytes``). The bytes counted in a run are ``len()`` of these payloads.

A codec is spelled as steps joined by ``+`` (see :func:`parse_codec`)::

    [topk:FRACTION | topk:COUNT +] BASE [+ zlib | + zstd]

    BASE := float32 | bfloat16 | float16           plain casts
          | int8                                   per-tensor absmax, symmetric, codes -127..127
          | int8b | int8:block=N                   blockwise absmax (default block 64)
          | nf4[:block=N] | fp4[:block=N]          4-bit table codes, blockwise absmax (block 64)

``topk:0.05`` keeps the 5 % largest-magnitude entries of each tensor (at least one), ``topk:1000``
keeps that many (capped at numel); the kept values are then encoded by BASE (float32 when BASE is
left out) and their flat positions travel as the smallest unsigned integer that holds every
position of that tensor (8, 16 or 32 bits). ``zlib`` (level 6) / ``zstd`` (level 3, needs the
``zstandard`` package) compress the whole container losslessly.

Wire format: a safetensors container (portable, little-endian) holding a few concatenated streams
(``values``, ``codes``, ``scales``, ``index8``/``index16``/``index32``/``index64``) and one metadata
entry, ``fedumm.compress``, whose JSON records the format version, the canonical codec spelling,
every tensor's name, shape and dtype, the kept counts of a sparse codec, and a CRC-32 of the
streams. Entropy coding wraps that container behind a 5-byte prefix (``b"FUMZ"`` + method byte).
Tensors are written in sorted-name order and the metadata is a single key, so equal inputs give
identical bytes (safetensors orders several metadata keys differently from one process to the next).
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
import zlib
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = [
    "CodecSpec",
    "ErrorFeedback",
    "FP4_TABLE",
    "NF4_TABLE",
    "bytes_per_value",
    "decode",
    "encode",
    "parse_codec",
    "payload_info",
    "roundtrip",
    "throughput",
]

FORMAT_VERSION = 1
META_KEY = "fedumm.compress"
MAGIC = b"FUMZ"  # as a little-endian safetensors header length this would be ~1.5 GB: never real
_ENTROPY_IDS = {"zlib": 1, "zstd": 2}
ZLIB_LEVEL = 6
ZSTD_LEVEL = 3

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

_TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}
_MIDPOINTS = {name: (t[1:] + t[:-1]) / 2 for name, t in _TABLES.items()}
# the plain-cast codecs, named as the training / storage dtypes (backbone.dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BLOCK_BASES = ("int8b", "nf4", "fp4")
DEFAULT_BLOCK = 64
MAX_BLOCK = 1 << 24
_INPUT_DTYPES = {
    "float32": torch.float32, "float64": torch.float64,
    "bfloat16": torch.bfloat16, "float16": torch.float16,
}

ACCEPTED_FORMS = (
    "accepted spellings are steps joined by '+': an optional 'topk:FRACTION' (0 < FRACTION <= 1, "
    "written with a '.', e.g. topk:0.05) or 'topk:COUNT' (an integer >= 1, e.g. topk:1000) first; "
    "then a base: float32 | bfloat16 | float16 | int8 | int8b | int8:block=N | nf4 | nf4:block=N | "
    "fp4 | fp4:block=N (the base may be left out after topk or before an entropy step: float32); "
    "then optionally 'zlib' or 'zstd' last. Examples: float32, int8b, nf4+zlib, topk:0.01+int8, "
    "topk:0.1+bfloat16+zlib, int8:block=128"
)


# --------------------------------------------------------------------------------------------
# Spelling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecSpec:
    """One parsed codec: optional top-k sparsification, a base encoding, optional entropy coding.

    ``base`` is one of float32, bfloat16, float16, int8, int8b (blockwise int8), nf4, fp4;
    ``block`` is the block size of int8b/nf4/fp4 (None otherwise); at most one of
    ``topk_fraction`` / ``topk_count`` is set; ``entropy`` is None, "zlib" or "zstd".
    """

    base: str = "float32"
    block: int | None = None
    topk_fraction: float | None = None
    topk_count: int | None = None
    entropy: str | None = None

    def __post_init__(self) -> None:
        bases = (*DTYPES, "int8", *_BLOCK_BASES)
        if self.base not in bases:
            raise ValueError(f"codec base {self.base!r}: expected one of {bases}")
        if self.base in _BLOCK_BASES:
            if not isinstance(self.block, int) or not 1 <= self.block <= MAX_BLOCK:
                raise ValueError(f"codec {self.base}: block must be an integer in 1..{MAX_BLOCK}")
        elif self.block is not None:
            raise ValueError(f"codec base {self.base!r} takes no block size")
        if self.topk_fraction is not None and self.topk_count is not None:
            raise ValueError("codec: give topk as a fraction or as a count, not both")
        if self.topk_fraction is not None and not (
            math.isfinite(self.topk_fraction) and 0.0 < self.topk_fraction <= 1.0
        ):
            raise ValueError(f"codec topk fraction {self.topk_fraction!r}: expected 0 < f <= 1")
        if self.topk_count is not None and (
            isinstance(self.topk_count, bool) or not isinstance(self.topk_count, int)
            or self.topk_count < 1
        ):
            raise ValueError(f"codec topk count {self.topk_count!r}: expected an integer >= 1")
        if self.entropy not in (None, *_ENTROPY_IDS):
            raise ValueError(f"codec entropy step {self.entropy!r}: expected zlib or zstd")

    @property
    def sparse(self) -> bool:
        return self.topk_fraction is not None or self.topk_count is not None

    @property
    def lossless(self) -> bool:
        """True when decode(encode(x)) == x for float32 input."""
        return self.base == "float32" and not self.sparse

    def keep(self, numel: int) -> int:
        """How many entries of a tensor with ``numel`` entries the codec transmits."""
        if numel <= 0:
            return 0
        if self.topk_count is not None:
            return min(self.topk_count, numel)
        if self.topk_fraction is not None:
            # round half up (avoids banker's rounding), at least one entry
            return min(numel, max(1, int(math.floor(self.topk_fraction * numel + 0.5))))
        return numel

    def __str__(self) -> str:
        steps = []
        if self.topk_fraction is not None:
            steps.append(f"topk:{self.topk_fraction!r}")
        elif self.topk_count is not None:
            steps.append(f"topk:{self.topk_count}")
        if self.base == "int8b":
            steps.append("int8b" if self.block == DEFAULT_BLOCK else f"int8:block={self.block}")
        elif self.base in _TABLES and self.block != DEFAULT_BLOCK:
            steps.append(f"{self.base}:block={self.block}")
        else:
            steps.append(self.base)
        if self.entropy is not None:
            steps.append(self.entropy)
        return "+".join(steps)


_BLOCK_RE = re.compile(r"^(int8|int8b|nf4|fp4):block=([0-9]+)$")
_TOPK_RE = re.compile(r"^topk:(.+)$")


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"codec {text!r}: {why}; {ACCEPTED_FORMS}")


def _parse_topk(text: str, arg: str) -> tuple[float | None, int | None]:
    if re.fullmatch(r"[0-9]+", arg):
        count = int(arg)
        if count < 1:
            raise _bad(text, "topk count must be >= 1")
        return None, count
    try:
        fraction = float(arg)
    except ValueError:
        raise _bad(text, f"topk argument {arg!r} is neither a fraction nor a count") from None
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise _bad(text, f"topk fraction {arg!r} must satisfy 0 < fraction <= 1")
    return fraction, None


def _parse_base(text: str, step: str) -> tuple[str, int | None] | None:
    if step in DTYPES or step == "int8":
        return step, None
    if step in _BLOCK_BASES:
        return step, DEFAULT_BLOCK
    m = _BLOCK_RE.match(step)
    if m:
        block = int(m.group(2))
        if not 1 <= block <= MAX_BLOCK:
            raise _bad(text, f"block size {block} must be in 1..{MAX_BLOCK}")
        name = "int8b" if m.group(1) in ("int8", "int8b") else m.group(1)
        return name, block
    return None


def parse_codec(text: str | CodecSpec) -> CodecSpec:
    """Parse a codec spelling such as ``topk:0.01+int8+zlib`` (case and spaces ignored)."""
    if isinstance(text, CodecSpec):
        return text
    if not isinstance(text, str):
        raise TypeError(f"codec must be a str or CodecSpec, not {type(text).__name__}")
    steps = [s.strip().lower() for s in text.split("+")]
    if not text.strip() or any(not s for s in steps):
        raise _bad(text, "empty step")
    fraction = count = None
    base: tuple[str, int | None] | None = None
    entropy = None
    stage = 0  # 0: nothing yet, 1: after topk, 2: after base, 3: after entropy
    for step in steps:
        m = _TOPK_RE.match(step)
        if m:
            if stage != 0:
                raise _bad(text, "topk must be the first step, and appear once")
            fraction, count = _parse_topk(text, m.group(1).strip())
            stage = 1
            continue
        if step in _ENTROPY_IDS:
            if stage == 3:
                raise _bad(text, "at most one entropy step (zlib or zstd)")
            entropy, stage = step, 3
            continue
        parsed = _parse_base(text, step)
        if parsed is None:
            raise _bad(text, f"unknown step {step!r}")
        if stage >= 2:
            raise _bad(text, "one base step, before any entropy step")
        base, stage = parsed, 2
    name, block = base if base is not None else ("float32", None)
    return CodecSpec(base=name, block=block, topk_fraction=fraction, topk_count=count,
                     entropy=entropy)


# --------------------------------------------------------------------------------------------
# Base encodings of one flat float32 vector
# --------------------------------------------------------------------------------------------


def _block_absmax(v: torch.Tensor, block: int) -> torch.Tensor:
    n = v.numel()
    nblocks = -(-n // block)
    padded = torch.zeros(nblocks * block, dtype=torch.float32)
    padded[:n] = v.abs()
    return padded.view(nblocks, block).amax(dim=1)


def _per_value(scales: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return scales.repeat_interleave(block)[:n] if block > 1 else scales[:n]


def _quantize_int8(v: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 codes of v, given each value's absmax (codes -127..127; absmax 0 -> 0)."""
    scale = absmax / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(v / safe).clamp_(-127, 127).to(torch.int8)


def _quantize_table(v: torch.Tensor, absmax: torch.Tensor, name: str) -> torch.Tensor:
    """Index of the nearest table level to v / absmax (absmax 0 -> the level 0.0)."""
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.bucketize(v / safe, _MIDPOINTS[name]).to(torch.uint8)


def _encode_values(v: torch.Tensor, spec: CodecSpec, key: str) -> dict[str, torch.Tensor]:
    """Streams for one flat float32 vector: ``values``, or ``codes`` (+ ``scales``)."""
    if spec.base in DTYPES:
        out = v.to(DTYPES[spec.base])
        if spec.base == "float16" and not bool(torch.isfinite(out).all()):
            raise ValueError(f"tensor {key!r}: values exceed the float16 range (|x| > 65504)")
        return {"values": out}
    if spec.base == "int8":
        absmax = v.abs().amax().reshape(1) if v.numel() else torch.zeros(1)
        return {"codes": _quantize_int8(v, absmax.expand(v.numel())), "scales": absmax}
    assert spec.block is not None
    scales = _block_absmax(v, spec.block)
    per_value = _per_value(scales, spec.block, v.numel())
    if spec.base == "int8b":
        return {"codes": _quantize_int8(v, per_value), "scales": scales}
    return {"codes": _quantize_table(v, per_value, spec.base), "scales": scales}


def _decode_values(spec: CodecSpec, n: int, codes: torch.Tensor | None,
                   scales: torch.Tensor | None, values: torch.Tensor | None) -> torch.Tensor:
    if spec.base in DTYPES:
        assert values is not None
        return values.to(torch.float32)
    assert codes is not None and scales is not None
    if spec.base == "int8":
        return codes.to(torch.float32) * (scales / 127.0)
    assert spec.block is not None
    per_value = _per_value(scales, spec.block, n)
    if spec.base == "int8b":
        return codes.to(torch.float32) * (per_value / 127.0)
    table = _TABLES[spec.base]
    if codes.numel() and int(codes.max()) >= table.numel():
        raise ValueError(f"corrupt payload: {spec.base} code outside its table")
    return table[codes.long()] * per_value


def _n_scales(spec: CodecSpec, n: int) -> int:
    if spec.base == "int8":
        return 1
    if spec.base in _BLOCK_BASES:
        assert spec.block is not None
        return -(-n // spec.block)
    return 0


def _index_width(numel: int) -> int:
    """Bits of the unsigned integer that holds every flat position of a tensor."""
    for bits in (8, 16, 32):
        if numel <= 1 << bits:
            return bits
    return 64


# Storage dtype of each index width; 16- and 32-bit positions are stored in the signed dtype of
# that size (safetensors/torch have no portable uint16/uint32) and read back modulo 2**bits.
_INDEX_DTYPES = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def _store_index(idx: torch.Tensor, bits: int) -> torch.Tensor:
    if bits in (16, 32):
        idx = torch.where(idx >= 1 << (bits - 1), idx - (1 << bits), idx)
    return idx.to(_INDEX_DTYPES[bits])


def _load_index(stored: torch.Tensor, bits: int) -> torch.Tensor:
    idx = stored.to(torch.int64)
    if bits in (16, 32):
        idx = idx & ((1 << bits) - 1)
    return idx


def _topk_positions(a: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending flat positions of the k largest |values|; ties go to the lower position."""
    n = a.numel()
    if k >= n:
        return torch.arange(n, dtype=torch.int64)
    threshold = torch.kthvalue(a, n - k + 1).values  # the k-th largest magnitude
    above = a > threshold
    ties = torch.nonzero(a == threshold).flatten()[: k - int(above.sum())]
    mask = above
    mask[ties] = True
    return torch.nonzero(mask).flatten()


# --------------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------------


def _stream_crc(streams: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(streams):
        t = streams[name].contiguous()
        if t.numel():
            crc = zlib.crc32(t.view(torch.uint8).numpy(), crc)
    return crc


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.zeros(1, dtype=torch.uint8)])
    return codes[0::2] | (codes[1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty(packed.numel() * 2, dtype=torch.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]


def _zstd():
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "codec step 'zstd' needs the optional 'zstandard' package (pip install zstandard); "
            "use 'zlib' (standard library) instead"
        ) from exc
    return zstandard


def _wrap(container: bytes, entropy: str) -> bytes:
    if entropy == "zlib":
        body = zlib.compress(container, ZLIB_LEVEL)
    else:
        body = _zstd().ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(
            container)
    return MAGIC + bytes([_ENTROPY_IDS[entropy]]) + body


def _unwrap(payload: bytes) -> tuple[bytes, str | None]:
    if payload[: len(MAGIC)] != MAGIC:
        return payload, None
    if len(payload) <= len(MAGIC):
        raise ValueError("corrupt or truncated payload: entropy prefix without a body")
    method = {v: k for k, v in _ENTROPY_IDS.items()}.get(payload[len(MAGIC)])
    body = payload[len(MAGIC) + 1:]
    if method == "zlib":
        try:
            return zlib.decompress(body), method
        except zlib.error as exc:
            raise ValueError(f"corrupt or truncated payload: zlib body does not inflate ({exc})"
                             ) from None
    if method == "zstd":
        zstandard = _zstd()
        try:
            return zstandard.ZstdDecompressor().decompress(body), method
        except zstandard.ZstdError as exc:
            raise ValueError(f"corrupt or truncated payload: zstd body does not inflate ({exc})"
                             ) from None
    raise ValueError(f"corrupt payload: unknown entropy method byte {payload[len(MAGIC)]}")


def _check_tensors(tensors: dict[str, torch.Tensor]
                   ) -> list[tuple[str, torch.Tensor, str, list[int]]]:
    """(name, flat float32 CPU copy, dtype name, shape) per tensor, in sorted-name order."""
    if not isinstance(tensors, dict):
        raise TypeError(f"encode takes a dict[str, Tensor], not {type(tensors).__name__}")
    rows = []
    for key in sorted(tensors):
        t = tensors[key]
        if not isinstance(key, str):
            raise TypeError(f"tensor names must be str, got {key!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {key!r}: expected a torch.Tensor, got {type(t).__name__}")
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _INPUT_DTYPES:
            raise ValueError(f"tensor {key!r}: dtype {dtype} is not a float dtype "
                             f"({', '.join(_INPUT_DTYPES)})")
        flat = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"tensor {key!r}: has non-finite values (nan/inf); refusing to encode")
        rows.append((key, flat, dtype, list(t.shape)))
    return rows


def encode(tensors: dict[str, torch.Tensor], spec: CodecSpec | str = "float32") -> bytes:
    """Encode float tensors under a codec into one self-describing payload."""
    spec = parse_codec(spec)
    rows = _check_tensors(tensors)
    parts: dict[str, list[torch.Tensor]] = {}
    index_parts: dict[int, list[torch.Tensor]] = {}
    entries, nnz = [], []
    for key, flat, dtype, shape in rows:
        entries.append([key, shape, dtype])
        v = flat
        if spec.sparse:
            k = spec.keep(flat.numel())
            pos = _topk_positions(flat.abs(), k)
            bits = _index_width(flat.numel())
            index_parts.setdefault(bits, []).append(_store_index(pos, bits))
            nnz.append(k)
            v = flat[pos]
        for name, t in _encode_values(v, spec, key).items():
            parts.setdefault(name, []).append(t)
    streams = {name: torch.cat(ts) for name, ts in parts.items()}
    streams.update({f"index{bits}": torch.cat(ts) for bits, ts in index_parts.items()})
    if spec.base in _TABLES and "codes" in streams:
        streams["codes"] = _pack_nibbles(streams["codes"])
    streams = {name: t for name, t in streams.items() if t.numel()}
    header: dict = {"format": FORMAT_VERSION, "codec": str(spec), "tensors": entries}
    if spec.sparse:
        header["nnz"] = nnz
    header["crc32"] = _stream_crc(streams)
    meta = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    container = st_save(streams, metadata={META_KEY: meta})
    return container if spec.entropy is None else _wrap(container, spec.entropy)


def _read_header(container: bytes) -> dict:
    if len(container) < 8:
        raise ValueError("corrupt or truncated payload: shorter than a safetensors header")
    (n,) = struct.unpack("<Q", container[:8])
    if n > len(container) - 8:
        raise ValueError("corrupt or truncated payload: header runs past the end of the bytes")
    try:
        st_header = json.loads(container[8:8 + n])
        header = json.loads(st_header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"corrupt payload or not a fedumm.compress payload: {exc!r}") from None
    if not isinstance(header, dict):
        raise ValueError("corrupt payload: the fedumm.compress record is not a JSON object")
    if header.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported fedumm.compress payload format {header.get('format')!r}"
                         f" (this reader knows {FORMAT_VERSION})")
    return header


def _unpack(payload: bytes) -> tuple[dict, CodecSpec, dict[str, torch.Tensor]]:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode takes bytes, not {type(payload).__name__}")
    container, method = _unwrap(bytes(payload))
    header = _read_header(container)
    try:
        spec = parse_codec(header["codec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"corrupt payload: bad codec record ({exc})") from None
    if spec.entropy != method:
        raise ValueError(f"corrupt payload: codec {spec} but entropy wrapper {method}")
    try:
        streams = st_load(container)
    except Exception as exc:  # safetensors raises its own error types on malformed bytes
        raise ValueError(f"corrupt or truncated payload: safetensors could not read it ({exc})"
                         ) from None
    if header.get("crc32") != _stream_crc(streams):
        raise ValueError("corrupt payload: checksum of the tensor data does not match")
    return header, spec, streams


def payload_info(payload: bytes) -> dict:
    """The recorded header of a payload: codec spelling, tensors (name, shape, dtype), ..."""
    container, _ = _unwrap(bytes(payload))
    return _read_header(container)


class _Cursor:
    """Reads consecutive slices of one stream, checking it is neither short nor long."""

    def __init__(self, streams: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> None:
        t = streams.get(name, torch.zeros(0, dtype=dtype))
        if t.dtype != dtype or t.dim() != 1:
            raise ValueError(f"corrupt payload: stream {name!r} has dtype {t.dtype}, "
                             f"{t.dim()} dims")
        self.name, self.data, self.at = name, t, 0

    def take(self, n: int) -> torch.Tensor:
        if self.at + n > self.data.numel():
            raise ValueError(f"corrupt payload: stream {self.name!r} is too short")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def done(self) -> None:
        if self.at != self.data.numel():
            raise ValueError(f"corrupt payload: stream {self.name!r} has trailing data")


def decode(payload: bytes, restore_dtype: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a payload as float32 in their original shapes (original dtypes if asked)."""
    header, spec, streams = _unpack(payload)
    try:
        entries = [(str(k), [int(d) for d in shape], str(dt)) for k, shape, dt in header["tensors"]]
        nnz = [int(c) for c in header["nnz"]] if spec.sparse else None
        if nnz is not None and len(nnz) != len(entries):
            raise ValueError("nnz and tensors differ in length")
        if any(d < 0 for _, shape, _ in entries for d in shape):
            raise ValueError("negative dimension")
        if any(dt not in _INPUT_DTYPES for _, _, dt in entries):
            raise ValueError("unknown dtype")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"corrupt payload: bad tensor records ({exc})") from None
    sizes = [math.prod(shape) for _, shape, _ in entries]
    counts = nnz if nnz is not None else sizes
    if nnz is not None and any(not 0 <= c <= n for c, n in zip(nnz, sizes, strict=True)):
        raise ValueError("corrupt payload: a kept count exceeds its tensor size")

    values = codes = scales = None
    if spec.base in DTYPES:
        values = _Cursor(streams, "values", DTYPES[spec.base])
    else:
        code_dtype = torch.int8 if spec.base in ("int8", "int8b") else torch.uint8
        codes = _Cursor(streams, "codes", code_dtype)
        scales = _Cursor(streams, "scales", torch.float32)
        if spec.base in _TABLES:
            total = sum(counts)
            if codes.data.numel() != (total + 1) // 2:
                raise ValueError("corrupt payload: stream 'codes' has the wrong length")
            codes.data = _unpack_nibbles(codes.data, total)
    index = {bits: _Cursor(streams, f"index{bits}", dt) for bits, dt in _INDEX_DTYPES.items()}

    out = {}
    for (key, shape, dtype), n, c in zip(entries, sizes, counts, strict=True):
        v = _decode_values(
            spec, c,
            codes.take(c) if codes is not None else None,
            scales.take(_n_scales(spec, c)) if scales is not None else None,
            values.take(c) if values is not None else None,
        )
        if spec.sparse:
            bits = _index_width(n)
            pos = _load_index(index[bits].take(c), bits)
            if c and (int(pos.max()) >= n or int(pos.min()) < 0):
                raise ValueError(f"corrupt payload: tensor {key!r} has positions out of range")
            dense = torch.zeros(n, dtype=torch.float32)
            dense[pos] = v
            v = dense
        t = v.reshape(shape)
        out[key] = t.to(_INPUT_DTYPES[dtype]) if restore_dtype else t
    for cursor in (values, codes, scales, *index.values()):
        if cursor is not None:
            cursor.done()
    return out


def roundtrip(tensors: dict[str, torch.Tensor], spec: CodecSpec | str = "float32"
               ) -> tuple[dict[str, torch.Tensor], int]:
    """What the receiver gets, and the number of bytes it cost."""
    payload = encode(tensors, spec)
    return decode(payload), len(payload)


def bytes_per_value(spec: CodecSpec | str, numel: int = 1_000_000) -> float:
    """Approximate wire bytes per parameter of one dense tensor of ``numel`` entries.

    Counts values, codes, absmax scales and top-k positions; leaves out the container header
    (a few hundred bytes per payload) and any entropy coding.
    """
    spec = parse_codec(spec)
    if numel <= 0:
        raise ValueError("numel must be positive")
    k = spec.keep(numel)
    if spec.base in DTYPES:
        nbytes = k * DTYPES[spec.base].itemsize
    elif spec.base in ("int8", "int8b"):
        nbytes = k + 4 * _n_scales(spec, k)
    else:
        nbytes = (k + 1) // 2 + 4 * _n_scales(spec, k)
    if spec.sparse:
        nbytes += k * _index_width(numel) // 8
    return nbytes / numel


# --------------------------------------------------------------------------------------------
# Error feedback
# --------------------------------------------------------------------------------------------


class ErrorFeedback:
    """Carries what compression dropped into the next round (error feedback / EF-SGD style).

    ``compress`` encodes ``tensors + residual`` and keeps ``(tensors + residual) - decoded`` as
    the next residual, so the sum of everything decoded plus the final residual equals the sum of
    everything given. Keys absent from a round keep their residual. Residuals are float32 on CPU.
    """

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}

    def compress(self, tensors: dict[str, torch.Tensor], spec: CodecSpec | str
                 ) -> tuple[bytes, dict[str, torch.Tensor]]:
        corrected = {}
        for key, t in tensors.items():
            x = t.detach().to(device="cpu", dtype=torch.float32)
            r = self.residual.get(key)
            if r is not None:
                if r.shape != x.shape:
                    raise ValueError(f"tensor {key!r}: shape {tuple(x.shape)} differs from its "
                                     f"residual {tuple(r.shape)}")
                x = x + r
            corrected[key] = x
        payload = encode(corrected, spec)
        decoded = decode(payload)
        for key, x in corrected.items():
            self.residual[key] = x - decoded[key]
        return payload, decoded

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in sorted(self.residual.items())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residual = {k: v.detach().to(device="cpu", dtype=torch.float32).clone()
                         for k, v in state.items()}

    def reset(self) -> None:
        self.residual = {}


# --------------------------------------------------------------------------------------------
# Benchmark helper
# --------------------------------------------------------------------------------------------


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

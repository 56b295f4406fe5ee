"""The wire container: encode / decode of ``dict[str, Tensor]`` through a :class:`CodecSpec`.

A safetensors container (portable, little-endian) holds the streams of the base step (e.g.
``values``, or ``codes`` and ``scales``), the ``index8``/``index16``/``index32``/``index64``
streams of a sparse codec, each the concatenation over tensors in sorted-name order, and one
metadata entry, ``fedumm.compress``, whose JSON records the format version, the canonical codec
spelling, every tensor's name, shape and dtype, the kept counts of a sparse codec, and a CRC-32
of the streams. An entropy step wraps the container behind a 5-byte prefix (``b"FUMZ"`` + method
byte). The metadata is a single key (safetensors orders several keys differently from one
process to the next), so equal inputs give identical bytes.
"""

from __future__ import annotations

import json
import math
import struct
import zlib

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedumm.fl.codecs.entropy import unwrap, wrap
from fedumm.fl.codecs.spec import CodecSpec, parse_codec
from fedumm.fl.codecs.topk import INDEX_DTYPES, index_width, load_index, positions, store_index

FORMAT_VERSION = 1
META_KEY = "fedumm.compress"
# the dtypes a tensor may have on the way in (and is restored to on request)
INPUT_DTYPES = {
    "float32": torch.float32, "float64": torch.float64,
    "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def _stream_crc(streams: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(streams):
        t = streams[name].contiguous()
        if t.numel():
            crc = zlib.crc32(t.view(torch.uint8).numpy(), crc)
    return crc


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
        if dtype not in INPUT_DTYPES:
            raise ValueError(f"tensor {key!r}: dtype {dtype} is not a float dtype "
                             f"({', '.join(INPUT_DTYPES)})")
        flat = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"tensor {key!r}: has non-finite values (nan/inf); refusing to encode")
        rows.append((key, flat, dtype, list(t.shape)))
    return rows


def encode(tensors: dict[str, torch.Tensor], spec: CodecSpec | str = "float32") -> bytes:
    """Encode float tensors under a codec into one self-describing payload."""
    spec = parse_codec(spec)
    base = spec.base_step
    rows = _check_tensors(tensors)
    parts: dict[str, list[torch.Tensor]] = {}
    index_parts: dict[int, list[torch.Tensor]] = {}
    entries, nnz = [], []
    for key, flat, dtype, shape in rows:
        entries.append([key, shape, dtype])
        v = flat
        if spec.sparse:
            k = spec.keep(flat.numel())
            pos = positions(flat.abs(), k)
            bits = index_width(flat.numel())
            index_parts.setdefault(bits, []).append(store_index(pos, bits))
            nnz.append(k)
            v = flat[pos]
        for name, t in base.encode(v, key).items():
            parts.setdefault(name, []).append(t)
    streams = {name: torch.cat(ts) for name, ts in parts.items()}
    streams.update({f"index{bits}": torch.cat(ts) for bits, ts in index_parts.items()})
    streams = base.pack(streams)
    streams = {name: t for name, t in streams.items() if t.numel()}
    header: dict = {"format": FORMAT_VERSION, "codec": str(spec), "tensors": entries}
    if spec.sparse:
        header["nnz"] = nnz
    header["crc32"] = _stream_crc(streams)
    meta = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    container = st_save(streams, metadata={META_KEY: meta})
    return container if spec.entropy is None else wrap(container, spec.entropy)


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
    container, method = unwrap(bytes(payload))
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
    container, _ = unwrap(bytes(payload))
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
    base = spec.base_step
    try:
        entries = [(str(k), [int(d) for d in shape], str(dt)) for k, shape, dt in header["tensors"]]
        nnz = [int(c) for c in header["nnz"]] if spec.sparse else None
        if nnz is not None and len(nnz) != len(entries):
            raise ValueError("nnz and tensors differ in length")
        if any(d < 0 for _, shape, _ in entries for d in shape):
            raise ValueError("negative dimension")
        if any(dt not in INPUT_DTYPES for _, _, dt in entries):
            raise ValueError("unknown dtype")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"corrupt payload: bad tensor records ({exc})") from None
    sizes = [math.prod(shape) for _, shape, _ in entries]
    counts = nnz if nnz is not None else sizes
    if nnz is not None and any(not 0 <= c <= n for c, n in zip(nnz, sizes, strict=True)):
        raise ValueError("corrupt payload: a kept count exceeds its tensor size")

    cursors = {name: _Cursor(streams, name, dt) for name, dt in base.stream_dtypes().items()}
    unpacked = base.unpack({name: c.data for name, c in cursors.items()}, sum(counts))
    for name, data in unpacked.items():
        cursors[name].data = data
    index = {bits: _Cursor(streams, f"index{bits}", dt) for bits, dt in INDEX_DTYPES.items()}

    out = {}
    for (key, shape, dtype), n, c in zip(entries, sizes, counts, strict=True):
        v = base.decode(c, {name: cursors[name].take(m) for name, m in base.counts(c).items()})
        if spec.sparse:
            bits = index_width(n)
            pos = load_index(index[bits].take(c), bits)
            if c and (int(pos.max()) >= n or int(pos.min()) < 0):
                raise ValueError(f"corrupt payload: tensor {key!r} has positions out of range")
            dense = torch.zeros(n, dtype=torch.float32)
            dense[pos] = v
            v = dense
        t = v.reshape(shape)
        out[key] = t.to(INPUT_DTYPES[dtype]) if restore_dtype else t
    for cursor in (*cursors.values(), *index.values()):
        cursor.done()
    return out


def roundtrip(tensors: dict[str, torch.Tensor], spec: CodecSpec | str = "float32"
              ) -> tuple[dict[str, torch.Tensor], int]:
    """What the receiver gets, and the number of bytes it cost."""
    payload = encode(tensors, spec)
    return decode(payload), len(payload)

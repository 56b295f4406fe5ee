"""The wire codecs: self-describing, CPU-only encoding of adapter payloads
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

Each step is a class registered under its name in :data:`fedumm.registry.CODECS`; importing
this package registers the built-in ones (one module per family: ``casts``, ``int8``,
``tables``, ``topk``, ``entropy``). A new base encoding is one module with a
:class:`~fedumm.fl.codecs.base.BaseCodec` subclass and ``CODECS.register(name, cls)``; its
spelling then parses, composes with topk and entropy steps, encodes and decodes.
"""

from __future__ import annotations

from fedumm.fl.codecs import casts, entropy, int8, tables, topk  # noqa: F401  (registers steps)
from fedumm.fl.codecs.container import decode, encode, payload_info, roundtrip
from fedumm.fl.codecs.error_feedback import ErrorFeedback
from fedumm.fl.codecs.sizes import bytes_per_value, throughput
from fedumm.fl.codecs.spec import CodecSpec, carries_values, parse_codec, resolve_codec
from fedumm.fl.codecs.tables import FP4_TABLE, NF4_TABLE
from fedumm.registry import CODECS

CODECS.set_resolver(resolve_codec)  # parse + the optional packages a step needs

__all__ = [
    "CodecSpec",
    "ErrorFeedback",
    "FP4_TABLE",
    "NF4_TABLE",
    "bytes_per_value",
    "carries_values",
    "decode",
    "encode",
    "parse_codec",
    "payload_info",
    "roundtrip",
    "throughput",
]

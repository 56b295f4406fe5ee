"""Adapter payloads on the wire: safetensors bytes, optionally cast to a smaller dtype.

The bytes counted in a run are ``len()`` of exactly these payloads.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def encode(tensors: dict[str, torch.Tensor], dtype: str = "float32") -> bytes:
    """Serialise tensors (cast to ``dtype``) into one safetensors payload."""
    if dtype not in DTYPES:
        raise ValueError(f"codec dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    return st_save({k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in tensors.items()})


def decode(payload: bytes, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors of a payload, cast back to the training dtype."""
    return {k: v.to(dtype) for k, v in st_load(payload).items()}


def roundtrip(tensors: dict[str, torch.Tensor], dtype: str = "float32"
              ) -> tuple[dict[str, torch.Tensor], int]:
    """What the receiver gets, and the number of bytes it cost."""
    payload = encode(tensors, dtype)
    return decode(payload), len(payload)

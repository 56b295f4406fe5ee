"""The floating-point dtypes a backbone trains and stores in, by the names configs use
(``backbone.dtype``); the wire's plain-cast codecs use the same names."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}

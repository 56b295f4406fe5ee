"""Server-side validation of a decoded client update, before it may be aggregated."""

from __future__ import annotations

import torch


def validate(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """Why an update cannot be aggregated (None when it can): unknown keys, shapes that differ
    from the global adapters', non-float or non-finite values."""
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        return f"unknown adapter tensors {unknown[:3]}"
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            return f"{k}: shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
        if not v.is_floating_point():
            return f"{k}: dtype {v.dtype}, expected a float tensor"
        if not bool(torch.isfinite(v).all()):
            return f"{k}: non-finite values"
    return None

"""Pure functions on adapter states (``dict[str, torch.Tensor]``).

None of these modify their inputs; each returns a new dict of new tensors (``select`` returns
the same tensor objects under a subset of the keys). Sums run over the states in the order
given, so the same inputs always give bit-identical outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

State = dict[str, torch.Tensor]


def _check_same_keys(a: State, b: State) -> None:
    if a.keys() != b.keys():
        missing = sorted(a.keys() - b.keys())
        extra = sorted(b.keys() - a.keys())
        raise KeyError(f"states have different keys: missing {missing}, extra {extra}")


def weighted_mean(states: list[State], weights: Sequence[float]) -> State:
    """Weighted mean of states with the same keys.

    Parameters
    ----------
    states
        The states to average; all must have the same keys and per-key shapes.
    weights
        One non-negative weight per state; renormalised to sum to 1.

    Returns
    -------
    dict
        The mean, each tensor in the dtype of the first state's tensor for that key.

    Raises
    ------
    ValueError
        If there are no states, the lengths differ, a weight is negative or not finite, or all
        weights are zero.
    """
    if not states:
        raise ValueError("weighted_mean: no states")
    if len(states) != len(weights):
        raise ValueError(f"weighted_mean: {len(states)} states but {len(weights)} weights")
    w = [float(x) for x in weights]
    if any(not (x >= 0.0 and x < float("inf")) for x in w):  # also rejects NaN
        raise ValueError(f"weighted_mean: weights must be finite and non-negative, got {w}")
    total = sum(w)
    if total <= 0.0:
        raise ValueError("weighted_mean: all weights are zero")
    w = [x / total for x in w]
    for s in states[1:]:
        _check_same_keys(states[0], s)
    out: State = {}
    for key, first in states[0].items():
        # float64 accumulation keeps the mean exact enough that a single weight of 1 (or equal
        # states) gives back the inputs bit for bit after the cast.
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for s, wi in zip(states, w, strict=True):
            acc += s[key].detach().to(device="cpu", dtype=torch.float64) * wi
        out[key] = acc.to(device=first.device, dtype=first.dtype)
    return out


def subtract(a: State, b: State) -> State:
    """``a - b`` key by key (same keys required)."""
    _check_same_keys(a, b)
    return {k: a[k] - b[k] for k in a}


def add(a: State, b: State, scale: float = 1.0) -> State:
    """``a + scale * b`` key by key (same keys required)."""
    _check_same_keys(a, b)
    return {k: a[k] + scale * b[k] for k in a}


def scale(a: State, s: float) -> State:
    """``s * a`` key by key."""
    return {k: v * s for k, v in a.items()}


def zeros_like(a: State) -> State:
    """Zeros with the keys, shapes and dtypes of ``a``."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def select(state: State, keys: Iterable[str]) -> State:
    """The entries of ``state`` under ``keys`` (in that order); KeyError names missing keys."""
    keys = list(keys)
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"state lacks keys {missing}")
    return {k: state[k] for k in keys}

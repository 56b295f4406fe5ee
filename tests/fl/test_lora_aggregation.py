"""LoRA-aware aggregation maths against hand-computed values."""

from __future__ import annotations

import torch

from fedumm.fl.lora_aggregation import (
    aggregation_error,
    exact_residuals,
    lora_modules,
    mean_products,
    pad_ranks,
    truncate_ranks,
)

A, B = "m.lora_A.weight", "m.lora_B.weight"


def client(seed: int, r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(r, 6, generator=g), B: torch.randn(5, r, generator=g),
            "tok.weight": torch.randn(3, generator=g)}


def separate_mean(states, weights):
    total = sum(weights)
    return {k: sum(s[k] * w for s, w in zip(states, weights, strict=True)) / total
            for k in states[0]}


def test_modules_pair_a_with_b():
    assert lora_modules([A, B, "x.lora_A.weight", "tok.weight"]) == {"m": (A, B)}


def test_separate_averaging_has_an_error_that_exact_folding_removes():
    states, weights = [client(1), client(2), client(3)], [1.0, 2.0, 3.0]
    modules = lora_modules(states[0])
    avg = separate_mean(states, weights)
    target = sum(s[B].double() @ s[A].double() * w for s, w in zip(states, weights,
                                                                  strict=True)) / 6
    torch.testing.assert_close(mean_products(states, weights, modules)["m"], target)
    err = aggregation_error(states, weights, avg, modules)
    hand = float((target - avg[B].double() @ avg[A].double()).norm() / target.norm())
    assert abs(err - hand) < 1e-12 and err > 0.1
    scaling = 2.0
    residual = exact_residuals(states, weights, avg, modules, scaling)["m"]
    folded = avg[B].double() @ avg[A].double() + residual.double() / scaling
    assert float((folded - target).norm() / target.norm()) < 1e-6  # float32 residual


def test_a_shared_a_makes_separate_averaging_exact():
    shared = client(0)[A]
    states = [{**client(s), A: shared} for s in (1, 2, 3)]
    avg = separate_mean(states, [1.0, 1.0, 2.0])
    assert aggregation_error(states, [1.0, 1.0, 2.0], avg, lora_modules(states[0])) < 1e-6


def test_truncate_then_pad_keeps_the_first_components_and_zeros_the_rest():
    full = client(4, r=8)
    small = truncate_ranks(full, 3)
    assert small[A].shape == (3, 6) and small[B].shape == (5, 3)
    assert torch.equal(small["tok.weight"], full["tok.weight"])
    back = pad_ranks(small, full)
    assert torch.equal(back[A][:3], full[A][:3]) and not back[A][3:].any()
    assert torch.equal(back[B][:, :3], full[B][:, :3]) and not back[B][:, 3:].any()


def test_zero_padding_averages_every_component_over_every_client():
    # FLoRA's zero-padding baseline: a rank-2 client's missing components count as zeros with
    # its full weight (the old per-component renormalisation gave the rank-4 client weight 1)
    from fedumm.fl.aggregate import weighted_mean

    full = client(5, r=4)
    low = pad_ranks(truncate_ranks(client(6, r=4), 2), full)  # a rank-2 client
    out = weighted_mean([{B: full[B], A: full[A]}, {B: low[B], A: low[A]}], [1.0, 3.0])
    torch.testing.assert_close(out[B][:, :2], (full[B][:, :2] + 3 * low[B][:, :2]) / 4)
    torch.testing.assert_close(out[B][:, 2:], full[B][:, 2:] / 4)
    torch.testing.assert_close(out[A][2:], full[A][2:] / 4)

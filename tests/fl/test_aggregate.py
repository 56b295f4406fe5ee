"""Pure state arithmetic in fedumm.fl.aggregate, checked on hand-computed tiny tensors."""

from __future__ import annotations

import pytest
import torch

from fedumm.fl.aggregate import add, scale, select, subtract, weighted_mean, zeros_like

V = "base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
L = "base_model.model.language_model.layers.0.mlp.up_proj.lora_B.weight"


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def test_weighted_mean_by_hand() -> None:
    a = {V: t(1.0, 2.0), L: t(0.0, 4.0)}
    b = {V: t(3.0, 6.0), L: t(4.0, 0.0)}
    # weights 1:3 -> (1*1 + 3*3) / 4 = 2.5, (2 + 18) / 4 = 5; (0 + 12) / 4 = 3, (4 + 0) / 4 = 1
    out = weighted_mean([a, b], [1.0, 3.0])
    assert torch.equal(out[V], t(2.5, 5.0))
    assert torch.equal(out[L], t(3.0, 1.0))
    # weights are renormalised: 2:6 is the same as 1:3
    again = weighted_mean([a, b], [2, 6])
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_weighted_mean_zero_weight_ignores_state() -> None:
    out = weighted_mean([{V: t(1.0, 1.0)}, {V: t(100.0, -7.0)}], [5.0, 0.0])
    assert torch.equal(out[V], t(1.0, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_weighted_mean_keeps_dtype_and_single_state_is_exact(dtype: torch.dtype) -> None:
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = weighted_mean([{V: x}], [7.0])
    assert out[V].dtype == dtype
    assert torch.equal(out[V], x)
    assert out[V] is not x


def test_weighted_mean_is_deterministic() -> None:
    g = torch.Generator().manual_seed(1)
    states = [{V: torch.randn(4, generator=g)} for _ in range(5)]
    weights = [0.1, 0.7, 0.3, 1.9, 0.05]
    assert torch.equal(weighted_mean(states, weights)[V], weighted_mean(states, weights)[V])


@pytest.mark.parametrize(("states", "weights", "exc"), [
    ([], [], ValueError),
    ([{V: t(1.0)}], [1.0, 2.0], ValueError),
    ([{V: t(1.0)}, {V: t(2.0)}], [0.0, 0.0], ValueError),
    ([{V: t(1.0)}, {V: t(2.0)}], [1.0, -1.0], ValueError),
    ([{V: t(1.0)}, {V: t(2.0)}], [1.0, float("nan")], ValueError),
    ([{V: t(1.0)}, {L: t(2.0)}], [1.0, 1.0], KeyError),
])
def test_weighted_mean_errors(states, weights, exc) -> None:
    with pytest.raises(exc):
        weighted_mean(states, weights)


def test_arithmetic_by_hand_and_inputs_untouched() -> None:
    a = {V: t(1.0, 2.0), L: t(3.0, 4.0)}
    b = {V: t(0.5, -1.0), L: t(1.0, 1.0)}
    a0 = {k: v.clone() for k, v in a.items()}
    b0 = {k: v.clone() for k, v in b.items()}
    assert torch.equal(subtract(a, b)[V], t(0.5, 3.0))
    assert torch.equal(add(a, b)[L], t(4.0, 5.0))
    assert torch.equal(add(a, b, scale=2.0)[V], t(2.0, 0.0))
    assert torch.equal(scale(a, -0.5)[L], t(-1.5, -2.0))
    z = zeros_like({V: t(1.0, 2.0, dtype=torch.bfloat16)})
    assert torch.equal(z[V], t(0.0, 0.0, dtype=torch.bfloat16)) and z[V].dtype == torch.bfloat16
    for k in a:
        assert torch.equal(a[k], a0[k]) and torch.equal(b[k], b0[k])
    with pytest.raises(KeyError):
        subtract(a, {V: t(1.0, 1.0)})


def test_select() -> None:
    a = {V: t(1.0), L: t(2.0)}
    out = select(a, [L])
    assert list(out) == [L] and out[L] is a[L]
    with pytest.raises(KeyError, match="gen_head"):
        select(a, [V, "base_model.model.gen_head.lora_A.weight"])

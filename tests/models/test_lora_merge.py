"""Merging and folding (:class:`fedumm.models.lora.LoraAdapters`), against PEFT's own merge:
the merged weight of every adapted module is what PEFT's ``merge_and_unload`` gives
(``W + scaling * B A``) plus the folded residual; folding is exact whatever came before."""

from __future__ import annotations

import pytest
import torch

from fedumm.models.lora import LoraAdapters
from fedumm.models.reference.micro import micro_backbone

R, ALPHA = 4, 8


def _random_state(adapters: LoraAdapters, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen)
            for k, v in adapters.state().items()}


def _residual(adapters: LoraAdapters, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: 0.05 * torch.randn(adapters.model.get_submodule(m).base_layer.weight.shape,
                                  generator=gen)
            for m in adapters.adapted_modules()}


def test_merged_weights_are_peft_merge_plus_the_residual():
    ours = LoraAdapters(micro_backbone(0), r=R, alpha=ALPHA, seed=0)
    state, residual = _random_state(ours, 1), _residual(ours, 2)
    ours.load_state(state)
    originals = {m: ours.model.get_submodule(m).base_layer.weight.detach().clone()
                 for m in residual}
    ours.fold_residuals(residual)
    merged = ours.merge_and_unload()
    assert merged is ours.backbone.model and not hasattr(merged, "peft_config")

    oracle = LoraAdapters(micro_backbone(0), r=R, alpha=ALPHA, seed=0)
    oracle.load_state(state)
    by_peft = oracle.model.merge_and_unload()  # PEFT's merge of the same adapters, unfolded
    got, want = dict(merged.named_parameters()), dict(by_peft.named_parameters())
    assert got.keys() == want.keys()
    adapted = {m.removeprefix("base_model.model.") + ".weight": m for m in residual}
    for name, w in want.items():
        if name in adapted:
            assert torch.allclose(got[name], w + residual[adapted[name]], atol=1e-6), name
        else:  # untouched, or a trained copy (modules_to_save) put in place by PEFT
            assert torch.equal(got[name], w), name
    assert torch.equal(got["alignment.tokens"], state["base_model.model.alignment.tokens"])
    # and PEFT's merge is the LoRA formula: W + (alpha / r) B A on a Linear layer
    m = next(m for m in residual if "q_proj" in m)
    a, b = state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]
    name = m.removeprefix("base_model.model.") + ".weight"
    assert torch.allclose(got[name], originals[m] + ALPHA / R * b @ a + residual[m], atol=1e-6)


def test_folding_is_exact_whatever_was_folded_before():
    once = LoraAdapters(micro_backbone(0), r=R, alpha=ALPHA, seed=0)
    steps = LoraAdapters(micro_backbone(0), r=R, alpha=ALPHA, seed=0)
    first, last = _residual(once, 1), _residual(once, 2)
    before = {m: once.model.get_submodule(m).base_layer.weight.detach().clone() for m in first}
    once.fold_residuals(last)
    for r in (first, {m: 3 * v for m, v in first.items()}, last, last):
        steps.fold_residuals(r)
    for m in last:
        w_once = once.model.get_submodule(m).base_layer.weight
        w_steps = steps.model.get_submodule(m).base_layer.weight
        assert torch.equal(w_once, w_steps) and torch.equal(w_once, before[m] + last[m])
    steps.fold_residuals({m: torch.zeros_like(v) for m, v in last.items()})
    assert all(torch.equal(steps.model.get_submodule(m).base_layer.weight, before[m])
               for m in last)


def test_a_saved_folder_loads_back_and_a_mismatch_is_named(tmp_path):
    src = LoraAdapters(micro_backbone(0), r=R, alpha=ALPHA, seed=0)
    state = _random_state(src, 1)
    src.load_state(state)
    src.export(tmp_path / "adapters")
    dst = LoraAdapters(micro_backbone(0), r=R, alpha=ALPHA, seed=5)
    assert dst.load_folder(tmp_path / "adapters") == {}
    assert all(torch.equal(dst.state()[k], v) for k, v in state.items())
    other = LoraAdapters(micro_backbone(0), r=2 * R, alpha=ALPHA, seed=0)
    with pytest.raises(ValueError, match=r"adapters saved with \{'r': 4"):
        other.load_folder(tmp_path / "adapters")

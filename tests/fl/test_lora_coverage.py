"""Every LoRA factor PEFT creates on a backbone's declared groups (Linear and Embedding layers)
is covered by every LoRA-aware mode: its pair is found, FFA freezes the factor PEFT seeded at
random, rank truncation and padding invert each other on it, its update has the shape of
the weight the exact residual is folded into, and the heterogeneous-rank rules (HetLoRA's
norms and self-pruning tail, FLoRA's stacking) compute on it."""

from __future__ import annotations

import pytest
import torch

from fedumm.config import BackboneConfig, config_from_dict
from fedumm.fl.lora_aggregation import (
    _product,
    exact_residuals,
    hetlora_weights,
    is_seeded,
    lora_modules,
    lora_norm,
    mean_products,
    pad_ranks,
    stack_factors,
    tail_norm,
    truncate_ranks,
)
from fedumm.fl.lora_modes import LoraMode
from fedumm.models.kinds import backbone_kinds, build_backbone
from fedumm.models.lora import LoraAdapters

PRESETS = {"reference": "micro", "janus": "tiny", "blip3o": "tiny"}


def test_every_registered_backbone_is_walked():
    assert set(backbone_kinds()) == set(PRESETS)


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_every_lora_factor_of_every_backbone_is_covered(kind):
    bb = build_backbone(BackboneConfig(kind=kind, preset=PRESETS[kind], device="cpu"))
    ad = LoraAdapters(bb, r=4, alpha=8, seed=0)
    state = ad.state()
    factors = {k for k in state if ".lora_" in k}
    modules = lora_modules(state)
    assert factors == {k for ab in modules.values() for k in ab}  # no factor left out
    kinds = set()
    g = torch.Generator().manual_seed(0)
    for module, (a, b) in modules.items():
        seeded = [k for k in (a, b) if is_seeded(k)]
        assert len(seeded) == 1  # FFA freezes exactly one factor: the random one
        other = b if seeded[0] == a else a
        assert state[seeded[0]].abs().sum() > 0 and state[other].abs().sum() == 0
        assert LoraMode(ffa=True, client_ranks=()).frozen()(seeded[0])
        weight = ad.model.get_submodule(module).base_layer.weight
        assert tuple(_product(state, a, b).shape) == tuple(weight.shape)  # folds in place
        cut = truncate_ranks({a: state[a], b: state[b]}, 2)
        assert cut[a].shape[0] == 2 and cut[b].shape[1] == 2
        back = pad_ranks(cut, state)
        assert torch.equal(back[a][:2], state[a][:2]) and back[a].shape == state[a].shape
        # two trained clients of ranks 2 and 4 (the zero-initialised factor moved)
        clients = [pad_ranks(truncate_ranks({a: state[a], b: state[b], other: torch.randn(
            state[other].shape, generator=g)}, r), state) for r in (2, 4)]
        one = {module: (a, b)}
        stacked = dict(zip((a, b), stack_factors(clients, [1.0, 3.0], a, b, [2, 4]),
                           strict=True))
        assert stacked[a].shape[0] == 6  # rank 2 + 4
        product = _product(stacked, a, b)
        assert tuple(product.shape) == tuple(weight.shape)
        torch.testing.assert_close(product, mean_products(clients, [1.0, 3.0], one)[module])
        norms = [float(_product(c, a, b).norm()) for c in clients]
        assert hetlora_weights(clients, [1.0, 3.0], a, b) == pytest.approx(
            [n / sum(norms) for n in norms])
        assert float(lora_norm(clients[0][a], clients[0][b])) == pytest.approx(norms[0])
        tail = _product({a: clients[1][a][3:4], b: clients[1][b][:, 3:4]}, a, b).norm()
        assert float(tail_norm(clients[1], one, 4, 0.75)) == pytest.approx(float(tail))
        kinds.add("embedding" if "embedding" in a else "linear")
    assert "linear" in kinds
    if kind == "reference":
        assert "embedding" in kinds  # gen_embed: the case the modes used to skip


def test_an_embeddings_exact_residual_is_its_transposed_mean_product():
    a, b = "e.lora_embedding_A", "e.lora_embedding_B"  # A: r x num, B: dim x r
    g = torch.Generator().manual_seed(0)
    states = [{a: torch.randn(2, 5, generator=g), b: torch.randn(3, 2, generator=g)}
              for _ in range(2)]
    new = {a: (states[0][a] + states[1][a]) / 2, b: (states[0][b] + states[1][b]) / 2}
    residual = exact_residuals(states, [1.0, 1.0], new, lora_modules(new), scaling=2.0)["e"]
    target = sum((s[b] @ s[a]).T for s in states) / 2  # PEFT: delta = (B @ A)^T * scaling
    torch.testing.assert_close(residual.double(), 2.0 * (target - (new[b] @ new[a]).T).double())
    assert residual.shape == (5, 3)


def test_ffa_keeps_the_embeddings_random_factor_and_trains_the_other(tmp_path, tiny_overrides):
    from safetensors.torch import load_file

    from fedumm.runtime.dispatch import run_experiment
    from fedumm.runtime.experiment import build_adapters, load_backbone

    cfg = config_from_dict({"name": "ffa"}, [*tiny_overrides, "lora.aggregation=ffa",
                                             "eval.every=0", "eval.max_gen=0"])
    run_experiment(cfg, tmp_path / "run", progress=False)
    final = {k.replace("base_model.model.", ""): v for k, v in
             load_file(str(tmp_path / "run" / "adapters" / "adapter_model.safetensors")).items()}
    start = {k.replace("base_model.model.", ""): v
             for k, v in build_adapters(cfg, load_backbone(cfg)).state().items()}
    emb_a = [k for k in final if k.endswith("lora_embedding_A")]
    emb_b = [k for k in final if k.endswith("lora_embedding_B")]
    assert emb_a and emb_b
    assert all(torch.equal(final[k], start[k]) for k in emb_b)  # seeded: never moves
    assert any(not torch.equal(final[k], start[k]) for k in emb_a)  # trained from zero

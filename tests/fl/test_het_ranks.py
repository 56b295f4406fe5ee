"""Heterogeneous LoRA ranks: the three aggregation rules (``lora.het_aggregation``), each
against its paper's formula transcribed here on hand-made tensors, HetLoRA's rank
self-pruning, and a micro run per rule with its logged aggregation error.

* zeropad, the baseline of FLoRA (Wang et al. 2024, arXiv:2409.05976): ``A = sum_k p_k
  pad(A_k)``, ``B = sum_k p_k pad(B_k)``, ``p_k = n_k / sum_j n_j``;
* hetlora (Cho et al. 2024, arXiv:2401.06432): the same with ``p_k = ||B_k A_k||_F / sum_j
  ||B_j A_j||_F``; self-pruning adds ``lambda ||B[:, gr:r] A[gr:r]||_F`` to the loss and
  prunes ``r -> floor(gamma r)`` when that norm fell during the round;
* stack (FLoRA): ``A = [p_1 A_1; p_2 A_2]``, ``B = [B_1, B_2]``, ``B A = sum_k p_k B_k A_k``.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedumm.config import ConfigError, StrategyConfig, config_from_dict
from fedumm.fl.client_hooks import LocalRound
from fedumm.fl.lora_aggregation import (
    HETLORA,
    STACK,
    ZEROPAD,
    hetlora_weights,
    lora_modules,
    lora_norm,
    pad_ranks,
    pruned_rank,
    rule_targets,
    stack_factors,
    tail_norm,
)
from fedumm.fl.lora_modes import PRUNED_RANK, LoraMode, RankMask, SelfPrune
from fedumm.fl.strategies import build_strategy
from fedumm.fl.updates import ClientUpdate
from fedumm.registry import STRATEGIES
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.run_dir import RunDirectory
from fedumm.runtime.saved_run import SavedRun

A, B = "m.lora_A.weight", "m.lora_B.weight"
T = torch.tensor

# two clients of a rank-2 module (in = out = 2): client 1 has rank 1, client 2 rank 2
A1, B1 = T([[1.0, 0.0]]), T([[2.0], [0.0]])  # B1 A1 = [[2, 0], [0, 0]], ||.||_F = 2
A2, B2 = T([[0.0, 1.0], [1.0, 0.0]]), T([[1.0, 0.0], [0.0, 3.0]])  # B2 A2 = [[0, 1], [3, 0]]
FULL = {A: torch.zeros(2, 2), B: torch.zeros(2, 2)}
C1 = pad_ranks({A: A1, B: B1}, FULL)
C2 = {A: A2, B: B2}
SAMPLES = [1.0, 3.0]  # the strategy's weights: p = (1/4, 3/4)


def _strategy(name: str = "fedavg", rule: str = ZEROPAD):
    s = build_strategy(StrategyConfig(name=name), 2, 0)
    s.het_aggregation = rule
    return s


def _mean(name: str, rule: str) -> dict[str, torch.Tensor]:
    ups = [ClientUpdate(k, c, {"understanding": 1}) for k, c in enumerate((C1, C2))]
    return _strategy(name, rule).mean([A, B], ups, SAMPLES)


# --------------------------------------------------------------------------- the rules

@pytest.mark.parametrize("name", sorted(STRATEGIES.names()))
def test_zeropad_is_the_weighted_mean_of_the_padded_factors(name):
    out = _mean(name, ZEROPAD)
    torch.testing.assert_close(out[A], 0.25 * C1[A] + 0.75 * C2[A])  # = [[.25, .75], [.75, 0]]
    torch.testing.assert_close(out[B], T([[1.25, 0.0], [0.0, 2.25]]))


@pytest.mark.parametrize("name", sorted(STRATEGIES.names()))
def test_hetlora_weighs_each_client_by_the_frobenius_norm_of_its_product(name):
    p1, p2 = 2 / (2 + math.sqrt(10)), math.sqrt(10) / (2 + math.sqrt(10))  # sample-free
    assert hetlora_weights([C1, C2], SAMPLES, A, B) == pytest.approx([p1, p2])
    out = _mean(name, HETLORA)
    torch.testing.assert_close(out[A], p1 * C1[A] + p2 * C2[A])
    torch.testing.assert_close(out[B], p1 * C1[B] + p2 * C2[B])


def test_hetlora_weights_leave_out_zero_weight_clients_and_fall_back_when_nothing_moved():
    assert hetlora_weights([C1, C2], [1.0, 0.0], A, B) == [1.0, 0.0]
    zero = {A: C1[A], B: torch.zeros(2, 2)}
    assert hetlora_weights([zero, zero], SAMPLES, A, B) == [0.25, 0.75]


def test_stacking_is_the_exact_weighted_sum_of_products_at_rank_sum_rk():
    a, b = stack_factors([C1, C2], SAMPLES, A, B, ranks=[1, 2])
    torch.testing.assert_close(a, T([[0.25, 0.0], [0.0, 0.75], [0.75, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(b, T([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64))
    hand = T([[0.5, 0.75], [2.25, 0.0]], dtype=torch.float64)  # 1/4 B1 A1 + 3/4 B2 A2
    torch.testing.assert_close(b @ a, hand)
    assert torch.linalg.matrix_rank(b @ a) == 2  # a rank-1 and a rank-2 client
    # the padded tensors stack to the same product (zero rows add nothing)
    a_pad, b_pad = stack_factors([C1, C2], SAMPLES, A, B)
    torch.testing.assert_close(b_pad @ a_pad, hand)
    # zero-padding the factors instead leaves an error that stacking does not
    zp = _mean("fedavg", ZEROPAD)
    assert float((zp[B].double() @ zp[A].double() - hand).norm()) > 0.5


def test_each_rule_targets_the_mean_product_it_averages():
    mods = lora_modules([A, B])
    hand = T([[0.5, 0.75], [2.25, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(rule_targets([C1, C2], SAMPLES, mods, ZEROPAD)["m"], hand)
    torch.testing.assert_close(rule_targets([C1, C2], SAMPLES, mods, STACK)["m"], hand)
    p1, p2 = hetlora_weights([C1, C2], SAMPLES, A, B)
    het = p1 * T([[2.0, 0.0], [0.0, 0.0]]) + p2 * T([[0.0, 1.0], [3.0, 0.0]])
    torch.testing.assert_close(rule_targets([C1, C2], SAMPLES, mods, HETLORA)["m"],
                               het.double())


def test_the_norm_of_a_product_without_forming_it_and_its_gradient_at_zero():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    torch.testing.assert_close(lora_norm(a, b), (b @ a).norm())
    a0 = torch.zeros(3, 7, requires_grad=True)
    lora_norm(a0, b).backward()  # a LoRA starting at zero: no NaN
    assert torch.equal(a0.grad, torch.zeros(3, 7))


# --------------------------------------------------------------------------- self-pruning

def test_the_pruned_rank_and_the_tail_it_penalises():
    assert [pruned_rank(r, 0.99) for r in (16, 8, 4, 1)] == [15, 7, 3, 1]
    assert pruned_rank(10, 0.7) == 7 and pruned_rank(100, 0.29) == 29  # no float slip
    # client 2, rank 2, gamma 1/2: the tail is component 1, B2[:, 1] A2[1] = [[0, 0], [3, 0]]
    assert float(tail_norm(C2, lora_modules(C2), 2, 0.5)) == pytest.approx(3.0)
    assert float(tail_norm(C2, lora_modules(C2), 1, 0.5)) == 0.0  # rank 1: no tail


def _local(state, client_state):
    params = {k: torch.nn.Parameter(v.clone()) for k, v in state.items()}
    return LocalRound(params, state, client_state)


def test_a_client_whose_tail_shrank_prunes_it_and_keeps_the_smaller_rank():
    rnd = _local(C2, {})
    hook = SelfPrune(rank=2, gamma=0.5, lam=0.1)
    hook.begin(rnd)
    assert hook.before == pytest.approx(3.0)
    term = hook.loss(rnd)
    assert float(term.detach()) == pytest.approx(0.3)  # lambda * ||B[:, 1:2] A[1:2]||_F
    term.backward()
    assert rnd.params[A].grad[0].abs().sum() == 0 and rnd.params[A].grad[1].abs().sum() > 0
    trained = {A: A2.clone(), B: T([[1.0, 0.0], [0.0, 1.0]])}  # the tail fell to norm 1
    hook.end(rnd, trained)
    assert rnd.client_state[PRUNED_RANK] == 1
    assert torch.equal(trained[A], T([[0.0, 1.0], [0.0, 0.0]]))  # sent at rank 1
    assert torch.equal(trained[B], T([[1.0, 0.0], [0.0, 0.0]]))
    # next round: it receives rank 2 again and drops the pruned component before training
    nxt = _local(C2, dict(rnd.client_state))
    hook = SelfPrune(rank=2, gamma=0.5, lam=0.1)
    hook.begin(nxt)
    assert hook.rank == 1 and not nxt.params[A][1].any() and not nxt.params[B][:, 1].any()
    assert torch.equal(hook.masks[A], T([[1.0, 1.0], [0.0, 0.0]]))


def test_a_client_whose_tail_grew_keeps_its_rank():
    rnd = _local(C2, {})
    hook = SelfPrune(rank=2, gamma=0.5, lam=0.0)
    hook.begin(rnd)
    assert hook.loss(rnd) is None  # lambda 0: no term
    trained = {A: A2.clone(), B: T([[1.0, 0.0], [0.0, 4.0]])}
    hook.end(rnd, trained)
    assert rnd.client_state[PRUNED_RANK] == 2 and torch.equal(trained[B][:, 1], T([0.0, 4.0]))


def test_the_lora_mode_gives_the_pruning_hook_only_when_asked():
    assert type(LoraMode(False, (1, 2)).client_hooks(1)[0]) is RankMask
    hook = LoraMode(False, (1, 2), HETLORA, 0.5, 0.1).client_hooks(1)[0]
    assert isinstance(hook, SelfPrune) and (hook.rank, hook.gamma, hook.lam) == (2, 0.5, 0.1)
    assert LoraMode(False, (1, 2), STACK).restarts and not LoraMode(False, (1, 2)).restarts


# --------------------------------------------------------------------------- config

def test_het_aggregation_settings_are_validated():
    with pytest.raises(ConfigError, match="needs lora.client_ranks"):
        config_from_dict({}, ["lora.het_aggregation=stack"])
    with pytest.raises(ConfigError, match="lora.het_aggregation=stack folds mixed ranks"):
        config_from_dict({}, ["lora.client_ranks=4,8", "lora.aggregation=exact"])
    with pytest.raises(ConfigError, match="FFA-LoRA does not send A"):
        config_from_dict({}, ["lora.client_ranks=4,8", "lora.aggregation=ffa",
                              "lora.het_aggregation=hetlora"])
    with pytest.raises(ConfigError, match="needs lora.client_ranks and lora.het_aggregation"):
        config_from_dict({}, ["lora.client_ranks=4,8", "lora.hetlora_prune_gamma=0.9"])
    with pytest.raises(ConfigError, match="het_aggregation=stack folds the mean client model"):
        config_from_dict({}, ["lora.client_ranks=4,8", "lora.het_aggregation=stack",
                              "strategy.name=fedadam"])
    with pytest.raises(ConfigError, match=r"needs strategy.server_lr=1 \(got 0.5\)"):
        config_from_dict({}, ["lora.client_ranks=4,8", "lora.het_aggregation=stack",
                              "strategy.name=scaffold", "strategy.server_lr=0.5"])
    cfg = config_from_dict({}, ["lora.client_ranks=[4,8,16]", "lora.het_aggregation=hetlora",
                                "lora.hetlora_prune_gamma=0.9", "strategy.name=fedadam"])
    assert cfg.lora.folding is None and cfg.lora.client_ranks == [4, 8, 16]


# --------------------------------------------------------------------------- micro runs

def _errors(tmp_path, tiny_overrides, rule, *extra):
    cfg = config_from_dict({"name": rule}, [*tiny_overrides, "clients=3", "partition.alpha=0.3",
                                            "eval.every=0", "eval.max_gen=0", "lora.r=8",
                                            "lora.alpha=16", "lora.client_ranks=2,4,8",
                                            f"lora.het_aggregation={rule}", *extra])
    run_experiment(cfg, tmp_path / rule, progress=False)
    rounds = [m for m in RunDirectory(tmp_path / rule).metrics() if m["type"] == "round"]
    assert len(rounds) == 2
    return [r["aggregation_error"] for r in rounds]


def test_each_rule_logs_its_aggregation_error_and_stacking_has_none(tmp_path, tiny_overrides):
    from safetensors.torch import load_file

    from fedumm.runtime.experiment import build_adapters, load_backbone

    zeropad = _errors(tmp_path, tiny_overrides, ZEROPAD)
    hetlora = _errors(tmp_path, tiny_overrides, HETLORA, "lora.hetlora_prune_gamma=0.5")
    stack = _errors(tmp_path, tiny_overrides, STACK)
    for z, h, s in zip(zeropad, hetlora, stack, strict=True):
        assert set(z) == set(h) == set(s) == {"vision", "language", "generation"}
        assert max(s.values()) < 1e-6 < min(*z.values(), *h.values())
    # stacking folds everything into the frozen weights: the adapters restart each round
    run = tmp_path / STACK / "adapters"
    final = load_file(str(run / "adapter_model.safetensors"))
    cfg = config_from_dict({}, [*tiny_overrides, "lora.r=8", "lora.alpha=16"])
    start = {k.replace("base_model.model.", ""): v
             for k, v in build_adapters(cfg, load_backbone(cfg)).state().items()}
    lora = [k for k in final if ".lora_" in k]
    assert lora and all(torch.equal(final[k], start[k.replace("base_model.model.", "")])
                        for k in lora)
    residual = load_file(str(run / "base_residual.safetensors"))
    assert residual and all(v.abs().sum() > 0 for v in residual.values())
    saved = SavedRun(tmp_path / STACK)  # `fedumm evaluate` folds it back: the same numbers
    assert saved.differences(saved.evaluate()) == []

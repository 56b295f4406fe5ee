"""Server strategies: hand-computed rounds on tiny adapter states with real tensor names."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fedumm.config import StrategyConfig
from fedumm.fl.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedUMM,
    FedYogi,
    Scaffold,
    build_strategy,
)
from fedumm.fl.strategies.scaffold import ScaffoldCorrection, mean_gradient_control
from fedumm.fl.updates import GENERATION, UNDERSTANDING, ClientUpdate
from fedumm.models.protocol import IMAGE_INPUTS
from fedumm.models.reference import REFERENCE_GROUPS as REF
from fedumm.registry import STRATEGIES

V = "base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
L = "base_model.model.language_model.layers.0.mlp.up_proj.lora_B.weight"
G = "base_model.model.gen_head.lora_A.weight"
A = "base_model.model.alignment.tokens"


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def upd(cid: int, tensors: dict, und: int = 0, gen: int = 0, quality: dict | None = None,
        control_delta: dict | None = None, und_images: int | None = None) -> ClientUpdate:
    """An update; ``und_images`` of its understanding samples hold their image (all)."""
    extra = {} if control_delta is None else {"control_delta": control_delta}
    return ClientUpdate(client_id=cid, tensors=tensors,
                        num_samples={UNDERSTANDING: und, GENERATION: gen,
                                     IMAGE_INPUTS: und if und_images is None else und_images},
                        quality=quality or {}, extra=extra)


def close(a: torch.Tensor, *expected: float) -> bool:
    return torch.allclose(a.double(), torch.tensor(expected, dtype=torch.float64),
                          rtol=1e-6, atol=1e-6)


# -- registry ----------------------------------------------------------------------------------

def test_build_strategy_names() -> None:
    assert STRATEGIES.names() == sorted(["fedavg", "fedumm", "fedprox", "fedavgm", "fedexp",
                                         "fedadam", "fedyogi", "fedadagrad", "scaffold"])
    for name in STRATEGIES:
        s = build_strategy(StrategyConfig(name=name), num_clients=4, seed=0, groups=REF)
        assert type(s) is STRATEGIES.get(name) and s.name == name
    for baseline in ("centralized", "local"):  # run modes, not strategies
        with pytest.raises(ValueError, match="unknown strategy"):
            build_strategy(StrategyConfig(name=baseline), 4, 0, groups=REF)
    with pytest.raises(ValueError, match="fedavg.*scaffold"):
        build_strategy(StrategyConfig(name="fedsgd"), 4, 0, groups=REF)


# -- sampling ----------------------------------------------------------------------------------

def test_sampling_counts() -> None:
    def count(fraction: float, min_clients: int, n: int = 10) -> int:
        cfg = StrategyConfig(fraction=fraction, min_clients=min_clients)
        return len(FedAvg(cfg, n, seed=0, groups=REF).sample_clients(0))

    assert count(0.3, 1) == 3  # 0.3 * 10 = 3.0000000000000004 must not become 4
    assert count(0.25, 1) == 3  # ceil(2.5)
    assert count(0.1, 5) == 5  # min_clients wins
    assert count(0.1, 20) == 10  # capped at N
    assert FedAvg(StrategyConfig(fraction=1.0), 6, seed=3).sample_clients(7) == list(range(6))


def test_sampling_reproducible_by_seed_and_round() -> None:
    cfg = StrategyConfig(fraction=0.3)
    a, b = FedAvg(cfg, 10, seed=5, groups=REF), FedProx(cfg, 10, seed=5, groups=REF)
    picks = [a.sample_clients(r) for r in range(8)]
    # A fresh strategy asked in another order (as after a resume) gives the same clients.
    assert [b.sample_clients(r) for r in reversed(range(8))][::-1] == picks
    for p in picks:
        assert p == sorted(set(p)) and len(p) == 3 and all(0 <= i < 10 for i in p)
    assert len({tuple(p) for p in picks}) > 1  # rounds differ
    assert FedAvg(cfg, 10, seed=6, groups=REF).sample_clients(0) != picks[0] or \
        FedAvg(cfg, 10, seed=6, groups=REF).sample_clients(1) != picks[1]


# -- FedAvg ------------------------------------------------------------------------------------

def test_fedavg_per_group_weights() -> None:
    glob = {V: t(0.0, 0.0), L: t(0.0, 0.0), G: t(0.0, 0.0), A: t(5.0, 5.0)}
    und_client = upd(0, {V: t(1.0, 2.0), L: t(1.0, 1.0)}, und=10)
    # generation-only: it sends vision tensors too, but its vision weight is 0 -> left out
    gen_client = upd(1, {V: t(100.0, 100.0), L: t(5.0, 5.0), G: t(4.0, 8.0)}, gen=30)
    assert FedAvg(StrategyConfig(), 2, 0, groups=REF).client_weight(gen_client, "vision") == 0.0
    new = FedAvg(StrategyConfig(), 2, 0, groups=REF).aggregate(0, glob, [und_client, gen_client])
    assert torch.equal(new[V], t(1.0, 2.0))
    assert torch.equal(new[L], t(4.0, 4.0))  # (10 * 1 + 30 * 5) / 40
    assert torch.equal(new[G], t(4.0, 8.0))
    assert new[A] is glob[A]  # nobody trained the alignment tokens: unchanged
    assert list(new) == list(glob)


@pytest.mark.parametrize("strategy", [FedAvg, FedUMM])
def test_text_only_clients_give_the_image_encoder_no_weight(strategy) -> None:
    glob = {V: t(0.0, 0.0), L: t(0.0, 0.0)}
    q = {UNDERSTANDING: 0.5}
    images = upd(0, {V: t(2.0, 4.0), L: t(1.0, 1.0)}, und=10, quality=q)
    # understanding samples without their images (a text-only client): the vision adapters
    # see only the placeholder, so they do not count for the vision group
    text = upd(1, {V: t(0.0, 0.0), L: t(3.0, 3.0)}, und=30, und_images=0, quality=q)
    s = strategy(StrategyConfig(), 2, 0, groups=REF)
    assert s.client_weight(text, "vision") == 0.0 and s.client_weight(text, "language") > 0
    new = s.aggregate(0, glob, [images, text])
    assert torch.equal(new[V], t(2.0, 4.0))  # not diluted towards the text-only client's zeros
    assert close(new[L], 2.5, 2.5)  # (10 * 1 + 30 * 3) / 40


def test_fedavg_one_client_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    glob = {k: torch.randn(2, 3, generator=g) for k in (V, L, G, A)}
    mine = {k: torch.randn(2, 3, generator=g) for k in (V, L, G, A)}
    s = FedAvg(StrategyConfig(), 1, 0, groups=REF)
    new = s.aggregate(0, glob, [upd(0, mine, und=3, gen=4)])
    assert all(torch.equal(new[k], mine[k]) for k in mine)


def test_layout_mismatch_is_an_error() -> None:
    glob = {V: t(0.0), "base_model.model.aligner.fc1.lora_A.weight": t(0.0)}
    s = FedAvg(StrategyConfig(), 1, 0, groups=REF)
    with pytest.raises(ValueError, match="1 of the 2"):
        s.aggregate(0, glob, [upd(0, {V: t(1.0)}, und=1)])
    with pytest.raises(ValueError, match="unknown"):
        s.aggregate(0, {V: t(0.0)}, [upd(0, {L: t(1.0)}, und=1)])
    with pytest.raises(ValueError, match="adapter groups"):  # built without the layout
        FedAvg(StrategyConfig(), 1, 0).aggregate(0, {V: t(0.0)}, [upd(0, {V: t(1.0)}, und=1)])


# -- FedUMM ------------------------------------------------------------------------------------

def test_fedumm_quality_weights_by_hand() -> None:
    s = FedUMM(StrategyConfig(name="fedumm"), 2, 0, groups=REF)
    glob = {L: t(0.0, 0.0)}
    a = upd(0, {L: t(0.0, 2.0)}, und=10, quality={UNDERSTANDING: 0.9})
    b = upd(1, {L: t(4.0, 4.0)}, und=30, quality={UNDERSTANDING: 0.3})
    assert s.client_weight(a, "language") == pytest.approx(9.0)
    assert s.client_weight(b, "language") == pytest.approx(9.0)
    new = s.aggregate(0, glob, [a, b])
    assert close(new[L], 2.0, 3.0)  # weights 9/18, 9/18 (FedAvg would give 3.0, 3.5)
    # a group fed by both modalities sums n_m * q_m; a missing quality counts as 0
    c = upd(2, {}, und=10, gen=20, quality={UNDERSTANDING: 0.5, GENERATION: 1.0})
    assert s.client_weight(c, "language") == pytest.approx(25.0)
    assert s.client_weight(upd(3, {}, und=10), "vision") == 0.0
    with pytest.raises(ValueError, match="quality"):
        s.client_weight(upd(4, {}, und=1, quality={UNDERSTANDING: 1.5}), "vision")


def test_fedumm_all_zero_quality_falls_back_to_fedavg() -> None:
    s = FedUMM(StrategyConfig(name="fedumm"), 2, 0, groups=REF)
    glob = {L: t(0.0, 0.0), V: t(1.0, 1.0)}
    a = upd(0, {L: t(0.0, 2.0), V: t(3.0, 3.0)}, und=10, quality={UNDERSTANDING: 0.0})
    b = upd(1, {L: t(4.0, 4.0), V: t(7.0, 7.0)}, und=30)
    new = s.aggregate(0, glob, [a, b])
    assert close(new[L], 3.0, 3.5)  # (10 * 0 + 30 * 4) / 40, (10 * 2 + 30 * 4) / 40
    assert close(new[V], 6.0, 6.0)


# -- FedProx -----------------------------------------------------------------------------------

def test_fedprox_config() -> None:
    assert FedProx(StrategyConfig(mu=0.25), 3, 0, groups=REF).client_config(0) == {"prox_mu": 0.25}
    assert FedAvg(StrategyConfig(mu=0.25), 3, 0, groups=REF).client_config(0) == {}
    glob = {L: t(0.0, 0.0)}
    ups = [upd(0, {L: t(1.0, 3.0)}, und=1), upd(1, {L: t(3.0, 1.0)}, und=3)]
    prox = FedProx(StrategyConfig(mu=0.25), 2, 0, groups=REF).aggregate(0, glob, ups)
    avg = FedAvg(StrategyConfig(), 2, 0, groups=REF).aggregate(0, glob, ups)
    assert torch.equal(prox[L], avg[L])


# -- FedOpt family: two rounds by hand ---------------------------------------------------------

def two_rounds(strategy, x0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor):
    """Round 1 moves the client to x0 + d1, round 2 to x1 + d2 (pseudo-gradients d1, d2)."""
    x1 = strategy.aggregate(0, {L: x0}, [upd(0, {L: x0 + d1}, und=10)])[L]
    x2 = strategy.aggregate(1, {L: x1}, [upd(0, {L: x1 + d2}, und=10)])[L]
    return x1, x2


def test_fedavgm_by_hand() -> None:
    s = FedAvgM(StrategyConfig(momentum=0.5, server_lr=2.0), 1, 0, groups=REF)
    x1, x2 = two_rounds(s, t(1.0, -1.0), t(1.0, 1.0), t(0.0, 2.0))
    assert close(x1, 3.0, 1.0)  # m = (1, 1); x = (1, -1) + 2 m
    assert close(x2, 4.0, 6.0)  # m = 0.5 (1, 1) + (0, 2) = (0.5, 2.5); x = (3, 1) + 2 m
    assert close(s.buffers["m"][L], 0.5, 2.5)


def test_fedexp_by_hand() -> None:
    """FedExP's step size: max(1, sum p_k |d_k|^2 / (2 (|mean d|^2 + eps)))."""
    from fedumm.fl.strategies import FedExP

    s = FedExP(StrategyConfig(tau=0.5), 2, 0, groups=REF)
    # two clients of equal weight that disagree: d = (2, 0) and (0, 2); mean (1, 1), |mean|^2 2
    # sum p |d|^2 = 4, so eta = 4 / (2 (2 + 0.5)) = 0.8 -> 1: FedAvg
    x = s.aggregate(0, {L: t(0.0, 0.0)}, [upd(0, {L: t(2.0, 0.0)}, und=5),
                                          upd(1, {L: t(0.0, 2.0)}, und=5)])[L]
    assert close(x, 1.0, 1.0) and s.round_record() == {"server_lr": {"language": 1.0}}
    # opposed clients: d = (4, 1) and (-4, 1), mean (0, 1), |mean|^2 1; sum p |d|^2 = 17
    # eta = 17 / (2 (1 + 0.5)) = 17 / 3; weights 1:1 from the sample counts
    x = s.aggregate(1, {L: t(1.0, 1.0)}, [upd(0, {L: t(5.0, 2.0)}, und=5),
                                          upd(1, {L: t(-3.0, 2.0)}, und=5)])[L]
    assert close(x, 1.0, 1.0 + 17.0 / 3.0)
    assert s.round_record()["server_lr"]["language"] == pytest.approx(17 / 3, abs=1e-4)
    assert not s.keeps_client_mean  # refused with exact aggregation's folding


ADAPTIVE = StrategyConfig(beta1=0.5, beta2=0.75, tau=1.0, server_lr=1.0)


def test_fedadam_by_hand() -> None:
    x1, x2 = two_rounds(FedAdam(ADAPTIVE, 1, 0, groups=REF), t(0.0, 0.0), t(2.0, -4.0), t(0.0, 4.0))
    # m = 0.5 d1 = (1, -2); v = 0.25 d1^2 = (1, 4) (v starts at 0); x1 = m / (sqrt(v) + 1)
    assert close(x1, 0.5, -2.0 / 3.0)
    # m = 0.5 (1, -2) + 0.5 (0, 4) = (0.5, 1); v = 0.75 (1, 4) + 0.25 (0, 16) = (0.75, 7)
    assert close(x2, 0.5 + 0.5 / (math.sqrt(0.75) + 1), -2 / 3 + 1 / (math.sqrt(7) + 1))


def test_fedyogi_by_hand() -> None:
    s = FedYogi(ADAPTIVE, 1, 0, groups=REF)
    x1, x2 = two_rounds(s, t(0.0, 0.0), t(2.0, -4.0), t(0.0, 4.0))
    # v = 0 - 0.25 d1^2 sign(0 - d1^2) = (1, 4): the first step equals FedAdam's
    assert close(x1, 0.5, -2.0 / 3.0)
    # v = (1, 4) - 0.25 (0, 16) sign((1, 4) - (0, 16)) = (1 - 0, 4 + 4) = (1, 8)
    assert close(s.buffers["v"][L], 1.0, 8.0)
    assert close(x2, 0.5 + 0.5 / 2.0, -2 / 3 + 1 / (math.sqrt(8) + 1))


def test_fedadagrad_by_hand() -> None:
    s = FedAdagrad(ADAPTIVE, 1, 0, groups=REF)
    x1, x2 = two_rounds(s, t(0.0, 0.0), t(2.0, -4.0), t(0.0, 4.0))
    # m = (1, -2); v = 0 + d1^2 = (4, 16); x1 = (1 / 3, -2 / 5)
    assert close(x1, 1 / 3, -0.4)
    # m = (0.5, 1); v = (4, 32)
    assert close(s.buffers["v"][L], 4.0, 32.0)
    assert close(x2, 1 / 3 + 0.5 / 3, -0.4 + 1 / (math.sqrt(32) + 1))


def test_fedopt_leaves_untrained_groups_and_their_buffers_alone() -> None:
    s = FedAdam(ADAPTIVE, 1, 0, groups=REF)
    glob = {L: t(0.0, 0.0), G: t(1.0, 2.0)}
    new = s.aggregate(0, glob, [upd(0, {L: t(2.0, -4.0), G: t(9.0, 9.0)}, und=10)])
    assert new[G] is glob[G]  # the generation head has no understanding samples: weight 0
    assert set(s.buffers["m"]) == {L}


# -- SCAFFOLD ----------------------------------------------------------------------------------

def test_scaffold_server_and_control_update_by_hand() -> None:
    s = Scaffold(StrategyConfig(name="scaffold", server_lr=0.5), num_clients=4, seed=0, groups=REF)
    glob = {V: t(1.0, 1.0), L: t(0.0, 0.0)}
    with pytest.raises(RuntimeError, match="init_state"):
        s.client_config(0)
    s.init_state(glob)
    c0 = s.client_config(0)["server_control"]
    assert torch.equal(c0[V], t(0.0, 0.0)) and torch.equal(c0[L], t(0.0, 0.0))
    ups = [upd(0, {L: t(4.0, 0.0)}, und=10, control_delta={L: t(1.0, 2.0)}),
           upd(1, {L: t(0.0, 4.0)}, und=30, control_delta={L: t(3.0, -2.0)})]
    new = s.aggregate(0, glob, ups)
    # weighted mean of y_k - x = (1, 3); x = 0 + 0.5 (1, 3)
    assert close(new[L], 0.5, 1.5)
    assert new[V] is glob[V]
    # c = 0 + |S|/N * mean(delta c) = 2/4 * (2, 0)
    c1 = s.client_config(1)["server_control"]
    assert close(c1[L], 1.0, 0.0) and close(c1[V], 0.0, 0.0)
    s.aggregate(1, new, [upd(2, {L: t(0.0, 0.0)}, und=1, control_delta={L: t(2.0, 2.0)})])
    assert close(s.client_config(2)["server_control"][L], 1.5, 0.5)  # (1, 0) + 1/4 (2, 2)
    c1[L] += 100.0  # the config is a copy: a client cannot change the server's c
    assert close(s.control[L], 1.5, 0.5)
    with pytest.raises(ValueError, match="control_delta"):
        s.aggregate(2, new, [upd(0, {L: t(0.0, 0.0)}, und=1)])


def test_scaffold_client_control_update_by_hand() -> None:
    # c_i+ = (sum of K gradients) / K = (4, -6) / 4; delta = c_i+ - c_i
    new, delta = mean_gradient_control(c_local={L: t(1.0, 0.0)}, grad_sum={L: t(4.0, -6.0)},
                                       num_steps=4)
    assert close(new[L], 1.0, -1.5)
    assert close(delta[L], 0.0, -1.5)
    with pytest.raises(ValueError, match="num_steps >= 1"):
        mean_gradient_control({L: t(0.0)}, {L: t(0.0)}, 0)


def test_scaffold_client_update_equals_option_ii_under_plain_sgd(tiny_overrides) -> None:
    """With plain SGD (no clipping, no weight decay) the mean local gradient is the paper's
    option II, ``c_i - c + (x - y) / (K eta)``; under AdamW only the former is a gradient."""
    from fedumm.config import load_config
    from fedumm.eval.model_eval import heldout_quality
    from fedumm.fl.client import ClientTrainer
    from fedumm.runtime.experiment import build_adapters, client_datasets, load_backbone

    cfg = load_config(None, [*tiny_overrides, "train.optimizer=sgd", "train.grad_clip=0",
                             "train.lr=0.05", "train.max_steps=3"])
    backbone = load_backbone(cfg)
    adapters = build_adapters(cfg, backbone)
    clients, _ = client_datasets(cfg, backbone)
    x = {k: v.clone() for k, v in adapters.state().items()}
    g = torch.Generator().manual_seed(0)
    c = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in x.items()}
    c_i = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in x.items()}
    trainer = ClientTrainer(adapters, cfg.train, cfg.local_epochs, cfg.seed, heldout_quality)
    upd, state = trainer.train(clients[0], x, 0, [ScaffoldCorrection(c)], {"control": c_i})
    y, k_steps = upd.tensors, upd.num_steps
    assert k_steps == 3 and y
    for key in y:
        option_ii = c_i[key] - c[key] + (x[key] - y[key]) / (k_steps * cfg.train.lr)
        torch.testing.assert_close(state["control"][key], option_ii, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(upd.extra["control_delta"][key], option_ii - c_i[key],
                                   rtol=1e-4, atol=1e-5)


# -- properties of every strategy --------------------------------------------------------------

def make_round(seed: int) -> tuple[dict, list[ClientUpdate]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {V: (2, 2), L: (2, 2), G: (3,), A: (2, 2)}
    dtypes = {V: torch.float32, L: torch.float32, G: torch.bfloat16, A: torch.float32}

    def rand(k):
        return torch.randn(shapes[k], generator=g).to(dtypes[k])

    glob = {k: rand(k) for k in shapes}
    ups = [
        upd(0, {k: rand(k) for k in (V, L, A)}, und=10, quality={UNDERSTANDING: 0.8},
            control_delta={k: rand(k) for k in (V, L, A)}),
        upd(1, {k: rand(k) for k in (L, G)}, gen=20, quality={GENERATION: 0.5},
            control_delta={k: rand(k) for k in (L, G)}),
        upd(2, {k: rand(k) for k in (V, L, G, A)}, und=5, gen=5,
            quality={UNDERSTANDING: 0.2, GENERATION: 0.9},
            control_delta={k: rand(k) for k in (V, L, G, A)}),
    ]
    return glob, ups


def clone_update(u: ClientUpdate) -> ClientUpdate:
    return upd(u.client_id, {k: v.clone() for k, v in u.tensors.items()},
               quality=dict(u.quality), **{"und": u.num_samples[UNDERSTANDING],
                                           "gen": u.num_samples[GENERATION]},
               control_delta={k: v.clone() for k, v in u.extra["control_delta"].items()})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_aggregate_keeps_layout_and_inputs(name: str) -> None:
    s = build_strategy(StrategyConfig(name=name), num_clients=5, seed=0, groups=REF)
    glob, ups = make_round(0)
    glob0 = {k: v.clone() for k, v in glob.items()}
    ups0 = [clone_update(u) for u in ups]
    for rnd in range(2):
        new = s.aggregate(rnd, glob, ups)
        assert list(new) == list(glob)
        for k in glob:
            assert new[k].dtype == glob[k].dtype and new[k].shape == glob[k].shape
            assert torch.isfinite(new[k].float()).all()
        for k in glob:
            assert torch.equal(glob[k], glob0[k])
        for u, u0 in zip(ups, ups0, strict=True):
            assert all(torch.equal(u.tensors[k], u0.tensors[k]) for k in u.tensors)
            d, d0 = u.extra["control_delta"], u0.extra["control_delta"]
            assert all(torch.equal(d[k], d0[k]) for k in d)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_dict_round_trip(name: str) -> None:
    cfg = StrategyConfig(name=name)
    original = build_strategy(cfg, num_clients=5, seed=0, groups=REF)
    glob, ups = make_round(1)
    mid = original.aggregate(0, glob, ups)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    buf.seek(0)
    restored = build_strategy(cfg, num_clients=5, seed=0, groups=REF)
    restored.load_state_dict(torch.load(buf))
    _, ups2 = make_round(2)
    a, b = original.aggregate(1, mid, ups2), restored.aggregate(1, mid, ups2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert original.client_config(2).keys() == restored.client_config(2).keys()
    other = "fedavg" if name != "fedavg" else "fedadam"
    with pytest.raises(ValueError, match="state_dict"):
        build_strategy(StrategyConfig(name=other), 5, 0).load_state_dict(original.state_dict())

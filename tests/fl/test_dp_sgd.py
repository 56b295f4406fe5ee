"""Sample-level DP-SGD (fedumm.fl.dp_sgd): against plain training, against Opacus' own
hook-based per-sample gradients and accountant, across rounds, seeded, wrapped after
placement."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from fedumm.config import ConfigError, load_config
from fedumm.eval.model_eval import heldout_quality
from fedumm.fl.client import ClientTrainer
from fedumm.fl.dp_sgd import (
    ACCOUNTANT,
    DP_DELTA,
    DP_EPSILON,
    DP_NOISE,
    ClientPlan,
    PrivateRound,
    SampleDP,
    noise_for_target,
    poisson_batches,
)

# -- on the reference backbone, through the trainer ---------------------------------------------


@pytest.fixture(scope="module")
def tiny(micro_checkpoint):
    """The micro reference backbone's adapters, a client, and its config (plain SGD, no
    clipping, two steps of batch 8 a round)."""
    from fedumm.models.reference.micro import MICRO_IMAGE_SIZE
    from fedumm.runtime.experiment import build_adapters, client_datasets, load_backbone

    cfg = load_config(None, [
        f"backbone.path={micro_checkpoint}", f"data.image_size={MICRO_IMAGE_SIZE}",
        "data.train_scenes=40", "data.val_scenes=6", "clients=2", "rounds=3",
        "train.max_steps=2", "train.batch_size=8", "partition.alpha=1.0", "train.threads=1",
        "train.optimizer=sgd", "train.grad_clip=0", "train.lr=0.5", "train.val_fraction=0"])
    backbone = load_backbone(cfg)
    adapters = build_adapters(cfg, backbone)
    clients, _ = client_datasets(cfg, backbone)
    start = {k: v.clone() for k, v in adapters.state().items()}
    return adapters, clients[0], cfg, start


def _trainer(tiny, dp: SampleDP | None) -> ClientTrainer:
    adapters, _, cfg, _ = tiny
    return ClientTrainer(adapters, cfg.train, cfg.local_epochs, cfg.seed, heldout_quality, dp=dp)


def test_zero_noise_and_no_clip_is_plain_training(tiny):
    """Same batches (both modalities in each, prompt dropout on): the DP update, per-sample
    gradients summed and divided by the batch size, is the plain one."""
    _, client, _, start = tiny
    und = [i for i, s in enumerate(client.train) if s.task == "understanding"]
    gen = [i for i, s in enumerate(client.train) if s.task == "generation"]
    fixed = [np.array(und[:4] + gen[:4]), np.array(gen[4:8] + und[4:8])]
    adapters, _, cfg, _ = tiny
    plain = _trainer(tiny, None)
    # train.grad_clip does not clip again under DP: the per-sample clip replaces it
    private = ClientTrainer(adapters, replace(cfg.train, grad_clip=1e-4), cfg.local_epochs,
                            cfg.seed, heldout_quality, dp=SampleDP(0.0, math.inf))
    for t in (plain, private):
        t._batches = lambda client, rng: fixed
    ref, _ = plain.train(client, start, 0)
    got, state = private.train(client, start, 0)
    moved = max(float((ref.tensors[k] - start[k]).abs().max()) for k in ref.tensors)
    assert moved > 1e-2  # training did something
    for k in ref.tensors:
        torch.testing.assert_close(got.tensors[k], ref.tensors[k], rtol=0, atol=1e-6)
    assert got.num_steps == 2
    assert state[ACCOUNTANT]["history"] == [(0.0, 8 / len(client.train), 2)]
    assert got.metrics[DP_EPSILON] == math.inf and "und_loss" not in got.metrics


def test_epsilon_accumulates_over_rounds_as_opacus_accounts(tiny):
    _, client, cfg, start = tiny
    trainer = _trainer(tiny, SampleDP(1.1, 0.5))
    n, b = len(client.train), cfg.train.batch_size
    state: dict = {}
    eps = []
    for rnd in range(3):
        upd, state = trainer.train(client, start, rnd, client_state=state)
        eps.append(upd.metrics[DP_EPSILON])
        assert upd.metrics[DP_DELTA] == pytest.approx(1 / n)
        assert upd.metrics[DP_NOISE] == 1.1
    hand = RDPAccountant()
    for _ in range(3 * cfg.train.max_steps):
        hand.step(noise_multiplier=1.1, sample_rate=b / n)
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(hand.get_epsilon(delta=1 / n), rel=1e-12)


def test_same_seed_same_numbers(tiny):
    _, client, _, start = tiny
    dp = SampleDP(1.0, 0.5)
    a, sa = _trainer(tiny, dp).train(client, start, 1)
    b, sb = _trainer(tiny, dp).train(client, start, 1)
    c, _ = _trainer(tiny, dp).train(client, start, 2)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.metrics == b.metrics and sa == sb
    assert not all(torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_target_epsilon_is_reached_within_it():
    sigma = noise_for_target(2.0, 1e-3, 0.05, 300)
    acc = RDPAccountant()
    acc.history = [(sigma, 0.05, 300)]
    assert 1.95 <= acc.get_epsilon(delta=1e-3) <= 2.0
    # the plan spends it over the client's most steps in the run: rounds x steps a round
    plan = SampleDP(1.0, 1.0, target_epsilon=2.0, rounds=5).plan(100, 10, 3, max_steps=6)
    assert plan.noise_multiplier == noise_for_target(2.0, 1 / 100, 0.1, 5 * 6)
    assert plan.delta == 1 / 100 and plan.sample_rate == 0.1 and plan.expected_batch_size == 10
    with pytest.raises(ValueError, match="target_epsilon=1e-06 cannot be reached"):
        noise_for_target(1e-6, 1e-9, 1.0, 10_000)


def test_poisson_batches():
    rng = np.random.default_rng(0)
    epochs = [poisson_batches(50, 10, rng) for _ in range(200)]
    assert all(len(e) == 5 for e in epochs)  # ceil(n / batch_size) steps an epoch
    sizes = np.array([len(b) for e in epochs for b in e])
    assert abs(sizes.mean() - 10) < 0.3 and sizes.std() > 1  # Binomial(50, 0.2)
    assert all(np.all(np.diff(b) > 0) and b.max(initial=0) < 50 for e in epochs for b in e)


def test_config_refusals_and_settings():
    cfg = load_config(None, ["privacy.sample.max_grad_norm=1.0", "privacy.delta=1e-5",
                             "privacy.sample.target_epsilon=3", "rounds=7"])
    assert SampleDP.from_config(cfg.privacy, cfg.rounds) == SampleDP(1.0, 1.0, 3.0, 1e-5, 7)
    assert SampleDP.from_config(load_config(None, []).privacy, 5) is None
    with pytest.raises(ConfigError, match="answer_calibration=fedrs calibrates"):
        load_config(None, ["privacy.sample.max_grad_norm=1.0", "train.answer_calibration=fedrs"])
    with pytest.raises(ConfigError, match="max_grad_norm"):
        load_config(None, ["privacy.sample.max_grad_norm=inf"])


# -- against Opacus' hook-based per-sample gradients ---------------------------------------------

def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)


@pytest.mark.parametrize("noise", [0.0, 1.3])
@pytest.mark.filterwarnings("ignore:Full backward hook")  # the input needs no gradient
def test_clipped_noised_step_equals_opacus_grad_sample_module(noise):
    """Per-sample gradients by micro-batching, clipped to a norm most of them exceed, noised,
    equal Opacus' GradSampleModule (hooks) + DPOptimizer with the same generator state."""
    x, y = _data()
    ours, oracle = _net(), _net()
    plan = ClientPlan(noise, 0.05, sample_rate=0.5, expected_batch_size=4, delta=1e-5)
    opt = torch.optim.SGD(ours.parameters(), lr=0.7)
    private = PrivateRound(plan, opt, list(ours.parameters()), {}, (0, 1, 2), ours)

    def loss_fn(idx, drop):  # the micro-batch [i]'s loss
        return torch.nn.functional.mse_loss(ours(x[idx]), y[idx]), {}

    gen = torch.Generator().set_state(private.generator.get_state())
    private.per_sample_grads(list(range(6)), None, loss_fn)
    per_sample = torch.cat([p.grad_sample.flatten(1) for p in ours.parameters()], 1)
    assert (per_sample.norm(dim=1) > 0.05).sum() >= 4  # the clip bites
    private.privatize()
    opt.step()

    gsm = GradSampleModule(oracle, loss_reduction="sum")  # on its device before it is wrapped
    dpo = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.7), noise_multiplier=noise,
                      max_grad_norm=0.05, expected_batch_size=4, generator=gen)
    dpo.zero_grad()
    # per-sample losses summed (reduction "sum"): grad_sample is each sample's own gradient
    torch.nn.functional.mse_loss(gsm(x), y, reduction="none").mean(dim=1).sum().backward()
    dpo.step()
    for a, b in zip(ours.parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hook_terms_and_corrections_act_after_the_noise():
    """A data-free term's gradient is added to the privatised one, not clipped with it."""
    x, y = _data()
    net = _net()
    plan = ClientPlan(0.0, 1e-4, sample_rate=0.5, expected_batch_size=6, delta=1e-5)
    params = list(net.parameters())
    private = PrivateRound(plan, torch.optim.SGD(params, lr=1.0), params, {}, (0, 0, 0), net)
    private.per_sample_grads(list(range(6)), None,
                             lambda s, d: (torch.nn.functional.mse_loss(net(x[s]), y[s]), {}))
    term = sum((p ** 2).sum() for p in params)
    term.backward()
    private.privatize()
    for p in params:  # clipped data part at most 1e-4 in norm; the rest is the term's 2p
        assert (p.grad - 2 * p.detach()).norm() <= 1e-4 * (1 + 1e-5)


def test_an_empty_poisson_batch_is_noise_alone_and_counted():
    net = _net()
    plan = ClientPlan(2.0, 1.0, sample_rate=0.1, expected_batch_size=3, delta=1e-5)
    params = list(net.parameters())
    private = PrivateRound(plan, torch.optim.SGD(params, lr=1.0), params, {}, (0, 0, 0), net)
    private.per_sample_grads([], None, None)  # no sample: no loss
    private.privatize()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    state: dict = {}
    assert private.finish(state)[DP_EPSILON] > 0
    assert state[ACCOUNTANT]["history"] == [(2.0, 0.1, 1)]
    assert all(p.grad_sample is None for p in params)


def test_the_noise_is_seeded_by_seed_round_and_client():
    def noise(key):
        net = _net()
        params = list(net.parameters())
        plan = ClientPlan(1.0, 1.0, sample_rate=0.5, expected_batch_size=2, delta=1e-5)
        private = PrivateRound(plan, torch.optim.SGD(params, lr=1.0), params, {}, key, net)
        private.per_sample_grads([], None, None)
        private.privatize()
        return torch.cat([p.grad.flatten() for p in params])

    same = noise((0, 3, 1))
    assert torch.equal(same, noise((0, 3, 1)))
    assert all(not torch.equal(same, noise(k)) for k in [(1, 3, 1), (0, 4, 1), (0, 3, 2)])


def test_wrapping_before_the_model_moves_is_an_error():
    """Opacus issue 820: a model moved after its optimizer was wrapped trains tensors the
    optimizer does not hold. A step after such a move refuses; wrapped after it, it trains."""
    net = _net()
    params = list(net.parameters())
    plan = ClientPlan(1.0, 1.0, sample_rate=0.5, expected_batch_size=2, delta=1e-5)
    private = PrivateRound(plan, torch.optim.SGD(params, lr=1.0), params, {}, (0, 0, 0), net)
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        net.to(torch.float64)  # new parameter objects, as a move to another device makes
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Opacus issue 820"):
        private.per_sample_grads([0, 1], None, lambda s, d: (net(x[s]).sum(), {}))
    params = list(net.parameters())
    private = PrivateRound(plan, torch.optim.SGD(params, lr=1.0), params, {}, (0, 0, 0), net)
    private.per_sample_grads([0, 1], None, lambda s, d: (net(x[s]).sum(), {}))
    assert all(p.grad_sample.shape == (2, *p.shape) and p.grad_sample.device == p.device
               for p in params)
    with pytest.raises(RuntimeError, match="Opacus issue 820"):  # not the model's tensors
        PrivateRound(plan, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]),
                     [torch.nn.Parameter(torch.ones(1))], {}, (0, 0, 0), net)


@pytest.mark.parametrize("kind", ["janus", "blip3o"])
def test_every_backbone_gets_per_sample_gradients_of_both_losses(kind):
    """The tiny presets of the real architectures, a batch of both modalities: zero noise and
    no clip give plain training's update. BLIP3o's flow-matching loss draws its noise and
    times per call, so one sample at a time draws other ones: its generation-trained tensors
    only move; its language tensors (trained by understanding) agree."""
    from fedumm.runtime.experiment import build_adapters, client_datasets, load_backbone

    cfg = load_config(None, [
        f"backbone.kind={kind}", "backbone.preset=tiny", "backbone.device=cpu",
        "data.image_size=48", "data.train_scenes=10", "data.val_scenes=4", "clients=1",
        "train.max_steps=1", "train.batch_size=4", "train.threads=1", "train.val_fraction=0",
        "train.optimizer=sgd", "train.grad_clip=0", "train.lr=1.0"])
    backbone = load_backbone(cfg)
    adapters = build_adapters(cfg, backbone)
    client = client_datasets(cfg, backbone)[0][0]
    start = {k: v.clone() for k, v in adapters.state().items()}
    und = [i for i, s in enumerate(client.train) if s.task == "understanding"]
    gen = [i for i, s in enumerate(client.train) if s.task == "generation"]
    trainers = [ClientTrainer(adapters, cfg.train, 1, 0, heldout_quality, dp=dp)
                for dp in (None, SampleDP(0.0, math.inf))]
    for t in trainers:
        t._batches = lambda client, rng: [np.array(und[:2] + gen[:2])]
    plain, private = (t.train(client, start, 0)[0].tensors for t in trainers)
    moved: dict[str, float] = {}  # per adapter group (LoRA's A stays at the first step)
    compared = 0
    for k in plain:
        group = adapters.group_of(k)
        moved[group] = max(moved.get(group, 0.0), float((private[k] - start[k]).abs().max()))
        if kind == "blip3o" and "generation" in adapters.layout.sample_keys(group):
            continue
        torch.testing.assert_close(private[k], plain[k], rtol=0, atol=1e-6)
        compared += 1
    assert compared > 0 and len(moved) >= 2 and min(moved.values()) > 0, moved

"""Client-level DP (fedumm.fl.client_dp) against Flower 1.42.0 on the same inputs:
``DifferentialPrivacyServerSideFixedClipping`` and ``...AdaptiveClipping`` wrapping Flower's
FedAvg (every client with the same ``num_examples``: Flower keeps FedAvg's example weights,
client-level DP in fedumm weighs clients equally), and the deprecated ``DPFedAvgAdaptive`` for
the adaptive clip's sequence (the current wrapper counts clipped updates where Andrew et al.
count unclipped ones; the last test pins that difference).

Flower sees each client's adapter *values* as a list of arrays over all adapter groups; ours
clips the same joint update. Skipped where Flower is not installed (``pip install
'.[oracles]'``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedumm.config import ClientDPConfig, StrategyConfig
from fedumm.fl.client_dp import ClientDP
from fedumm.fl.strategies import build_strategy
from fedumm.fl.updates import GENERATION, UNDERSTANDING, ClientUpdate
from fedumm.models.protocol import IMAGE_INPUTS
from fedumm.models.reference import REFERENCE_GROUPS as REF

flwr_common = pytest.importorskip("flwr.common")
flwr_strategy = pytest.importorskip("flwr.server.strategy")
flwr_dp = pytest.importorskip("flwr.supercore.differential_privacy")

# tensors of three adapter groups (vision, language A and B, generation)
KEYS = ["base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight",
        "base_model.model.language_model.layers.0.mlp.up_proj.lora_A.weight",
        "base_model.model.language_model.layers.0.mlp.up_proj.lora_B.weight",
        "base_model.model.gen_head.lora_B.weight"]
SHAPES = [(4, 6), (3, 5), (5, 3), (7,)]


def _inputs(seed: int, n: int, rounds: int = 1, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    prev = [rng.normal(size=s) for s in shapes]
    # spreads from well below to well above the clip norms used
    values = [[[p + rng.uniform(0.02, 0.6) * rng.normal(size=p.shape) for p in prev]
               for _ in range(n)] for _ in range(rounds)]
    return prev, values


def _state(arrays) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a, dtype=np.float64)) for k, a in
            zip(KEYS, arrays, strict=True)}


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def _ours(n: int, **dp) -> object:
    cfg = StrategyConfig()
    s = build_strategy(cfg, num_clients=n, seed=0, groups=REF)
    s.client_dp = ClientDP(ClientDPConfig(**dp), cfg, n, seed=0)
    return s


def _aggregate(s, rnd: int, prev, values) -> np.ndarray:
    ups = [ClientUpdate(i, _state(v), {UNDERSTANDING: 5, GENERATION: 5, IMAGE_INPUTS: 5})
           for i, v in enumerate(values)]
    out = s.aggregate(rnd, _state(prev), ups)
    return np.concatenate([out[k].numpy().ravel() for k in KEYS])


def _results(values):
    fit = flwr_common.FitRes(flwr_common.Status(flwr_common.Code.OK, ""),
                             flwr_common.ndarrays_to_parameters([]), 5, {})
    out = []
    for v in values:
        res = flwr_common.FitRes(fit.status,
                                 flwr_common.ndarrays_to_parameters([a.copy() for a in v]),
                                 5, {})  # the same num_examples for every client
        out.append((None, res))
    return out


def _flower(wrapper, prev, values) -> np.ndarray:
    wrapper.current_round_params = [p.copy() for p in prev]
    params, _ = wrapper.aggregate_fit(1, _results(values), [])
    return _flat(flwr_common.parameters_to_ndarrays(params))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "clip"), [(3, 0.5), (5, 1.0), (4, 10.0)])
def test_fixed_clipping_without_noise_matches_flower(seed, n, clip):
    prev, values = _inputs(seed, n)
    flower = flwr_strategy.DifferentialPrivacyServerSideFixedClipping(
        flwr_strategy.FedAvg(), noise_multiplier=0.0, clipping_norm=clip, num_sampled_clients=n)
    want = _flower(flower, prev, values[0])
    got = _aggregate(_ours(n, clip=clip, noise_multiplier=0.0), 0, prev, values[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_the_noise_std_matches_flowers_z_clip_over_m():
    n, z, clip = 4, 1.5, 0.5
    shapes = [(200, 250), (10, 10), (10, 10), (100,)]
    prev, values = _inputs(7, n, shapes=shapes)

    def flower(noise):
        np.random.seed(0)
        w = flwr_strategy.DifferentialPrivacyServerSideFixedClipping(
            flwr_strategy.FedAvg(), noise_multiplier=noise, clipping_norm=clip,
            num_sampled_clients=n)
        return _flower(w, prev, values[0])

    theirs = (flower(z) - flower(0.0)).std()
    ours = (_aggregate(_ours(n, clip=clip, noise_multiplier=z), 0, prev, values[0])
            - _aggregate(_ours(n, clip=clip, noise_multiplier=0.0), 0, prev, values[0])).std()
    want = flwr_dp.compute_stdv(z, clip, n)
    assert want == pytest.approx(z * clip / n)
    assert theirs == pytest.approx(want, rel=0.02)
    assert ours == pytest.approx(want, rel=0.02)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_adaptive_clip_sequence_matches_flowers_dpfedavg_adaptive(seed, target):
    n, rounds, lr, start = 5, 8, 0.5, 1.0
    prev, values = _inputs(seed, n, rounds)
    # deprecated in Flower, kept here for its paper-exact update
    old = flwr_strategy.DPFedAvgAdaptive(
        flwr_strategy.FedAvg(), num_sampled_clients=n, init_clip_norm=start,
        noise_multiplier=0.0, clip_norm_lr=lr, clip_norm_target_quantile=target)
    fractions = set()
    ours = _ours(n, clip=start, noise_multiplier=0.0, adaptive=True, target_quantile=target,
                 clip_lr=lr)
    for rnd in range(rounds):
        used = old.clip_norm
        results = _results(values[rnd])
        for (_, res), v in zip(results, values[rnd], strict=True):
            params = [a.copy() for a in v]
            clipped = flwr_dp.compute_adaptive_clip_model_update(params, prev, used)
            res.metrics["dpfedavg_norm_bit"] = not clipped  # as DPFedAvgNumPyClient sends
        # the aggregate of this round, clipped at the round's clip, is Flower's fixed clipping
        fixed = flwr_strategy.DifferentialPrivacyServerSideFixedClipping(
            flwr_strategy.FedAvg(), 0.0, used, n)
        want = _flower(fixed, prev, values[rnd])
        got = _aggregate(ours, rnd, prev, values[rnd])
        rec = ours.round_record()["client_dp"]
        assert rec["clip"] == pytest.approx(used, rel=1e-12)
        fractions.add(rec["clipped_fraction"])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        old._update_clip_norm(results)
        assert ours.client_dp.clip_norm == pytest.approx(old.clip_norm, rel=1e-12)
    assert len(fractions) > 1  # the bits differ from round to round


def test_flowers_server_side_adaptive_wrapper_counts_clipped_updates_instead():
    """Same inputs, one round: the aggregates agree (both clip at the initial clip), but
    Flower's next clip is the reciprocal step of Andrew et al.'s (ours) at target 0.5."""
    n, lr = 5, 0.2
    prev, values = _inputs(3, n)
    norms = sorted(float(np.sqrt(sum(((a - p) ** 2).sum() for a, p in zip(v, prev, strict=True))))
                   for v in values[0])
    start = (norms[1] + norms[2]) / 2  # 3 of 5 clipped
    flower = flwr_strategy.DifferentialPrivacyServerSideAdaptiveClipping(
        flwr_strategy.FedAvg(), noise_multiplier=0.0, num_sampled_clients=n,
        initial_clipping_norm=start, target_clipped_quantile=0.5, clip_norm_lr=lr)
    want = _flower(flower, prev, values[0])
    ours = _ours(n, clip=start, noise_multiplier=0.0, adaptive=True, target_quantile=0.5,
                 clip_lr=lr)
    got = _aggregate(ours, 0, prev, values[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    clipped = ours.round_record()["client_dp"]["clipped_fraction"]
    assert clipped == pytest.approx(0.6)
    assert flower.clipping_norm / start == pytest.approx(math.exp(-lr * (clipped - 0.5)))
    assert ours.client_dp.clip_norm / start == pytest.approx(start / flower.clipping_norm)

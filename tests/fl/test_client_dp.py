"""Client-level DP (fedumm.fl.client_dp) and its accountant (fedumm.fl.accounting): clipping
against hand-computed values, the noise's std, reproducibility and resumption, the accountant
against the Gaussian mechanism's closed form and dp-accounting's PLD accountant, the config's
refusals, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting import pld, rdp

from fedumm.config import ClientDPConfig, ConfigError, StrategyConfig, config_from_dict
from fedumm.fl import accounting
from fedumm.fl.accounting import ClientAccountant, client_level_epsilon, round_sample_rate
from fedumm.fl.client_dp import (
    ClientDP,
    adjusted_noise_multiplier,
    clip_update,
    next_clip,
    noise_std,
    privatize_client_update,
)
from fedumm.fl.strategies import build_strategy
from fedumm.fl.updates import GENERATION, UNDERSTANDING, ClientUpdate
from fedumm.models.protocol import IMAGE_INPUTS
from fedumm.models.reference import REFERENCE_GROUPS as REF

VA = "base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight"
LA = "base_model.model.language_model.layers.0.mlp.up_proj.lora_A.weight"
LB = "base_model.model.language_model.layers.0.mlp.up_proj.lora_B.weight"


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _upd(cid: int, tensors: dict, n: int = 10) -> ClientUpdate:
    return ClientUpdate(cid, tensors, {UNDERSTANDING: n, GENERATION: n, IMAGE_INPUTS: n})


def _strategy(name: str = "fedavg", clients: int = 4, seed: int = 0, **dp):
    s = build_strategy(StrategyConfig(name=name), num_clients=clients, seed=seed, groups=REF)
    s.client_dp = ClientDP(ClientDPConfig(**{"clip": 1.0, "noise_multiplier": 0.0, **dp}),
                           StrategyConfig(name=name), clients, seed)
    return s


# -- clipping ------------------------------------------------------------------------------------

def test_clip_scales_the_whole_update_to_the_clip_norm():
    # ||(3, 0, 4)|| = 5: clip 1 scales by 1/5; clip 10 leaves it
    out, norm = clip_update({"a": t(3.0, 0.0), "b": t(4.0)}, 1.0)
    assert norm == 5.0
    assert torch.allclose(out["a"], t(0.6, 0.0)) and torch.allclose(out["b"], t(0.8))
    out, _ = clip_update({"a": t(3.0, 0.0), "b": t(4.0)}, 10.0)
    assert torch.equal(out["a"], t(3.0, 0.0)) and torch.equal(out["b"], t(4.0))
    out, norm = clip_update({"a": t(0.0, 0.0)}, 1.0)  # a zero update stays zero
    assert norm == 0.0 and torch.equal(out["a"], t(0.0, 0.0))


def test_one_norm_over_all_groups_and_uniform_weights_in_the_strategy():
    prev = {VA: t(0.0, 0.0), LA: t(1.0), LB: t(0.0)}
    # client 0: vision update (3, 0), language (4, 0): norm 5 -> scaled by 1/5 in *both* groups
    # client 1: vision (0, 0.5), language (0, 0): norm 0.5, kept; 100x the samples, same weight
    ups = [_upd(0, {VA: t(3.0, 0.0), LA: t(5.0), LB: t(0.0)}),
           _upd(1, {VA: t(0.0, 0.5), LA: t(1.0), LB: t(0.0)}, n=1000)]
    s = _strategy(clients=2)
    new = s.aggregate(0, prev, ups)
    assert torch.allclose(new[VA], t((0.6 + 0.0) / 2, (0.0 + 0.5) / 2), atol=1e-12)
    assert torch.allclose(new[LA], t(1.0 + (0.8 + 0.0) / 2), atol=1e-12)
    rec = s.round_record()["client_dp"]
    assert rec["clip"] == 1.0 and rec["clipped_fraction"] == 0.5 and rec["clients"] == 2
    assert rec["noise_std"] == {"vision": 0.0, "language": 0.0}
    assert s.round_record() == {"client_dp": {}}  # cleared once read


def test_a_client_that_did_not_train_a_group_counts_only_where_it_trained():
    prev = {VA: t(0.0), LA: t(0.0), LB: t(0.0)}
    ups = [_upd(0, {VA: t(0.2), LA: t(0.1), LB: t(0.0)}),
           _upd(1, {LA: t(0.3), LB: t(0.0)})]  # no vision tensors
    s = _strategy(clients=2, noise_multiplier=1.0)
    s.aggregate(0, prev, ups)
    rec = s.round_record()["client_dp"]
    assert rec["noise_std"] == {"vision": 1.0, "language": 0.5}  # z S / m_group


def test_ffa_frozen_a_is_neither_clipped_nor_noised():
    prev = {LA: t(1.0, 2.0), LB: t(0.0)}
    s = _strategy(clients=1, noise_multiplier=1.0)
    s.frozen = lambda k: ".lora_A." in k
    new = s.aggregate(0, prev, [_upd(0, {LB: t(3.0)})])
    assert new[LA] is prev[LA]
    assert not torch.equal(new[LB], t(1.0))  # clipped to 1 then noised with std 1


# -- noise -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("z", "clip", "m"), [(1.0, 1.0, 4), (2.0, 0.5, 8), (0.7, 3.0, 3)])
def test_the_noise_on_the_mean_has_std_z_clip_over_m(z, clip, m):
    n = 200_000
    prev = {LA: torch.zeros(n), LB: torch.zeros(1)}
    ups = [_upd(i, {LA: torch.zeros(n), LB: torch.zeros(1)}) for i in range(m)]
    s = _strategy(clients=m, noise_multiplier=z, clip=clip)
    new = s.aggregate(3, prev, ups)
    want = noise_std(z, clip, m)
    assert want == pytest.approx(z * clip / m)
    assert float(new[LA].std()) == pytest.approx(want, rel=0.01)
    assert abs(float(new[LA].mean())) < 4 * want / math.sqrt(n)
    assert s.round_record()["client_dp"]["noise_std"]["language"] == pytest.approx(want)


def test_same_seed_and_round_same_noise_other_round_or_seed_other_noise():
    prev = {LA: torch.zeros(50), LB: torch.zeros(3)}
    ups = [_upd(i, {LA: torch.randn(50), LB: torch.randn(3)}) for i in range(3)]

    def run(seed, rnd):
        return _strategy(clients=3, seed=seed, noise_multiplier=1.0).aggregate(rnd, prev, ups)

    a, b = run(0, 1), run(0, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[LA], run(0, 2)[LA]) and not torch.equal(a[LA], run(1, 1)[LA])


def test_fedadam_steps_on_the_noised_mean():
    prev = {LA: torch.zeros(20), LB: torch.zeros(2)}
    ups = [_upd(i, {LA: torch.full((20,), 0.01), LB: torch.zeros(2)}) for i in range(2)]
    quiet = _strategy("fedadam", clients=2).aggregate(0, prev, ups)
    noisy = _strategy("fedadam", clients=2, noise_multiplier=5.0).aggregate(0, prev, ups)
    # noiseless: every entry moves the same way; noised, the signs differ
    assert bool((quiet[LA] > 0).all())
    assert bool((noisy[LA] < 0).any()) and bool((noisy[LA] > 0).any())


def test_keeps_the_adapters_dtype():
    prev = {LA: torch.zeros(4, dtype=torch.bfloat16), LB: torch.zeros(1, dtype=torch.bfloat16)}
    ups = [_upd(0, {LA: torch.ones(4, dtype=torch.bfloat16), LB: torch.ones(1,
                                                                          dtype=torch.bfloat16)})]
    new = _strategy(clients=1, noise_multiplier=1.0).aggregate(0, prev, ups)
    assert new[LA].dtype == torch.bfloat16 and new[LB].dtype == torch.bfloat16


# -- adaptive clipping -----------------------------------------------------------------------

def test_adjusted_noise_multiplier_and_the_geometric_clip_step_by_hand():
    assert adjusted_noise_multiplier(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    assert adjusted_noise_multiplier(0.0, 0.1) == 0.0
    with pytest.raises(ValueError, match="above z / 2"):
        adjusted_noise_multiplier(1.0, 0.5)
    assert next_clip(1.0, 0.5, 0.5, 0.2) == 1.0
    assert next_clip(2.0, 1.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.1))
    assert next_clip(2.0, 0.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1))


def test_adaptive_clip_moves_towards_the_quantile_and_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    prev = {LA: torch.zeros(30), LB: torch.zeros(2)}
    rounds = [[_upd(i, {LA: (i + 1) * torch.randn(30, generator=g) / 5,
                        LB: torch.randn(2, generator=g)}) for i in range(5)] for _ in range(6)]
    kw = dict(clients=5, adaptive=True, clip=0.1, noise_multiplier=0.5, count_noise=1.0)

    s = _strategy(**kw)
    whole, clips = [], []
    for rnd, ups in enumerate(rounds):
        whole.append(s.aggregate(rnd, prev, ups))
        clips.append(s.round_record()["client_dp"]["clip"])
    assert clips[-1] > clips[0]  # 0.1 is below every update's norm: the clip grows
    half = _strategy(**kw)
    for rnd in range(3):
        half.aggregate(rnd, prev, rounds[rnd])
    saved = half.state_dict()
    resumed = _strategy(**kw)
    resumed.load_state_dict(saved)
    for rnd in range(3, 6):
        got = resumed.aggregate(rnd, prev, rounds[rnd])
        assert all(torch.equal(got[k], whole[rnd][k]) for k in got)
    assert resumed.client_dp.epsilon() == s.client_dp.epsilon()
    assert s.client_dp.noise_multiplier == pytest.approx(adjusted_noise_multiplier(0.5, 1.0))


# -- client side -----------------------------------------------------------------------------

def test_client_side_clips_and_adds_std_z_clip_over_sqrt_m():
    n, m = 100_000, 4
    received = {LA: torch.ones(n)}
    trained = {LA: torch.ones(n) + 1.0}  # ||update|| = sqrt(n) > clip
    out, clipped = privatize_client_update(trained, received, 2.0, 1.5, m,
                                           torch.Generator().manual_seed(0))
    assert clipped
    noise = out[LA] - 1.0 - 2.0 / math.sqrt(n)  # the clipped update is 2 / sqrt(n) per entry
    assert float(noise.std()) == pytest.approx(1.5 * 2.0 / math.sqrt(m), rel=0.01)
    quiet, clipped = privatize_client_update({LA: t(1.3)}, {LA: t(1.0)}, 1.0, 0.0, m)
    assert not clipped and torch.allclose(quiet[LA], t(1.3))


def test_client_side_server_only_averages_uniformly():
    prev = {LA: t(0.0), LB: t(0.0)}
    ups = [_upd(0, {LA: t(3.0), LB: t(0.0)}), _upd(1, {LA: t(1.0), LB: t(0.0)}, n=99)]
    s = _strategy(clients=2, side="client", noise_multiplier=1.0)
    new = s.aggregate(0, prev, ups)
    assert torch.allclose(new[LA], t(2.0))  # no server clipping, no server noise
    rec = s.round_record()["client_dp"]
    assert rec["noise_std"]["language"] == pytest.approx(1.0 / math.sqrt(2 * 2))


# -- accountant ------------------------------------------------------------------------------

def _gaussian_rdp_epsilon(z: float, delta: float, orders) -> float:
    # RDP of the Gaussian mechanism: alpha / (2 z^2); conversion of Canonne et al. 2020
    return min(a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
               for a in orders if a > 1)


def test_one_full_round_is_the_gaussian_mechanism():
    delta = 1e-5
    eps = client_level_epsilon(1.0, 1.0, 1, delta)
    assert eps == pytest.approx(_gaussian_rdp_epsilon(1.0, delta, rdp.RdpAccountant()._orders),
                                rel=1e-9)
    p = pld.PLDAccountant()
    p.compose(dp_accounting.GaussianDpEvent(1.0))
    tight = p.get_epsilon(delta)
    assert tight <= eps <= 1.15 * tight  # RDP is an upper bound, and close for one release


def test_poisson_sampled_rounds_match_pld_within_tolerance():
    p = pld.PLDAccountant()
    p.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2)), 50)
    eps = client_level_epsilon(1.2, 0.1, 50, 1e-5)
    assert p.get_epsilon(1e-5) <= eps <= 1.3 * p.get_epsilon(1e-5)


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    eps = [client_level_epsilon(1.0, 0.2, r, 1e-5) for r in (0, 1, 10, 100)]
    assert eps[0] == 0 and eps == sorted(eps) and len(set(eps)) == 4
    by_z = [client_level_epsilon(z, 0.2, 10, 1e-5) for z in (0.5, 1.0, 2.0, 4.0)]
    assert by_z == sorted(by_z, reverse=True) and len(set(by_z)) == 4
    assert client_level_epsilon(0.0, 0.2, 1, 1e-5) == math.inf


def test_accountant_steps_equal_one_composition_and_round_trip():
    a = ClientAccountant()
    for _ in range(7):
        a.step(0.25, 1.1)
    assert a.runs == [(0.25, 1.1, 7)] and a.rounds == 7
    assert a.epsilon(1e-5) == client_level_epsilon(1.1, 0.25, 7, 1e-5)
    a.step(0.5, 1.1)
    b = ClientAccountant()
    b.load_state_dict(a.state_dict())
    assert b.runs == a.runs and b.epsilon(1e-5) == a.epsilon(1e-5)
    assert a.epsilon(1e-5) > client_level_epsilon(1.1, 0.25, 7, 1e-5)


def test_sample_rates():
    assert round_sample_rate(StrategyConfig(sampling="poisson", poisson_rate=0.05), 100) == 0.05
    assert round_sample_rate(StrategyConfig(sampling="poisson", fraction=0.3), 100) == 0.3
    assert round_sample_rate(StrategyConfig(clients_per_round=10), 100) == 0.1
    assert round_sample_rate(StrategyConfig(clients_per_round=10), 100, available=40) == 0.25
    assert round_sample_rate(StrategyConfig(), 10) == 1.0
    assert accounting.default_delta(None, 50) == 0.02


def test_the_strategy_composes_each_aggregated_round():
    s = _strategy(clients=4, noise_multiplier=1.0)
    prev = {LA: t(0.0), LB: t(0.0)}
    for rnd in range(3):
        s.aggregate(rnd, prev, [_upd(i, {LA: t(0.1), LB: t(0.0)}) for i in range(4)])
    rec = s.round_record()["client_dp"]
    assert rec["epsilon"] == pytest.approx(client_level_epsilon(1.0, 1.0, 3, 0.25))
    assert rec["delta"] == 0.25  # 1 / K


# -- config ----------------------------------------------------------------------------------

DP = "privacy.client.clip=1.0"


@pytest.mark.parametrize(("overrides", "match"), [
    (["privacy.client.adaptive=true"], "needs privacy.client.clip"),
    ([DP, "strategy.name=centralized"], "centralized baseline"),
    ([DP, "strategy.name=local"], "local baseline"),
    ([DP, "strategy.robust=median"], "strategy.robust=none"),
    ([DP, "lora.aggregation=exact"], "lora.aggregation=exact"),
    ([DP, "lora.r=8", "lora.client_ranks=4,8", "lora.het_aggregation=stack"],
     "lora.het_aggregation=stack"),
    ([DP, "lora.r=8", "lora.client_ranks=4,8", "lora.het_aggregation=hetlora"],
     "het_aggregation=zeropad"),
    ([DP, "strategy.name=fedexp"], "update norm"),
    ([DP, "strategy.name=scaffold"], "control variates"),
    ([DP, "strategy.name=fedumm"], "quality weights"),
    ([DP, "secagg.enabled=true"], "privacy.client.side=client"),
    ([DP, "privacy.client.adaptive=true", "privacy.client.side=client"], "server-side only"),
    ([DP, "privacy.client.adaptive=true", "clients=10"], "count_noise above 0.5"),
    ([DP, "privacy.client.side=cloud"], "privacy.client.side"),
])
def test_combinations_that_cannot_work_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({}, overrides)


def test_the_combinations_that_fit_are_accepted():
    for o in ([DP], [DP, "strategy.name=fedadam"], [DP, "lora.aggregation=ffa"],
              [DP, "privacy.client.side=client", "secagg.enabled=true"],
              [DP, "privacy.client.adaptive=true", "privacy.client.count_noise=1.0"],
              [DP, "privacy.client.adaptive=true", "clients=100"],
              [DP, "strategy.sampling=poisson", "strategy.poisson_rate=0.1", "clients=20"]):
        cfg = config_from_dict({}, o)
        assert ClientDP.from_config(cfg) is not None
    assert ClientDP.from_config(config_from_dict({}, [])) is None


# -- end to end ------------------------------------------------------------------------------

def test_a_tiny_run_records_clip_noise_and_epsilon(tmp_path, tiny_overrides):
    from fedumm.runtime.dispatch import run_experiment
    from fedumm.runtime.run_dir import RunDirectory

    cfg = config_from_dict({"name": "dp"}, [*tiny_overrides, "eval.every=0", DP,
                                            "privacy.client.noise_multiplier=0.5"])
    run_experiment(cfg, tmp_path / "dp", progress=False)
    rounds = [m for m in RunDirectory(tmp_path / "dp").metrics() if m["type"] == "round"]
    assert len(rounds) == 2
    recs = [r["client_dp"] for r in rounds]
    assert all(r["clip"] == 1.0 and r["clients"] == 2 for r in recs)
    assert all(r["noise_std"] and all(v == 0.25 for v in r["noise_std"].values()) for r in recs)
    assert 0 < recs[0]["epsilon"] < recs[1]["epsilon"] < math.inf
    assert recs[1]["epsilon"] == pytest.approx(client_level_epsilon(0.5, 1.0, 2, 0.5))
    # the run's guarantee: the round records' and summary.json's privacy
    assert [r["privacy"]["epsilon"] for r in rounds] == [r["epsilon"] for r in recs]
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["privacy"] == {"epsilon": recs[1]["epsilon"], "delta": 0.5,
                                  "unit": "client",
                                  "client": {"epsilon": recs[1]["epsilon"], "delta": 0.5}}

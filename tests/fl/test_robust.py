"""Robust aggregation rules (strategy.robust): hand-computed values on small vectors, how they
treat weights and an adapter group's tensors, one huge update against every rule under any
strategy, and the combinations the config refuses."""

from __future__ import annotations

import pytest
import torch

from fedumm.config import ROBUST_RULES, ConfigError, StrategyConfig, config_from_dict
from fedumm.fl import robust
from fedumm.fl.robust import RuleSettings, robust_mean
from fedumm.fl.strategies import build_strategy
from fedumm.fl.updates import GENERATION, UNDERSTANDING, ClientUpdate
from fedumm.models.protocol import IMAGE_INPUTS
from fedumm.models.reference import REFERENCE_GROUPS as REF

LA = "base_model.model.language_model.layers.0.mlp.up_proj.lora_A.weight"
LB = "base_model.model.language_model.layers.0.mlp.up_proj.lora_B.weight"
RULES = [r for r in ROBUST_RULES if r != "none"]


def v(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(a: torch.Tensor, *expected: float) -> bool:
    return torch.allclose(a.double(), v(*expected), rtol=0, atol=1e-12)


# -- the rules on flat vectors ---------------------------------------------------------------

def test_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones():
    assert close(robust.median([v(1, 5), v(2, -1), v(10, 0)]), 2, 0)
    assert close(robust.median([v(1), v(2), v(3), v(10)]), 2.5)


def test_trimmed_mean_cuts_int_trim_n_at_each_end_per_coordinate():
    x = [v(1, 40), v(2, 10), v(3, 20), v(100, 30)]
    assert close(robust.trimmed_mean(x, 0.25), 2.5, 25)  # one cut at each end
    assert close(robust.trimmed_mean(x, 0.2), 26.5, 25)  # int(0.8) = 0: the plain mean
    with pytest.raises(ValueError, match="trim"):
        robust.trimmed_mean(x, 0.5)


def test_norm_bound_clips_each_update_then_takes_the_weighted_mean():
    x = [v(3, 4), v(0.3, 0.4)]  # norms 5 and 0.5
    assert close(robust.norm_bounded_mean(x, [1, 1], 1.0), (0.6 + 0.3) / 2, (0.8 + 0.4) / 2)
    assert close(robust.norm_bounded_mean(x, [1, 3], 1.0), (0.6 + 0.9) / 4, (0.8 + 1.2) / 4)
    assert close(robust.norm_bounded_mean(x, [1, 1], 10.0), 1.65, 2.2)  # within: the mean


def test_krum_picks_the_client_with_the_closest_neighbours():
    # n = 5, f = 1: each score sums the squared distances to the n - f - 2 = 2 nearest others
    x = [v(0), v(1), v(2.2), v(100), v(1.5)]
    scores = robust.krum_scores(x, 1)
    assert close(scores, 1 + 2.25, 0.25 + 1, 0.49 + 1.44, 97.8**2 + 98.5**2, 0.25 + 0.49)
    assert robust.krum(x, 1) == 4
    # Multi-Krum: the weighted mean of the m lowest scores (1.5, 1 and 2.2)
    assert close(robust.multikrum(x, [1] * 5, 1, 3), (1.5 + 1 + 2.2) / 3)
    assert close(robust.multikrum(x, [1, 2, 1, 1, 1], 1, 3), (1.5 + 2 + 2.2) / 4)
    # m = 0: n - f = 4 clients, all but the outlier
    assert close(robust.multikrum(x, [1] * 5, 1), (0 + 1 + 2.2 + 1.5) / 4)


def test_bulyan_drops_outliers_by_krum_then_averages_the_coordinates_nearest_the_median():
    honest = [v(1, 2), v(1.1, 2), v(0.9, 2), v(1, 2.1), v(1, 1.9), v(1.05, 2.05)]
    out = robust.bulyan([*honest, v(1e6, -1e6)], 1)  # n = 7 = 4f + 3
    # theta = 5 selected (Krum never takes the outlier), beta = 3 nearest their median
    assert out[0].item() == pytest.approx(1.0, abs=0.07)
    assert out[1].item() == pytest.approx(2.0, abs=0.07)


@pytest.mark.parametrize(("rule", "n", "f"), [("krum", 4, 1), ("multikrum", 4, 1),
                                              ("bulyan", 6, 1), ("bulyan", 10, 2)])
def test_too_few_clients_for_f_is_an_error_naming_the_bound(rule, n, f):
    x = [v(float(i)) for i in range(n)]
    with pytest.raises(ValueError, match=f"{rule} with f={f}"):
        robust.RULES[rule](x, [1] * n, RuleSettings(malicious=f))


# -- one adapter group: deltas, A and B, weights ---------------------------------------------

def _states(rows):
    return [{LA: torch.tensor(a, dtype=torch.float32), LB: torch.tensor(b, dtype=torch.float32)}
            for a, b in rows]


PREV = {LA: torch.tensor([10.0, 10.0]), LB: torch.tensor([-5.0])}
ROWS = [([11.0, 10.5], [-4.0]), ([10.5, 9.0], [-5.5]), ([12.0, 10.0], [-5.0]),
        ([10.8, 10.1], [-4.8]), ([9.9, 10.2], [-5.2])]


def test_coordinate_wise_rules_on_updates_equal_the_rules_on_the_values():
    states = _states(ROWS)
    got = robust_mean("median", states, [1] * 5, PREV, RuleSettings())
    assert torch.allclose(got[LA], torch.tensor([10.8, 10.1]))
    assert torch.allclose(got[LB], torch.tensor([-5.0]))
    assert got[LA].dtype == torch.float32


def test_distance_rules_keep_a_client_whole_across_a_and_b():
    states = _states(ROWS)
    got = robust_mean("krum", states, [1] * 5, PREV, RuleSettings(malicious=1))
    pick = [i for i, s in enumerate(states) if all(torch.equal(s[k], got[k]) for k in s)]
    assert len(pick) == 1  # A and B both from the one client Krum chose


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "bulyan"])
def test_median_trimmed_krum_and_bulyan_ignore_sample_count_weights(rule):
    states = _states([*ROWS, ([10.2, 10.3], [-5.1]), ([11.1, 9.7], [-4.9])])
    s = RuleSettings(trim=0.2, malicious=1)
    a = robust_mean(rule, states, [1] * 7, PREV, s)
    b = robust_mean(rule, states, [1000, 1, 1, 1, 1, 1, 3], PREV, s)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_norm_bound_within_the_bound_is_the_weighted_mean():
    states = _states(ROWS)
    w = [3, 1, 2, 5, 1]
    got = robust_mean("norm_bound", states, w, PREV, RuleSettings(norm=1e6))
    for k in PREV:
        want = sum(wi * s[k].double() for wi, s in zip(w, states, strict=True)) / sum(w)
        assert torch.allclose(got[k].double(), want, atol=1e-6)


# -- with the strategies: one huge update ------------------------------------------------------

def _upd(cid, a, b, n=10):
    return ClientUpdate(cid, {LA: a, LB: b},
                        {UNDERSTANDING: n, GENERATION: n, IMAGE_INPUTS: n})


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedprox"])
def test_one_huge_update_moves_fedavg_far_but_not_the_robust_rules(strategy):
    g = torch.Generator().manual_seed(0)
    prev = {LA: torch.zeros(4, 3), LB: torch.zeros(2, 4)}
    honest = [_upd(i, 0.1 + 0.01 * torch.randn(4, 3, generator=g),
                   -0.1 + 0.01 * torch.randn(2, 4, generator=g)) for i in range(7)]
    attacker = _upd(7, torch.full((4, 3), 1e4), torch.full((2, 4), -1e4))

    def run(rule: str, updates) -> dict:
        cfg = StrategyConfig(name=strategy, robust=rule, robust_trim=0.2, robust_malicious=1,
                             robust_norm=0.5)
        s = build_strategy(cfg, num_clients=8, seed=0, groups=REF)
        return s.aggregate(0, prev, updates)

    def dist(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    clean = run("none", honest)
    assert dist(run("none", [*honest, attacker]), clean) > 100
    for rule in RULES:
        assert dist(run(rule, [*honest, attacker]), clean) < 0.05, rule


def test_robust_none_is_the_weighted_mean_bit_for_bit():
    prev = {LA: torch.zeros(2), LB: torch.zeros(1)}
    ups = [_upd(i, torch.tensor([0.1 * i, 0.3]), torch.tensor([0.7 / (i + 1)]), n=i + 1)
           for i in range(3)]
    from fedumm.fl.aggregate import weighted_mean
    s = build_strategy(StrategyConfig(), num_clients=3, seed=0, groups=REF)
    got = s.aggregate(0, prev, ups)
    want = weighted_mean([u.tensors for u in ups], [1, 2, 3])
    assert all(torch.equal(got[k], want[k]) for k in want)


# -- what the config refuses -------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "match"), [
    (["strategy.robust=krum", "clients=4"], "needs at least 5 clients per round"),
    (["strategy.robust=bulyan", "clients=6"], "needs at least 7 clients per round"),
    (["strategy.robust=bulyan", "clients=20", "strategy.fraction=0.3"], "a round has 6"),
    (["strategy.robust=median", "lora.aggregation=exact"], "lora.aggregation=exact"),
    (["strategy.robust=median", "lora.r=8", "lora.client_ranks=4,8",
      "lora.het_aggregation=stack"], "lora.het_aggregation=stack"),
    (["strategy.robust=median", "lora.r=8", "lora.client_ranks=4,8",
      "lora.het_aggregation=hetlora"], "lora.het_aggregation=hetlora"),
    (["strategy.robust=trimmed_mean", "clients=4"], "trims int"),
    (["strategy.robust=multikrum", "clients=5", "strategy.robust_multikrum_m=5"],
     "at most n - f = 4"),
    (["strategy.robust=median", "strategy.robust_trim=0.5"], "robust_trim"),
    (["strategy.robust=geomed"], "strategy.robust"),
])
def test_combinations_that_cannot_work_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({}, overrides)


def test_the_rules_that_fit_are_accepted():
    for o in (["strategy.robust=krum", "clients=5"], ["strategy.robust=bulyan", "clients=7"],
              ["strategy.robust=krum", "strategy.robust_malicious=0", "clients=3"],
              ["strategy.robust=trimmed_mean", "strategy.robust_trim=0.25"],
              ["strategy.robust=median", "strategy.name=scaffold"],
              ["strategy.robust=norm_bound", "strategy.robust_norm=0.1"]):
        assert config_from_dict({}, o).strategy.robust == o[0].split("=")[1]

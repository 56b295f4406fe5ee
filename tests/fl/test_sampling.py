"""Client sampling and availability: uniform as before, Poisson at rate q, clients offline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedumm.config import StrategyConfig, config_from_dict
from fedumm.fl.sampling import draw, online
from fedumm.fl.strategies.fedavg import FedAvg


@pytest.mark.parametrize(("n", "fraction", "least"), [(10, 0.3, 1), (7, 1.0, 1), (100, 0.05, 8),
                                                      (3, 0.5, 5)])
def test_uniform_sampling_with_everyone_online_is_the_draw_it_always_was(n, fraction, least):
    cfg = StrategyConfig(fraction=fraction, min_clients=least)
    for seed in (0, 4):
        for rnd in range(5):
            k = min(n, max(least, math.ceil(fraction * n - 1e-9)))
            old = sorted(int(i) for i in np.random.default_rng([seed, rnd]).choice(
                n, size=k, replace=False))
            assert FedAvg(cfg, n, seed=seed).sample_clients(rnd) == old


def test_clients_per_round_fixes_the_number():
    cfg = StrategyConfig(clients_per_round=10)
    picks = FedAvg(cfg, 100_000, seed=0).sample_clients(3)
    assert len(picks) == 10 and len(set(picks)) == 10 and max(picks) < 100_000


def test_poisson_sampling_takes_q_k_clients_on_average_and_depends_on_seed_and_round():
    cfg = StrategyConfig(sampling="poisson", poisson_rate=0.01)
    sizes = [len(draw(cfg, 100_000, 0, r).clients) for r in range(40)]
    mean, sd = float(np.mean(sizes)), math.sqrt(100_000 * 0.01 * 0.99)
    assert abs(mean - 1000) < 4 * sd / math.sqrt(40)
    assert len(set(sizes)) > 1  # the size itself is random
    assert draw(cfg, 100_000, 0, 5) == draw(cfg, 100_000, 0, 5)  # (seed, round) only
    assert draw(cfg, 100_000, 0, 5) != draw(cfg, 100_000, 1, 5)
    # a resumed strategy asked in another order draws the same clients
    a, b = FedAvg(cfg, 5000, seed=2), FedAvg(cfg, 5000, seed=2)
    assert [a.sample_clients(r) for r in range(6)] == \
        [b.sample_clients(r) for r in reversed(range(6))][::-1]


def test_poisson_rate_defaults_to_the_fraction():
    cfg = StrategyConfig(sampling="poisson", fraction=0.2)
    assert abs(np.mean([len(draw(cfg, 10_000, 0, r).clients) for r in range(10)]) - 2000) < 60


def test_only_online_clients_are_drawn_and_min_clients_skips_a_round():
    cfg = StrategyConfig(clients_per_round=4, min_clients=3, availability=0.002)
    draws = [draw(cfg, 1000, 0, r) for r in range(30)]
    for r, d in enumerate(draws):
        up = set(online(cfg, 1000, 0, r).tolist())
        assert d.available == len(up) and set(d.clients) <= up
        if d.available < 3:
            assert d.clients == [] and "min_clients=3" in d.skipped
            assert d.record()["skipped"] == d.skipped
        else:
            assert len(d.clients) == min(4, d.available) and d.skipped is None
    assert any(d.skipped for d in draws) and any(not d.skipped for d in draws)


def test_poisson_rounds_below_min_clients_are_skipped_not_filled_up():
    cfg = StrategyConfig(sampling="poisson", poisson_rate=0.002, min_clients=3)
    draws = [draw(cfg, 1000, 0, r) for r in range(30)]
    assert all((d.sampled < 3) == bool(d.skipped) for d in draws)
    assert all(len(d.clients) in (0, d.sampled) for d in draws)


def test_diurnal_availability_follows_the_period_with_a_phase_per_client():
    cfg = StrategyConfig(availability=0.5, availability_amplitude=0.5, availability_period=8)
    frac = [len(online(cfg, 20_000, 0, r)) / 20_000 for r in range(16)]
    assert all(abs(f - 0.5) < 0.03 for f in frac)  # phases spread: the population's mean stays
    one = [0 in online(cfg, 20_000, 0, r) for r in range(400)]  # a client's own day
    by_hour = [np.mean(one[h::8]) for h in range(8)]
    assert max(by_hour) - min(by_hour) > 0.5


def test_the_sampling_keys_validate():
    cfg = config_from_dict({"name": "s"}, ["strategy.sampling=poisson",
                                           "strategy.poisson_rate=0.001",
                                           "strategy.availability=0.7", "clients=100000"])
    assert cfg.strategy.sampling == "poisson" and cfg.clients == 100_000
    with pytest.raises(Exception, match="strategy.sampling"):
        config_from_dict({"name": "s"}, ["strategy.sampling=stratified"])

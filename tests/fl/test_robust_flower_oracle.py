"""The robust rules (fedumm.fl.robust) against Flower 1.42.0's own implementations on the same
inputs: ``aggregate_median``, ``aggregate_trimmed_avg``, ``aggregate_krum`` (Krum and
Multi-Krum), ``aggregate_bulyan``, and Flower's fixed clipping (``compute_clip_model_update``)
followed by its weighted ``aggregate`` for the norm bound.

Flower sees each client's adapter *values* as ``(list of arrays, num_examples)``; our rules
run on the updates relative to the previous global value (``robust_mean``), so this also
checks that the two forms agree. Skipped where Flower is not installed (``pip install
'.[oracles]'``; a fresh CI venv has no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedumm.fl.robust import RuleSettings, robust_mean

flwr_aggregate = pytest.importorskip("flwr.server.strategy.aggregate")
flwr_dp = pytest.importorskip("flwr.supercore.differential_privacy")

# an adapter group of two LoRA modules and a fully trained tensor (shapes of A, B, a vector)
SHAPES = [(4, 6), (5, 4), (3, 2), (2, 3), (7,)]
KEYS = [f"t{i}" for i in range(len(SHAPES))]


def _inputs(seed: int, n: int, outliers: int = 0):
    rng = np.random.default_rng(seed)
    prev = [rng.normal(size=s) for s in SHAPES]
    values = []
    for i in range(n):
        spread = 50.0 if i < outliers else 1.0
        values.append([p + spread * rng.normal(size=p.shape) for p in prev])
    counts = [int(c) for c in rng.integers(1, 100, size=n)]
    return prev, values, counts


def _ours(rule: str, prev, values, counts, settings: RuleSettings) -> np.ndarray:
    def state(arrays):
        return {k: torch.from_numpy(a.copy()) for k, a in zip(KEYS, arrays, strict=True)}
    out = robust_mean(rule, [state(v) for v in values], counts, state(prev), settings)
    return np.concatenate([out[k].numpy().ravel() for k in KEYS])


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def _results(values, counts):
    return [([a.copy() for a in v], c) for v, c in zip(values, counts, strict=True)]


SEEDS = [0, 1, 2, 3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [5, 8])
def test_median_matches_flower(seed, n):
    prev, values, counts = _inputs(seed, n, outliers=1)
    want = _flat(flwr_aggregate.aggregate_median(_results(values, counts)))
    np.testing.assert_allclose(_ours("median", prev, values, counts, RuleSettings()), want,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "trim"), [(5, 0.2), (8, 0.25), (9, 0.4), (6, 0.1)])
def test_trimmed_mean_matches_flower(seed, n, trim):
    prev, values, counts = _inputs(seed, n, outliers=1)
    want = _flat(flwr_aggregate.aggregate_trimmed_avg(_results(values, counts), trim))
    got = _ours("trimmed_mean", prev, values, counts, RuleSettings(trim=trim))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f"), [(5, 1), (8, 2), (9, 3), (6, 0)])
def test_krum_matches_flower(seed, n, f):
    prev, values, counts = _inputs(seed, n, outliers=f)
    want = _flat(flwr_aggregate.aggregate_krum(_results(values, counts), f, 0))
    got = _ours("krum", prev, values, counts, RuleSettings(malicious=f))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f", "m"), [(5, 1, 3), (8, 2, 5), (9, 1, 2), (7, 2, 1)])
def test_multikrum_matches_flower(seed, n, f, m):
    prev, values, counts = _inputs(seed, n, outliers=f)
    want = _flat(flwr_aggregate.aggregate_krum(_results(values, counts), f, m))
    got = _ours("multikrum", prev, values, counts, RuleSettings(malicious=f, multikrum_m=m))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f"), [(7, 1), (9, 1), (11, 2), (4, 0)])
def test_bulyan_matches_flower(seed, n, f):
    prev, values, counts = _inputs(seed, n, outliers=f)
    want = _flat(flwr_aggregate.aggregate_bulyan(_results(values, counts), f,
                                                 flwr_aggregate.aggregate_krum, to_keep=0))
    got = _ours("bulyan", prev, values, counts, RuleSettings(malicious=f))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bound", [0.5, 3.0, 1e6])
def test_norm_bound_matches_flowers_fixed_clipping_then_weighted_mean(seed, bound):
    prev, values, counts = _inputs(seed, 6, outliers=1)
    clipped = []
    for v in values:
        param = [a.copy() for a in v]
        flwr_dp.compute_clip_model_update(param, prev, bound)  # prev + clipped update
        clipped.append(param)
    want = _flat(flwr_aggregate.aggregate(_results(clipped, counts)))
    got = _ours("norm_bound", prev, values, counts, RuleSettings(norm=bound))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

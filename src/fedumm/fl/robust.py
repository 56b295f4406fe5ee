"""Robust aggregation rules (``strategy.robust``): pure functions of the clients' updates as
flat vectors, and :func:`robust_mean`, which applies one to an adapter group's tensors.

What a rule sees. ``Strategy.mean`` hands over one adapter group: each contributing client's
tensors of that group and the group's previous global value. The rules run on the clients'
*updates* (trained values minus the previous global, in float64), and the result is the
previous global plus the rule's output. For the coordinate-wise rules (median, trimmed mean,
Bulyan's last step) and for Krum's distances this is the same as running them on the values
(they commute with a shift), so it changes nothing there; a norm bound only means something
for an update, which is why all rules share that one form.

LoRA's A and B. All tensors of one group (every module's ``lora_A`` and ``lora_B``, and the
group's fully trained modules) are flattened into one vector per client, in the order of the
group's keys. The distance rules (Krum, Multi-Krum, Bulyan's selection) and the norm bound
measure that whole vector, so a client is kept or dropped, or clipped, as one; the
coordinate-wise rules (median, trimmed mean) act on each entry of A and B on its own. Like the
weighted mean, none of them aggregates the product BA: the median of the Bs times the median
of the As is not the median of the products (which is why exact aggregation, HetLoRA's
weighting and FLoRA's stacking, which need the clients' mean or their products, are refused
with a robust rule by the config).

Sample-count weights. A client reports its own sample count, so a weight is what a lying
client controls (``attack.kind=lie``). The median, the trimmed mean, Krum's choice and Bulyan
ignore the weights, as Flower's ``aggregate_median``, ``aggregate_trimmed_avg``,
``aggregate_krum`` and ``aggregate_bulyan`` do and as their papers define them. Multi-Krum
averages the clients it selects with their weights (Flower's ``aggregate`` of the best), and
the norm bound takes the weighted mean of the clipped updates (Sun et al. 2019): a client
still pulls with its weight there, but never further than the bound. Zero-weight clients never
reach a rule (the strategy leaves them out), so a weight is also who takes part.

With any strategy. The rule's result replaces the weighted mean and goes through the
strategy's ``server_update`` as the mean would (FedAvgM's momentum, FedAdam's moments take it
as their pseudo-gradient's end point); SCAFFOLD's control variates are still averaged plainly.
How many clients a round aggregates is checked against Krum's and Bulyan's bounds by the
config (the nominal count per round); a group that fewer clients trained in a round (Poisson
sampling, clients without that modality) stops the run with the same message.

References: Yin et al. 2018 (median, trimmed mean; arXiv 1803.01498), Blanchard et al. 2017
(Krum, Multi-Krum; NeurIPS), El Mhamdi et al. 2018 (Bulyan; arXiv 1802.07927), Sun et al. 2019
(norm bounding; arXiv 1911.07963). ``tests/fl/test_robust_flower_oracle.py`` checks each
against Flower 1.42.0's functions on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedumm.config import ROBUST_RULES, StrategyConfig, robust_min_clients

State = dict[str, torch.Tensor]
Vectors = Sequence[torch.Tensor]


def _stack(vectors: Vectors) -> torch.Tensor:
    if not vectors:
        raise ValueError("no client updates to aggregate")
    return torch.stack([v.detach().reshape(-1).to("cpu", torch.float64) for v in vectors])


def _need(rule: str, n: int, f: int) -> None:
    need = robust_min_clients(rule, f)
    if n < need:
        raise ValueError(f"{rule} with f={f} malicious clients needs at least {need} client "
                         f"updates (krum: n > 2f + 2, bulyan: n >= 4f + 3), got {n}")


# ------------------------------------------------------------------ coordinate-wise rules

def median(vectors: Vectors) -> torch.Tensor:
    """Coordinate-wise median (the mean of the two middle values for an even count, as
    ``np.median``); weights are ignored."""
    return _median(_stack(vectors))


def _median(x: torch.Tensor) -> torch.Tensor:
    # by sorting: torch.quantile refuses inputs of more than 2^24 entries
    n, s = x.shape[0], x.sort(dim=0).values
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(vectors: Vectors, trim: float) -> torch.Tensor:
    """Coordinate-wise mean after cutting the ``int(trim * n)`` largest and as many smallest
    values (``scipy.stats.trim_mean``'s rule, as Flower's); weights are ignored."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    x = _stack(vectors)
    cut = int(trim * x.shape[0])
    return x.sort(dim=0).values[cut:x.shape[0] - cut].mean(dim=0)


# ------------------------------------------------------------------ norm bound

def norm_bounded_mean(vectors: Vectors, weights: Sequence[float], bound: float
                      ) -> torch.Tensor:
    """The weighted mean of the updates, each first scaled down to L2 norm at most ``bound``
    (an update within the bound is unchanged)."""
    if bound <= 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    x = _stack(vectors)
    norms = x.norm(dim=1, keepdim=True)
    x = x * torch.clamp(bound / norms.clamp_min(1e-300), max=1.0)
    return _weighted(x, weights)


def _weighted(x: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if w.shape[0] != x.shape[0] or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) \
            or float(w.sum()) <= 0:
        raise ValueError(f"expected {x.shape[0]} finite non-negative weights, not all zero, "
                         f"got {list(weights)}")
    return (w / w.sum()) @ x


# ------------------------------------------------------------------ distance rules

def krum_scores(vectors: Vectors, f: int) -> torch.Tensor:
    """Krum's score per client: the sum of its squared L2 distances to its ``max(1, n - f -
    2)`` nearest other clients."""
    x = _stack(vectors)
    n = x.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=x.dtype)
    # row by row: exact differences (cdist's matrix-product form loses digits), n vectors
    # of memory at a time
    d = torch.stack([(x - x[i]).pow(2).sum(dim=1) for i in range(n)])
    d.fill_diagonal_(float("inf"))  # a client is not its own neighbour
    return d.sort(dim=1).values[:, :max(1, n - f - 2)].sum(dim=1)


def krum(vectors: Vectors, f: int) -> int:
    """The index of the client Krum selects (the lowest score; the first of equal ones)."""
    _need("krum", len(vectors), f)
    return int(torch.argmin(krum_scores(vectors, f)))


def multikrum(vectors: Vectors, weights: Sequence[float], f: int, m: int = 0
              ) -> torch.Tensor:
    """The weighted mean of the ``m`` clients with the lowest Krum scores (0: ``n - f``)."""
    n = len(vectors)
    _need("multikrum", n, f)
    m = m or n - f
    if not 1 <= m <= n:
        raise ValueError(f"multikrum: cannot select {m} of {n} clients")
    best = torch.argsort(krum_scores(vectors, f), stable=True)[:m].tolist()
    return _weighted(_stack([vectors[i] for i in best]), [weights[i] for i in best])


def bulyan(vectors: Vectors, f: int) -> torch.Tensor:
    """Bulyan over Krum: select ``theta = n - 2f`` clients by Krum one after another (each
    time on those not yet selected), then average per coordinate the ``beta = theta - 2f``
    selected values closest to the selected clients' median. Needs ``n >= 4f + 3``."""
    n = len(vectors)
    _need("bulyan", n, f)
    rest = list(range(n))
    chosen = []
    for _ in range(n - 2 * f):
        pick = rest[int(torch.argmin(krum_scores([vectors[i] for i in rest], f)))]
        chosen.append(pick)
        rest.remove(pick)
    x = _stack([vectors[i] for i in chosen])
    med = _median(x)
    beta = len(chosen) - 2 * f
    nearest = (x - med).abs().argsort(dim=0, stable=True)[:beta]
    return x.gather(0, nearest).mean(dim=0)


# ------------------------------------------------------------------ one group's tensors

@dataclass(frozen=True)
class RuleSettings:
    """A rule's settings (``strategy.robust_*``)."""

    trim: float = 0.2
    malicious: int = 1
    norm: float = 1.0
    multikrum_m: int = 0

    @classmethod
    def from_config(cls, cfg: StrategyConfig) -> RuleSettings:
        return cls(cfg.robust_trim, cfg.robust_malicious, cfg.robust_norm,
                   cfg.robust_multikrum_m)


Rule = Callable[[Vectors, Sequence[float], RuleSettings], torch.Tensor]

RULES: dict[str, Rule] = {
    "median": lambda x, w, s: median(x),
    "trimmed_mean": lambda x, w, s: trimmed_mean(x, s.trim),
    "norm_bound": lambda x, w, s: norm_bounded_mean(x, w, s.norm),
    "krum": lambda x, w, s: _stack(x)[krum(x, s.malicious)],
    "multikrum": lambda x, w, s: multikrum(x, w, s.malicious, s.multikrum_m),
    "bulyan": lambda x, w, s: bulyan(x, s.malicious),
}
assert set(RULES) == set(ROBUST_RULES) - {"none"}, "config's ROBUST_RULES and RULES differ"


def robust_mean(rule: str, states: Sequence[State], weights: Sequence[float], prev: State,
                settings: RuleSettings) -> State:
    """``prev`` plus the ``rule`` of the clients' updates ``state - prev``, the group's
    tensors flattened into one vector per client (in the order of ``prev``'s keys); each
    result in ``prev``'s dtype and device."""
    if rule not in RULES:
        raise ValueError(f"unknown robust rule {rule!r}; expected one of {sorted(RULES)}")
    keys = list(prev)
    base = torch.cat([prev[k].detach().reshape(-1).to("cpu", torch.float64) for k in keys])
    flat = [torch.cat([s[k].detach().reshape(-1).to("cpu", torch.float64) for k in keys]) - base
            for s in states]
    out = base + RULES[rule](flat, weights, settings)
    new, start = {}, 0
    for k in keys:
        p = prev[k]
        new[k] = out[start:start + p.numel()].reshape(p.shape).to(p.device, p.dtype)
        start += p.numel()
    return new

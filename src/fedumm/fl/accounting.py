"""The privacy accountant of client-level differential privacy (DP-FedAvg,
:mod:`fedumm.fl.client_dp`), over Google's ``dp-accounting`` (0.6).

What is composed. A round releases the noised mean of the clipped updates of the clients it
sampled: the sampled Gaussian mechanism with noise multiplier z (the noise's std on the *sum*
over the sensitivity, the clip norm S) and sampling probability q. Each round is one
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` (``GaussianDpEvent(z)`` when every client takes
part, q = 1), composed with the RDP accountant (Mironov 2017; Mironov, Talwar and Zhang 2019)
under add-or-remove-one-client adjacency, and epsilon at delta is read off with the
accountant's conversion (Canonne, Kamath and Steinke 2020). Adaptive clipping (Andrew et al.
2021, arXiv:1905.03871) spends part of the budget on the clipped count, and the update noise is
accounted at the adjusted multiplier ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` the paper
gives, which is the same total privacy as z (:func:`fedumm.fl.client_dp.adjusted_noise_multiplier`).

The sampling probability q per round (:func:`round_sample_rate`):

* ``strategy.sampling=poisson``: ``poisson_rate`` (``fraction`` when unset), exactly what
  :mod:`fedumm.fl.sampling` draws; an availability below 1 only lowers the real probability,
  so q stays an upper bound.
* ``strategy.sampling=uniform``: m of the K clients without replacement (of those online) is
  accounted as Poisson sampling with ``q = m / K`` (``m / available`` when fewer are online).
  This is the standard approximation (McMahan et al. 2018 state their bound for Poisson
  sampling, and TF Privacy / Opacus account fixed-size batches the same way); sampling
  without replacement under add-or-remove adjacency is not covered by the Poisson bound
  exactly, so the epsilon of a uniformly sampled run is an approximation. Use Poisson sampling
  where the guarantee must hold to the letter.
* every client in every round (q = 1): plain Gaussian composition, no amplification.

delta: ``privacy.delta``, by default 1/K (K the number of clients); 1/K is a weak delta, and
reports with K in the thousands usually take ``delta = 1/K^1.1`` or smaller.

The accountant's state is the list of (q, z, rounds) runs it composed, plain numbers that a
checkpoint holds (``state_dict``), so a resumed run reports the epsilon of an uninterrupted one.
"""

from __future__ import annotations

import logging
import math

import dp_accounting
from dp_accounting import rdp

from fedumm.config import StrategyConfig
from fedumm.fl.sampling import POISSON


def _event(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)


def _check(noise_multiplier: float, sample_rate: float, rounds: int) -> None:
    if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")


def _epsilon(runs: list[tuple[float, float, int]], delta: float) -> float:
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"delta must be in (0, 1], got {delta}")
    if delta == 1.0 or not any(n for _, _, n in runs):  # every mechanism is (0, 1)-DP
        return 0.0
    if any(z == 0 and n for _, z, n in runs):
        return math.inf  # no noise: no privacy (the accountant says inf too, slowly)
    accountant = rdp.RdpAccountant()
    absl = logging.getLogger("absl")
    level = absl.level
    # dp-accounting logs a warning for each low RDP order whose series does not converge at
    # small noise (it leaves that order out, as it should): one per order per call, which
    # would flood a run's output, so only errors are let through while it computes
    absl.setLevel(max(level, logging.ERROR))
    try:
        for q, z, n in runs:
            if n:
                accountant.compose(_event(z, q), n)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def client_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int,
                         delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of the sampled Gaussian mechanism with
    ``noise_multiplier`` z and client sampling probability ``sample_rate`` q (RDP accountant;
    0 for no rounds, inf for z = 0)."""
    _check(noise_multiplier, sample_rate, rounds)
    return _epsilon([(float(sample_rate), float(noise_multiplier), int(rounds))], delta)


def round_sample_rate(cfg: StrategyConfig, num_clients: int, available: int | None = None
                      ) -> float:
    """The probability q that a client takes part in a round (module docstring): Poisson
    sampling's rate, or ``m / K`` for uniform sampling of m of K clients (``m / available``
    when only ``available`` clients were online)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if cfg.sampling == POISSON:
        return float(cfg.poisson_rate if cfg.poisson_rate is not None else cfg.fraction)
    pool = num_clients if available is None else min(num_clients, available)
    return 1.0 if pool <= 0 else min(1.0, cfg.per_round(num_clients) / pool)


def expected_clients(cfg: StrategyConfig, num_clients: int) -> float:
    """How many clients a round is expected to aggregate: m for uniform sampling, q K for
    Poisson sampling (availability left aside)."""
    if cfg.sampling == POISSON:
        return round_sample_rate(cfg, num_clients) * num_clients
    return float(cfg.per_round(num_clients))


class ClientAccountant:
    """Client-level privacy spent so far: one :meth:`step` per round that released a noised
    aggregate, :meth:`epsilon` at any delta. Consecutive rounds with the same (q, z) are kept
    as one run, so the state stays a few numbers however long the run is."""

    def __init__(self) -> None:
        self.runs: list[tuple[float, float, int]] = []  # (sample rate, noise multiplier, rounds)

    @property
    def rounds(self) -> int:
        return sum(n for _, _, n in self.runs)

    def step(self, sample_rate: float, noise_multiplier: float, rounds: int = 1) -> None:
        """Compose ``rounds`` more rounds with sampling probability ``sample_rate`` and
        ``noise_multiplier`` (for adaptive clipping, the adjusted one, z_delta)."""
        _check(noise_multiplier, sample_rate, rounds)
        q, z = float(sample_rate), float(noise_multiplier)
        if self.runs and self.runs[-1][:2] == (q, z):
            self.runs[-1] = (q, z, self.runs[-1][2] + rounds)
        elif rounds:
            self.runs.append((q, z, int(rounds)))

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything composed so far (0 before the first round)."""
        return _epsilon(self.runs, delta)

    def state_dict(self) -> dict:
        return {"runs": [[q, z, n] for q, z, n in self.runs]}

    def load_state_dict(self, d: dict) -> None:
        self.runs = [(float(q), float(z), int(n)) for q, z, n in d.get("runs", [])]


def default_delta(delta: float | None, num_clients: int) -> float:
    """``privacy.delta``, or 1/K for client-level DP when it is unset."""
    return float(delta) if delta is not None else 1.0 / max(1, num_clients)

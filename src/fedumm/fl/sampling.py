"""Which clients take part in a round: uniform or Poisson sampling over the clients online.

Cross-device federated learning draws a round's clients from a large population of which only
some are reachable (Bonawitz et al., "Towards Federated Learning at Scale", arXiv:1902.01046);
client-level differential privacy accounts for Poisson sampling, each client taking part
independently with probability q (Abadi et al. 2016, McMahan et al. 2018, arXiv:1710.06963).

* **availability**: client k is online in round r with probability
  ``p_k(r) = clip(availability + availability_amplitude * sin(2 pi (r / period + phase_k)),
  0, 1)``, ``phase_k`` uniform in [0, 1) per client (a diurnal pattern over ``period`` rounds;
  a constant ``availability`` when the amplitude is 0).
* **uniform**: ``max(min_clients, clients_per_round or ceil(fraction * K))`` of the online
  clients without replacement (all online ones when fewer are online).
* **poisson**: every online client independently with probability ``poisson_rate``
  (``fraction`` when unset); the set is never filled up, so the accountant's q holds.

A round with fewer than ``min_clients`` clients online (uniform) or sampled (poisson) is
skipped: nobody trains, the global model stays, and the round record says why. Every draw is
a function of (seed, round) only, so a resumed run draws the same clients; with everyone
online, uniform sampling is the draw fedumm always made. Cost per round: O(selected) for
uniform sampling with everyone online, else a few O(K) vectorised numpy passes (100,000
Bernoulli draws take about a millisecond).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedumm.config import StrategyConfig

POISSON, UNIFORM = "poisson", "uniform"
# seed words of the per-round streams, apart from the (seed, round[, client]) ones elsewhere
_STREAM = 0x5A3F11
_ONLINE, _POISSON, _PHASE = 1, 2, 3


def too_few(n: int, what: str, least: int) -> str:
    """Why a round is skipped for having too few ``what`` (clients online or sampled, or
    updates left after faults: :mod:`fedumm.runtime.faults`), in one wording."""
    return f"{n} {what}, fewer than strategy.min_clients={least}"


@dataclass(frozen=True)
class Draw:
    """A round's participants and how they were found (for the round record)."""

    clients: list[int]  # sorted; empty when the round is skipped
    available: int  # clients online this round
    sampled: int  # clients drawn (before min_clients was checked)
    skipped: str | None = None

    def record(self) -> dict:
        out: dict = {"available": self.available, "sampled": self.sampled}
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def online_probability(cfg: StrategyConfig, num_clients: int, seed: int, rnd: int
                       ) -> np.ndarray | float:
    """Each client's probability of being online in round ``rnd`` (a scalar without the
    diurnal term)."""
    if not cfg.availability_amplitude:
        return cfg.availability
    phase = np.random.default_rng([seed, _STREAM, _PHASE]).random(num_clients)
    wave = np.sin(2 * np.pi * (rnd / cfg.availability_period + phase))
    return np.clip(cfg.availability + cfg.availability_amplitude * wave, 0.0, 1.0)


def online(cfg: StrategyConfig, num_clients: int, seed: int, rnd: int) -> np.ndarray | None:
    """The ids of the clients online in round ``rnd``, sorted; None when everyone is."""
    if cfg.availability >= 1.0 and not cfg.availability_amplitude:
        return None
    p = online_probability(cfg, num_clients, seed, rnd)
    draws = np.random.default_rng([seed, rnd, _STREAM, _ONLINE]).random(num_clients)
    return np.flatnonzero(draws < p)


def draw(cfg: StrategyConfig, num_clients: int, seed: int, rnd: int) -> Draw:
    """Round ``rnd``'s clients under ``cfg``'s sampling and availability (module docstring)."""
    up = online(cfg, num_clients, seed, rnd)
    available = num_clients if up is None else len(up)
    if cfg.sampling == POISSON:
        q = cfg.poisson_rate if cfg.poisson_rate is not None else cfg.fraction
        hit = np.random.default_rng([seed, rnd, _STREAM, _POISSON]).random(num_clients) < q
        chosen = np.flatnonzero(hit) if up is None else up[hit[up]]
    elif up is None:  # everyone online: the draw fedumm always made
        n = cfg.per_round(num_clients)
        chosen = np.random.default_rng([seed, rnd]).choice(num_clients, size=n, replace=False)
    else:
        n = min(len(up), cfg.per_round(num_clients))
        chosen = np.random.default_rng([seed, rnd]).choice(up, size=n, replace=False)
    clients = sorted(int(i) for i in chosen)
    least = cfg.least(num_clients)
    short = available if cfg.sampling == UNIFORM else len(clients)
    if short < least:
        why = "online" if cfg.sampling == UNIFORM else "sampled"
        return Draw([], available, len(clients), too_few(short, f"client(s) {why}", least))
    return Draw(clients, available, len(clients))

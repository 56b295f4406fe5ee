"""Server strategies, one algorithm per module, and ``build_strategy`` to pick one by name.

``centralized`` and ``local`` are runtime baselines, not strategies: centralized training pools
all data in one "client" and local training never exchanges adapters, so neither needs a server
rule; the runtime still builds FedAvg for them so that sampling and bookkeeping work the same.
"""

from __future__ import annotations

from fedumm.config import StrategyConfig
from fedumm.fl.strategies.base import Strategy
from fedumm.fl.strategies.fedadagrad import FedAdagrad
from fedumm.fl.strategies.fedadam import FedAdam
from fedumm.fl.strategies.fedavg import FedAvg
from fedumm.fl.strategies.fedavgm import FedAvgM
from fedumm.fl.strategies.fedopt import FedOpt
from fedumm.fl.strategies.fedprox import FedProx
from fedumm.fl.strategies.fedumm import FedUMM
from fedumm.fl.strategies.fedyogi import FedYogi
from fedumm.fl.strategies.scaffold import Scaffold
from fedumm.models.protocol import AdapterGroup

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedUMM, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, Scaffold)
}
# Baselines run by the runtime; they use FedAvg on the server side.
BASELINES: tuple[str, ...] = ("centralized", "local")


def build_strategy(cfg: StrategyConfig, num_clients: int, seed: int,
                   groups: tuple[AdapterGroup, ...] = ()) -> Strategy:
    """The strategy named ``cfg.name`` (``centralized`` / ``local`` give FedAvg), aggregating
    over the backbone's adapter ``groups``.

    Raises
    ------
    ValueError
        If the name is neither a registered strategy nor a baseline.
    """
    if cfg.name in BASELINES:
        return FedAvg(cfg, num_clients, seed, groups)
    if cfg.name not in STRATEGIES:
        valid = sorted(STRATEGIES) + list(BASELINES)
        raise ValueError(f"unknown strategy {cfg.name!r}; valid names: {', '.join(valid)}")
    return STRATEGIES[cfg.name](cfg, num_clients, seed, groups)


__all__ = ["BASELINES", "STRATEGIES", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedOpt",
           "FedProx", "FedUMM", "FedYogi", "Scaffold", "Strategy", "build_strategy"]

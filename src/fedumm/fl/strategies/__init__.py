"""Server strategies, one algorithm per module, each with its client-side part where it has
one (``Strategy.client_hooks``), registered by name in :data:`fedumm.registry.STRATEGIES`.

A new strategy is one module with a :class:`Strategy` subclass and a registration
(``STRATEGIES.register("name", Cls)``); ``strategy.name`` then validates and builds it.
"""

from __future__ import annotations

from fedumm.config import StrategyConfig
from fedumm.fl.strategies.base import Strategy
from fedumm.fl.strategies.fedadagrad import FedAdagrad
from fedumm.fl.strategies.fedadam import FedAdam
from fedumm.fl.strategies.fedavg import FedAvg
from fedumm.fl.strategies.fedavgm import FedAvgM
from fedumm.fl.strategies.fedexp import FedExP
from fedumm.fl.strategies.fedopt import FedOpt
from fedumm.fl.strategies.fedprox import FedProx
from fedumm.fl.strategies.fedumm import FedUMM
from fedumm.fl.strategies.fedyogi import FedYogi
from fedumm.fl.strategies.scaffold import Scaffold
from fedumm.models.protocol import AdapterGroup
from fedumm.registry import STRATEGIES

for _cls in (FedAvg, FedUMM, FedProx, FedAvgM, FedExP, FedAdam, FedYogi, FedAdagrad,
             Scaffold):
    STRATEGIES.register(_cls.name, _cls)


def strategy_class(name: str) -> type[Strategy]:
    """The registered strategy ``name`` (ValueError naming the valid ones)."""
    return STRATEGIES.get(name)


def build_strategy(cfg: StrategyConfig, num_clients: int, seed: int,
                   groups: tuple[AdapterGroup, ...] = (), name: str | None = None) -> Strategy:
    """The strategy ``name`` (default ``cfg.name``) aggregating over the backbone's adapter
    ``groups``, configured by ``cfg``."""
    return strategy_class(name or cfg.name)(cfg, num_clients, seed, groups)


__all__ = ["FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedExP", "FedOpt", "FedProx", "FedUMM",
           "FedYogi", "Scaffold", "Strategy", "build_strategy", "strategy_class"]

"""FedOpt: Adaptive Federated Optimization.

Reddi et al., ICLR 2021, arXiv:2003.00295.

The server treats ``delta = mean(client models) - global model`` as a pseudo-gradient and feeds
it to a server optimizer (``step``), one tensor at a time. Subclasses: FedAvgM, FedAdam,
FedYogi, FedAdagrad.

Initial state: m and v start at 0 for every tensor, with no bias correction, as in the paper's
Algorithm 2. The paper allows any ``v_{-1} >= tau^2``; we pick ``v_{-1} = 0``, so the first
adaptive step is ``server_lr * (1 - b1) * delta / (sqrt(c) * |delta| + tau)`` with ``c = 1 - b2``
for Adam / Yogi and ``c = 1`` for Adagrad. (Flower's ``flwr.server.strategy`` FedAdam / FedYogi /
FedAdagrad also start v at zeros; its FedAdam additionally bias-corrects the learning rate,
which we do not.)

Server buffers are kept in float32 (float64 for float64 adapters) whatever the adapter dtype,
and are only touched for groups some client trained in the round.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedumm.config import StrategyConfig
from fedumm.fl.strategies.base import State, Strategy
from fedumm.fl.updates import ClientUpdate
from fedumm.models.protocol import AdapterGroup


class FedOpt(Strategy):
    """Server optimizer on the pseudo-gradient; subclasses implement ``step``."""

    name = "fedopt"
    keeps_client_mean = False  # a server optimizer step, not the mean

    def __init__(self, cfg: StrategyConfig, num_clients: int, seed: int,
                 groups: tuple[AdapterGroup, ...] = ()) -> None:
        super().__init__(cfg, num_clients, seed, groups)
        # buffers[name][key]: per-tensor optimizer state, e.g. buffers["m"][key].
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}

    def server_update(self, group: str, prev: State, avg: State,
                      updates: list[ClientUpdate]) -> State:
        out = {}
        for key, p in prev.items():
            dtype = torch.promote_types(p.dtype, torch.float32)
            x = p.to(dtype)
            out[key] = self.step(key, x, avg[key].to(dtype) - x).to(p.dtype)
        return out

    def step(self, key: str, prev: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new value of tensor ``key`` from its previous value and pseudo-gradient."""
        raise NotImplementedError

    def buffer(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor:
        """Buffer ``name`` of tensor ``key``; zeros shaped like ``like`` on first use."""
        per_key = self.buffers.setdefault(name, {})
        if key not in per_key:
            per_key[key] = torch.zeros_like(like)
        return per_key[key]

    def adaptive_step(self, key: str, prev: torch.Tensor, delta: torch.Tensor,
                      next_v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                      ) -> torch.Tensor:
        """Adam-style step shared by FedAdam / FedYogi / FedAdagrad.

        ``m = b1 m + (1 - b1) delta``; ``v = next_v(v, delta^2)``;
        ``x = prev + server_lr * m / (sqrt(v) + tau)``.
        """
        b1 = self.cfg.beta1
        m = b1 * self.buffer("m", key, delta) + (1.0 - b1) * delta
        v = next_v(self.buffer("v", key, delta), delta * delta)
        # New tensors rather than in-place updates: a state_dict taken earlier stays valid.
        self.buffers["m"][key], self.buffers["v"][key] = m, v
        return prev + self.server_lr * m / (v.sqrt() + self.cfg.tau)

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["buffers"] = {n: {k: t.clone() for k, t in b.items()} for n, b in self.buffers.items()}
        return d

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.buffers = {n: {k: t.clone() for k, t in b.items()}
                        for n, b in d.get("buffers", {}).items()}

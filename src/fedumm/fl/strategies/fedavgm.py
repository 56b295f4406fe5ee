"""FedAvgM: Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification.

Hsu et al., 2019, arXiv:1909.06335.

Server momentum on the pseudo-gradient: ``m = momentum * m + delta``,
``x = prev + server_lr * m`` (m starts at 0). With momentum 0 and server_lr 1 this is FedAvg.
"""

from __future__ import annotations

import torch

from fedumm.fl.strategies.fedopt import FedOpt


class FedAvgM(FedOpt):
    """FedAvg with heavy-ball server momentum."""

    name = "fedavgm"

    def step(self, key: str, prev: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m = self.cfg.momentum * self.buffer("m", key, delta) + delta
        self.buffers["m"][key] = m
        return prev + self.cfg.server_lr * m

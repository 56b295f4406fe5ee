"""FedAdam: Adam as the server optimizer of FedOpt.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295.

``m = b1 m + (1 - b1) delta``; ``v = b2 v + (1 - b2) delta^2``;
``x = prev + server_lr * m / (sqrt(v) + tau)``; m = v = 0 at the start, no bias correction.
"""

from __future__ import annotations

import torch

from fedumm.fl.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    """Adam on the pseudo-gradient (see ``FedOpt`` for the initial state)."""

    name = "fedadam"

    def step(self, key: str, prev: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        b2 = self.cfg.beta2
        return self.adaptive_step(key, prev, delta, lambda v, d2: b2 * v + (1.0 - b2) * d2)

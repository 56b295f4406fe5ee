"""FedProx: Federated Optimization in Heterogeneous Networks.

Li et al., MLSys 2020, arXiv:1812.06127.

The server aggregates as FedAvg. Clients minimise ``loss(w) + mu / 2 * ||w - w_global||^2``
over the adapter tensors they train, which keeps heterogeneous clients from drifting far from
the global adapters during their local steps.
"""

from __future__ import annotations

from fedumm.fl.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg whose clients add the proximal term ``prox_mu / 2 * ||w - w_global||^2``."""

    name = "fedprox"

    def client_config(self, rnd: int) -> dict:
        return {"prox_mu": float(self.cfg.mu)}

"""FedProx: Federated Optimization in Heterogeneous Networks.

Li et al., MLSys 2020, arXiv:1812.06127.

The server aggregates as FedAvg. Clients minimise ``loss(w) + mu / 2 * ||w - w_global||^2``
over the adapter tensors they train, which keeps heterogeneous clients from drifting far from
the global adapters during their local steps. The same term on the middle decoder layers only
is FedMLLM's layer-adaptive regulariser (``train.adaptive_prox``, beside any strategy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedumm.fl.client_hooks import ClientHook, LocalRound
from fedumm.fl.strategies.fedavg import FedAvg
from fedumm.models.protocol import DecoderLayers


class ProxTerm(ClientHook):
    """The proximal term ``mu / 2 * ||w - w_global||^2`` over the trained tensors, or over
    those of ``keys`` only."""

    def __init__(self, mu: float, keys: set[str] | None = None) -> None:
        self.mu = float(mu)
        self.keys = keys
        self.anchor: dict[str, torch.Tensor] = {}

    def begin(self, rnd: LocalRound) -> None:
        self.anchor = {k: rnd.start[k].to(p.device) for k, p in rnd.params.items()
                       if self.keys is None or k in self.keys}

    def loss(self, rnd: LocalRound) -> torch.Tensor | None:
        if self.mu <= 0 or not self.anchor:
            return None
        return 0.5 * self.mu * sum(((rnd.params[k] - a) ** 2).sum()
                                   for k, a in self.anchor.items())


def middle_layer_keys(keys: Sequence[str], decoder: DecoderLayers, skip: int) -> list[str]:
    """The adapter keys of the middle decoder layers ``skip <= l <= L-1-skip`` (FedMLLM's
    layer-adaptive regulariser). Raises ValueError when that range is empty for depth L."""
    lo, hi = skip, decoder.count - 1 - skip
    if lo > hi:
        raise ValueError(f"train.adaptive_prox_skip={skip} leaves no middle layer of the "
                         f"backbone's {decoder.count} decoder layers (needs skip <= "
                         f"{(decoder.count - 1) // 2})")
    out = []
    for k in keys:
        i = decoder.index(k)
        if i is not None and lo <= i <= hi:
            out.append(k)
    return out


class FedProx(FedAvg):
    """FedAvg whose clients add the proximal term ``prox_mu / 2 * ||w - w_global||^2``."""

    name = "fedprox"

    def client_config(self, rnd: int) -> dict:
        return {"prox_mu": float(self.cfg.mu)}

    @classmethod
    def client_hooks(cls, client_config: dict) -> list[ClientHook]:
        return [ProxTerm(client_config.get("prox_mu", 0.0))]

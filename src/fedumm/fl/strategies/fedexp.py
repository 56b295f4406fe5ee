"""FedExP: Speeding Up Federated Averaging via Extrapolation.

Jhunjhunwala, Wang and Joshi, ICLR 2023, arXiv:2301.09604.

FedAvg's step is the mean of the clients' updates. When clients disagree (label skew: each
holds one to three answers) the mean is much shorter than the updates it averages, and the
federation advances by about one client's progress per round. FedExP takes a server step
``eta * mean(delta)`` with an adaptive server learning rate (the paper's Algorithm 1)

    eta = max(1, sum_k p_k ||delta_k||^2 / (2 (||sum_k p_k delta_k||^2 + eps)))

``p_k`` the clients' aggregation weights (the paper's uniform ``1/M`` when clients hold equal
data), ``eps = strategy.tau`` (the paper tunes it in 1e-3 .. 1e-1). ``eta`` is 1 (FedAvg) when
the clients agree and grows as they diverge. It is computed per adapter group (clients train
different groups), over all of the group's LoRA factors as one vector, and logged per round
(``server_lr`` in the round record). The paper reports the mean of the last two iterates
against the oscillation extrapolation can cause; fedumm evaluates the last iterate.
"""

from __future__ import annotations

import torch

from fedumm.fl.strategies.base import State, Strategy
from fedumm.fl.updates import ClientUpdate


class FedExP(Strategy):
    """FedAvg with FedExP's extrapolated server step."""

    name = "fedexp"
    keeps_client_mean = False  # the step goes past the mean

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_eta: dict[str, float] = {}  # per group, the last round's server step size

    def server_update(self, group: str, prev: State, avg: State,
                      updates: list[ClientUpdate]) -> State:
        weights = self.group_weights(group, updates)
        total = sum(weights)
        dtype = {k: torch.promote_types(p.dtype, torch.float32) for k, p in prev.items()}
        mean_sq = sum(float((avg[k].to(dtype[k]) - p.to(dtype[k])).pow(2).sum())
                      for k, p in prev.items())
        each_sq = sum(w / total * sum(float((u.tensors[k].to(dtype[k]) - p.to(dtype[k]))
                                            .pow(2).sum()) for k, p in prev.items())
                      for u, w in zip(updates, weights, strict=True))
        eta = max(1.0, each_sq / (2.0 * (mean_sq + self.cfg.tau)))
        self.last_eta[group] = round(eta, 4)
        return {k: (p.to(dtype[k]) + eta * (avg[k].to(dtype[k]) - p.to(dtype[k]))).to(p.dtype)
                for k, p in prev.items()}

    def round_record(self) -> dict:
        out, self.last_eta = {"server_lr": dict(self.last_eta)}, {}
        return out

"""FedUMM quality-weighted aggregation of per-modality adapters (arXiv:2601.15390).

A client's weight for an adapter group is ``sum_m n_{k,m} * q_{k,m}`` over the modalities m
that train the group, where ``n_{k,m}`` is its number of training samples of modality m and
``q_{k,m}`` in [0, 1] the quality of its adapters on its own held-out samples of m
(``update.quality``; a missing entry counts as 0).

Why: FedAvg's ``n_k`` alone trusts big clients even when their data is noisy or
off-distribution. Multiplying by held-out quality down-weights clients whose adapters generalise
poorly on their own validation data. The weights are renormalised to sum to 1, so the aggregate
stays a convex combination of client adapters - the same scale as FedAvg, so learning rates need
no retuning.

Fallback: if every contributing client has quality 0 for a group (e.g. nobody held out data, or
the metric is not yet meaningful), quality carries no information and the group is averaged with
FedAvg weights instead of being left unchanged.
"""

from __future__ import annotations

from fedumm.fl.strategies.fedavg import FedAvg
from fedumm.fl.updates import ClientUpdate


class FedUMM(FedAvg):
    """FedAvg with weights ``sum_m n_{k,m} q_{k,m}`` and a FedAvg fallback at zero quality."""

    name = "fedumm"

    def client_weight(self, update: ClientUpdate, group: str) -> float:
        weight = 0.0
        # each count of a group (per modality; image inputs for an image encoder) times the
        # quality of its modality
        for m, key in zip(self.layout.modalities(group), self.layout.sample_keys(group),
                          strict=True):
            q = float(update.quality.get(m, 0.0))
            if not 0.0 <= q <= 1.0:  # NaN fails too
                raise ValueError(f"client {update.client_id}: quality[{m!r}] = {q} is not in "
                                 f"[0, 1]")
            weight += update.num_samples.get(key, 0) * q
        return weight

    def group_weights(self, group: str, updates: list[ClientUpdate]) -> list[float]:
        weights = super().group_weights(group, updates)
        if updates and sum(weights) == 0.0:
            return [FedAvg.client_weight(self, u, group) for u in updates]
        return weights

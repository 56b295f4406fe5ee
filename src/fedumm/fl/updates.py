"""What a client sends back after a round."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedumm.models.protocol import GENERATION, UNDERSTANDING

__all__ = ["GENERATION", "UNDERSTANDING", "ClientUpdate"]


@dataclass
class ClientUpdate:
    """One client's result for one round.

    ``tensors`` holds the adapter tensors *after* local training (values, not deltas) for the
    groups the client trained. ``num_samples`` and ``quality`` are per modality; ``quality`` is
    measured on the client's own held-out samples (0-1). ``extra`` carries algorithm state such
    as SCAFFOLD's control-variate delta (``extra["control_delta"]``).
    """

    client_id: int
    tensors: dict[str, torch.Tensor]
    num_samples: dict[str, int]
    quality: dict[str, float] = field(default_factory=dict)
    num_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    upload_bytes: int = 0

    def samples_for(self, modalities: tuple[str, ...]) -> int:
        """The client's training samples of ``modalities`` (those that train a group)."""
        return sum(self.num_samples.get(m, 0) for m in modalities)

"""The client-side parts of federated algorithms, as hooks the client trainer runs without
knowing which algorithm they serve (in the spirit of NVIDIA FLARE's ``PTFedProxLoss`` and
``PTScaffoldHelper``, or Flower's client mods).

A hook may decide which adapter tensors train, add a term to the loss, correct the gradients
before the optimizer step, and leave algorithm state in the update when the round ends. Each
strategy module gives its own (``Strategy.client_hooks``); the LoRA modes give theirs
(:mod:`fedumm.fl.lora_modes`). The trainer calls every hook's method in the order of the
list, so the order is part of the algorithm (a rank mask zeroes gradients before SCAFFOLD's
correction is added, as the trainer always did).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]


@dataclass
class LocalRound:
    """What a hook sees of one client's round: the tensors it trains (``params``, by key), the
    global adapters it started from, the client's state carried across rounds (a hook keeps
    its own entries there) and, once training ends, the step count."""

    params: dict[str, torch.nn.Parameter]
    start: State
    client_state: dict
    steps: int = 0
    extra: dict[str, State] = field(default_factory=dict)  # goes out in the update


class ClientHook:
    """A no-op hook; subclasses override what their algorithm needs."""

    def trains(self, key: str) -> bool:
        """Whether adapter tensor ``key`` trains this round (all by default)."""
        return True

    def begin(self, rnd: LocalRound) -> None:
        """Before the first step (the trained tensors are known)."""

    def loss(self, rnd: LocalRound) -> torch.Tensor | None:
        """A term added to the batch loss, or None."""
        return None

    def correct(self, rnd: LocalRound) -> None:
        """Change ``p.grad`` of the trained tensors in place, after backward."""

    def end(self, rnd: LocalRound, trained: State) -> None:
        """After the last step: ``trained`` are the adapter values the client sends; put
        algorithm state for the server in ``rnd.extra`` and for the client in
        ``rnd.client_state``."""

    def close(self) -> None:
        """After training, whether it ended or failed: undo what ``begin`` put on the shared
        model (a forward hook), so the next client and evaluation see the plain model."""

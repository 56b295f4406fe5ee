"""The LoRA-aware modes a config chooses, each decided here once: FFA-LoRA (``lora.aggregation=
ffa``: A keeps its shared initialisation) and heterogeneous ranks (``lora.client_ranks``,
HetLoRA). Each gives the client its hook (which tensors train, which rank components), the
server what it needs (keys it never aggregates, the rank a client's download is cut to); the
maths is in :mod:`fedumm.fl.lora_aggregation` and the rank stage of the pipeline in
:mod:`fedumm.fl.stages`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedumm.config import LoraSettings
from fedumm.fl.client_hooks import ClientHook, LocalRound
from fedumm.fl.lora_aggregation import (
    is_lora_a,
    is_lora_b,
    is_seeded,
    pad_ranks,
    truncate_ranks,
)

State = dict[str, torch.Tensor]


class FreezeA(ClientHook):
    """FFA-LoRA's client side: the randomly initialised factor of every LoRA module keeps its
    shared value (Linear's A, Embedding's B); the zero-initialised one trains."""

    def trains(self, key: str) -> bool:
        return not is_seeded(key)


def rank_masks(params: dict[str, torch.Tensor], rank: int | None) -> dict[str, torch.Tensor]:
    """0/1 gradient masks keeping the first ``rank`` components of each LoRA tensor (A's rows,
    B's columns); empty when the client trains the full rank."""
    masks = {}
    for k, p in params.items():
        full = p.shape[0] if is_lora_a(k) else p.shape[1] if is_lora_b(k) else None
        if full is None or rank is None or rank >= full:
            continue
        m = torch.zeros_like(p)
        if is_lora_a(k):
            m[:rank] = 1
        else:
            m[:, :rank] = 1
        masks[k] = m
    return masks


class RankMask(ClientHook):
    """A client of rank ``r_k < r`` trains the first ``r_k`` LoRA components only."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.masks: dict[str, torch.Tensor] = {}

    def begin(self, rnd: LocalRound) -> None:
        self.masks = rank_masks(dict(rnd.params), self.rank)

    def correct(self, rnd: LocalRound) -> None:
        for k, m in self.masks.items():
            if rnd.params[k].grad is not None:
                rnd.params[k].grad.mul_(m)


@dataclass(frozen=True)
class LoraMode:
    """The LoRA-aware choices of one run, from ``lora.*``."""

    ffa: bool
    client_ranks: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg: LoraSettings) -> LoraMode:
        return cls(cfg.aggregation == "ffa", tuple(cfg.client_ranks))

    @property
    def heterogeneous(self) -> bool:
        return bool(self.client_ranks)

    def rank_of(self, client_id: int) -> int | None:
        """Client ``client_id``'s LoRA rank when ranks differ (cycled over clients), else
        None (every client trains the full rank)."""
        if not self.client_ranks:
            return None
        return self.client_ranks[client_id % len(self.client_ranks)]

    def frozen(self) -> Callable[[str], bool]:
        """Keys the server never aggregates (no client trains them)."""
        return is_seeded if self.ffa else (lambda key: False)

    def client_hooks(self, client_id: int) -> list[ClientHook]:
        """This client's LoRA hooks: they run before the strategy's (a rank mask zeroes the
        gradient before a correction is added)."""
        hooks: list[ClientHook] = [FreezeA()] if self.ffa else []
        rank = self.rank_of(client_id)
        if rank is not None:
            hooks.append(RankMask(rank))
        return hooks

    def cut(self, state: State, client_id: int) -> State:
        """The global adapters as client ``client_id`` receives them (its rank only)."""
        rank = self.rank_of(client_id)
        return state if rank is None else truncate_ranks(state, rank)

    def restore(self, state: State, full: State) -> State:
        """A received (maybe cut) state at full rank, zero-padded to ``full``'s shapes."""
        return pad_ranks(state, full) if self.heterogeneous else state

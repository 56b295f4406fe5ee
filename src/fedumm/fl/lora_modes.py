"""The LoRA-aware modes a config chooses, each decided here once: FFA-LoRA (``lora.aggregation=
ffa``: A keeps its shared initialisation) and heterogeneous ranks (``lora.client_ranks``, with
the rule ``lora.het_aggregation`` and HetLoRA's optional rank self-pruning). Each gives the
client its hook (which tensors train, which rank components), the server what it needs (keys
it never aggregates, the rank a client's download is cut to, the rank rule); the maths is in
:mod:`fedumm.fl.lora_aggregation` and the rank stage of the pipeline in :mod:`fedumm.fl.stages`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedumm.config import LoraSettings
from fedumm.fl.client_hooks import ClientHook, LocalRound
from fedumm.fl.lora_aggregation import (
    STACK,
    ZEROPAD,
    is_lora_a,
    is_lora_b,
    is_seeded,
    lora_modules,
    pad_ranks,
    pruned_rank,
    tail_norm,
    truncate_ranks,
)

State = dict[str, torch.Tensor]
PRUNED_RANK = "hetlora_rank"  # client_state entry: a client's rank after HetLoRA's self-pruning


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


class SelfPrune(RankMask):
    """HetLoRA's rank self-pruning (Cho et al. 2024, arXiv:2401.06432), on top of the rank
    mask: a client of rank ``r`` (its configured ``r_k``, or what it pruned to in an earlier
    round, kept in its client state) trains on ``F_k(W_0 + B A) + lambda * ||B[:, floor(gamma
    r):r] A[floor(gamma r):r]||_F`` (:func:`tail_norm`, summed over its LoRA modules) and, if
    that tail norm is smaller after local training than in the adapters it received, prunes
    to ``floor(gamma r)``: the tail is zeroed in what it sends (the server zero-pads it, as
    for any lower rank) and it trains at the new rank from then on. The download is still cut
    at ``r_k``; the client drops the components past its pruned rank on receipt."""

    def __init__(self, rank: int, gamma: float, lam: float) -> None:
        super().__init__(rank)
        self.gamma, self.lam = gamma, lam
        self.modules: dict[str, tuple[str, str]] = {}
        self.before = 0.0

    def begin(self, rnd: LocalRound) -> None:
        self.rank = min(self.rank, int(rnd.client_state.get(PRUNED_RANK, self.rank)))
        self.modules = lora_modules(rnd.params)
        with torch.no_grad():  # truncation to the pruned rank
            for a, b in self.modules.values():
                rnd.params[a][self.rank:] = 0
                rnd.params[b][:, self.rank:] = 0
            self.before = float(tail_norm(rnd.params, self.modules, self.rank, self.gamma))
        super().begin(rnd)

    def loss(self, rnd: LocalRound) -> torch.Tensor | None:
        if not self.lam or not self.modules:
            return None
        return self.lam * tail_norm(rnd.params, self.modules, self.rank, self.gamma)

    def end(self, rnd: LocalRound, trained: State) -> None:
        after = float(tail_norm(trained, self.modules, self.rank, self.gamma))
        if self.modules and after < self.before:
            self.rank = pruned_rank(self.rank, self.gamma)
            for a, b in self.modules.values():  # the values sent: zero past the new rank
                trained[a][self.rank:] = 0
                trained[b][:, self.rank:] = 0
        rnd.client_state[PRUNED_RANK] = self.rank


@dataclass(frozen=True)
class LoraMode:
    """The LoRA-aware choices of one run, from ``lora.*``."""

    ffa: bool
    client_ranks: tuple[int, ...]
    het_aggregation: str = ZEROPAD  # how the server aggregates mixed ranks
    prune_gamma: float = 1.0  # HetLoRA's self-pruning decay factor (1: off)
    prune_lambda: float = 0.0  # and its regulariser's weight

    @classmethod
    def from_config(cls, cfg: LoraSettings) -> LoraMode:
        return cls(cfg.aggregation == "ffa", tuple(cfg.client_ranks),
                   cfg.het_aggregation if cfg.client_ranks else ZEROPAD,
                   cfg.hetlora_prune_gamma, cfg.hetlora_prune_lambda)

    @property
    def heterogeneous(self) -> bool:
        return bool(self.client_ranks)

    @property
    def restarts(self) -> bool:
        """FLoRA's stacking: each round's exact mean product is folded into the frozen
        weights and the LoRA modules start afresh."""
        return self.het_aggregation == STACK

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
        if rank is not None and self.prune_gamma < 1:
            hooks.append(SelfPrune(rank, self.prune_gamma, self.prune_lambda))
        elif rank is not None:
            hooks.append(RankMask(rank))
        return hooks

    def cut(self, state: State, client_id: int) -> State:
        """The global adapters as client ``client_id`` receives them (its rank only)."""
        rank = self.rank_of(client_id)
        return state if rank is None else truncate_ranks(state, rank)

    def restore(self, state: State, full: State) -> State:
        """A received (maybe cut) state at full rank, zero-padded to ``full``'s shapes."""
        return pad_ranks(state, full) if self.heterogeneous else state

"""How a run treats its clients, decided once from the config: federated (the strategy
aggregates one global model), or one of the two baselines users spell as strategy names:
``centralized`` (one client holding all the training data, FedAvg over it) and ``local``
(every client keeps its own adapters, nothing is exchanged).

What the server holds between rounds differs accordingly (:class:`Federation` or
:class:`Isolated`); the round loop asks it and never branches on the mode.
"""

from __future__ import annotations

from typing import Any

import torch

from fedumm.config import BASELINE_MODES, Config
from fedumm.fl.client_dp import ClientDP
from fedumm.fl.lora_aggregation import lora_modules, round_lora_errors
from fedumm.fl.lora_modes import LoraMode
from fedumm.fl.secagg import SecAggAbort, SecureRound, round_groups
from fedumm.fl.secure_sum import SecAggParties
from fedumm.fl.strategies import Strategy, build_strategy
from fedumm.fl.updates import ClientUpdate
from fedumm.models.lora import LoraAdapters
from fedumm.models.protocol import AdapterGroup

State = dict[str, torch.Tensor]
FL, CENTRALIZED, LOCAL = "fl", *BASELINE_MODES


class RoundAborted(RuntimeError):
    """The server could not aggregate a round (secure aggregation lost too many clients):
    the global model stays and the round record says why."""


def run_mode(cfg: Config) -> str:
    """``fl``, ``centralized`` or ``local``."""
    return cfg.strategy.name if cfg.strategy.name in BASELINE_MODES else FL


def num_clients(cfg: Config) -> int:
    return 1 if run_mode(cfg) == CENTRALIZED else cfg.clients


def strategy_name(cfg: Config) -> str:
    """The registered strategy the run uses: the baselines average with FedAvg."""
    return cfg.strategy.name if run_mode(cfg) == FL else "fedavg"


def strategy_for(cfg: Config, groups: tuple[AdapterGroup, ...]) -> Strategy:
    """The run's strategy, with the LoRA mode's frozen keys and rank rule."""
    strategy = build_strategy(cfg.strategy, num_clients(cfg), cfg.seed, groups,
                              name=strategy_name(cfg))
    lora = LoraMode.from_config(cfg.lora)
    strategy.frozen = lora.frozen()
    strategy.het_aggregation = lora.het_aggregation
    strategy.client_dp = ClientDP.from_config(cfg)  # privacy.client.*: clip and noise, or None
    return strategy


class Federation:
    """One global adapter state, aggregated by the strategy each round; with exact LoRA
    aggregation or FLoRA's stacking, the residuals folded into the frozen weights so far.

    Stacking (``lora.het_aggregation=stack``; Wang et al. 2024, arXiv:2409.05976) is exact
    aggregation with a restart: the round's exact mean product ``sum_k p_k B_k A_k`` (rank
    ``sum_k r_k``, :func:`~fedumm.fl.lora_aggregation.stack_factors`) is folded into the frozen
    weights, and the LoRA modules start the next round afresh, at the run's initialisation
    (``B A = 0``), as FLoRA merges the stacked adapter into the base model and its clients
    start new LoRA modules each round. A lower-rank client's truncated download then loses
    nothing."""

    counts_traffic = True  # adapters travel both ways

    def __init__(self, cfg: Config, strategy: Strategy, adapters: LoraAdapters,
                 initial: State) -> None:
        self.strategy, self.adapters = strategy, adapters
        lora = LoraMode.from_config(cfg.lora)
        self.rule = lora.het_aggregation
        self.exact = cfg.lora.folding is not None  # a residual is folded
        self.scaling = cfg.lora.alpha / cfg.lora.r
        self.modules = lora_modules(initial)
        # stacking's fresh LoRA modules: the run's initial factors
        self.fresh = {k: initial[k] for ab in self.modules.values() for k in ab} \
            if lora.restarts else {}
        self.residual: State = {}
        self.states = [dict(initial)]
        # secure aggregation (secagg.*): the strategy sees one summed update per round
        self.secagg = cfg.secagg if cfg.secagg.enabled else None
        self.seed = cfg.seed
        # the round's secure aggregation once opened, or why it could not be
        self.secure: SecureRound | str | None = None
        if hasattr(strategy, "init_state"):
            strategy.init_state(initial)

    def selected(self, rnd: int) -> list[int]:
        return self.strategy.sample_clients(rnd)

    def client_config(self, rnd: int) -> dict[str, Any]:
        return self.strategy.client_config(rnd)

    def participation(self, rnd: int) -> dict[str, Any]:
        """How round ``rnd``'s clients were found: online, sampled (skipped, and why)."""
        return self.strategy.draw(rnd).record()

    def source(self, client_id: int) -> int:
        """Which of :attr:`states` client ``client_id`` starts from."""
        return 0

    def absorb(self, rnd: int, updates: list[ClientUpdate], received: dict[int, State]
               ) -> dict[str, Any]:
        """Aggregate the round's updates; the round record's extra entries."""
        if not updates:
            return {}
        if self.secagg is not None:  # only the sum is revealed: nothing per client to measure
            return self._absorb_secure(rnd, updates, received)
        new = self.strategy.aggregate(rnd, self.states[0], updates)
        if self.fresh:  # stacking: the mean product goes into the residual, LoRA restarts
            new = {**new, **self.fresh}
        errors = round_lora_errors(
            self.strategy.layout, self.modules, new,
            [(received[u.client_id], u.tensors) for u in updates],
            lambda group, at: self.strategy.group_weights(group, [updates[i] for i in at]),
            self.scaling, self.residual if self.exact else None, self.rule)
        if self.exact and self.residual:
            self.adapters.fold_residuals(self.residual)
        self.states[0] = new
        return {**({"aggregation_error": errors} if errors else {}),
                **self.strategy.round_record()}

    def open_round(self, rnd: int, clients: list[int], parties: SecAggParties | None) -> None:
        """Before round ``rnd``'s clients train: secure aggregation's key stages with them
        (over ``parties``, the transport's; None: the clients are in this process)."""
        self.secure = None
        if self.secagg is None or not clients:
            return
        groups, _ = round_groups(self.strategy, self.states[0], [])
        try:
            self.secure = SecureRound(rnd, clients, self.states[0], groups, self.secagg,
                                      seed=self.seed, parties=parties)
        except SecAggAbort as exc:  # too few clients: the round is skipped when it ends
            self.secure = str(exc)

    def _absorb_secure(self, rnd: int, updates: list[ClientUpdate],
                       received: dict[int, State]) -> dict[str, Any]:
        """Secure aggregation of the round's updates (SecAgg+ or HE, :mod:`fedumm.fl.secagg`),
        then the strategy's server step on the one mean update. A client that was sent the
        round and sent nothing usable back (dropped out, late, rejected) took part in the key
        stages and is not asked for a masked input: the survivors' shares remove its masks."""
        secure = self.secure
        if secure is None or isinstance(secure, str):
            raise RoundAborted(secure or f"round {rnd}: secure aggregation was not opened")
        sent = {u.client_id for u in updates}
        dropped = sorted(set(received) - sent)
        everyone = [*updates, *(ClientUpdate(k, {}, {}) for k in dropped)]
        _, weights = round_groups(self.strategy, self.states[0], everyone)
        try:
            mean, rec = secure.finish(everyone, weights, dropped=dropped)
        except SecAggAbort as exc:
            raise RoundAborted(str(exc)) from exc
        finally:
            self.secure = None
        self.states[0] = self.strategy.aggregate(rnd, self.states[0], [mean])
        return {"secagg": rec, **self.strategy.round_record()}

    def evaluated(self) -> list[State]:
        return self.states[:1]

    def state_dict(self) -> dict[str, Any]:
        return {"states": self.states, "strategy": self.strategy.state_dict(),
                "residual": self.residual}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.states = d["states"]
        self.strategy.load_state_dict(d["strategy"])
        self.residual = dict(d.get("residual", {}))
        if self.residual:
            self.adapters.fold_residuals(self.residual)


class Isolated(Federation):
    """The ``local`` baseline: every client trains its own adapters from the same start and
    keeps them; nothing travels, nothing is aggregated; evaluation averages over clients."""

    counts_traffic = False

    def __init__(self, cfg: Config, strategy: Strategy, adapters: LoraAdapters,
                 initial: State, clients: int) -> None:
        super().__init__(cfg, strategy, adapters, initial)
        self.states = [dict(initial) for _ in range(clients)]

    def selected(self, rnd: int) -> list[int]:
        return list(range(len(self.states)))

    def client_config(self, rnd: int) -> dict[str, Any]:
        return {}

    def participation(self, rnd: int) -> dict[str, Any]:
        return {}

    def source(self, client_id: int) -> int:
        return client_id

    def absorb(self, rnd: int, updates: list[ClientUpdate], received: dict[int, State]
               ) -> dict[str, Any]:
        for u in updates:
            self.states[u.client_id] = {**self.states[u.client_id], **u.tensors}
        return {}

    def evaluated(self) -> list[State]:
        return self.states


def server_for(cfg: Config, strategy: Strategy, adapters: LoraAdapters, initial: State,
               clients: int) -> Federation:
    """What the server holds between rounds in this run's mode."""
    if run_mode(cfg) == LOCAL:
        return Isolated(cfg, strategy, adapters, initial, clients)
    return Federation(cfg, strategy, adapters, initial)

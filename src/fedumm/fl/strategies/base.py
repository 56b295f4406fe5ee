"""The server strategy interface, with per-adapter-group FedAvg as the default behaviour.

A round on the server is: ``sample_clients`` -> send the global adapters plus
``client_config`` -> clients train -> ``aggregate``. Aggregation runs separately for each adapter
group (vision, language, generation, alignment) because clients train different groups: a
client without understanding samples never updates the vision tower, so it must not pull the
vision adapters towards its stale copy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from fedumm.config import StrategyConfig
from fedumm.fl import sampling
from fedumm.fl.aggregate import select, weighted_mean
from fedumm.fl.client_dp import ClientDP
from fedumm.fl.client_hooks import ClientHook
from fedumm.fl.lora_aggregation import HETLORA, ZEROPAD, hetlora_mean
from fedumm.fl.robust import RuleSettings, robust_mean
from fedumm.fl.sampling import Draw
from fedumm.fl.updates import ClientUpdate
from fedumm.models.protocol import AdapterGroup, AdapterLayout

State = dict[str, torch.Tensor]


class Strategy:
    """Base strategy: client sampling, per-group weighted averaging and a server-update hook.

    Subclasses change one of ``client_config``, ``client_weight`` / ``group_weights`` or
    ``server_update``, and keep any server-side state in ``state_dict`` / ``load_state_dict``.

    Parameters
    ----------
    cfg
        The strategy section of the experiment config.
    num_clients
        How many clients exist (N).
    seed
        Seeds client sampling (together with the round number).
    groups
        The backbone's adapter groups (:attr:`Backbone.groups`): which group each adapter
        tensor belongs to and which modalities train it. Needed to aggregate.
    """

    name = "base"
    # the aggregate is the clients' weighted mean (exact LoRA aggregation can fold its
    # residual into the frozen weights); False for rules that move the server model elsewhere
    keeps_client_mean = True
    # the server learning rate when strategy.server_lr is not set (each rule's paper's value)
    default_server_lr = 1.0

    def __init__(self, cfg: StrategyConfig, num_clients: int, seed: int,
                 groups: tuple[AdapterGroup, ...] = ()) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.cfg = cfg
        self.num_clients = int(num_clients)
        self.seed = int(seed)
        self.layout = AdapterLayout(groups)
        # keys no client trains (FFA-LoRA's A): kept as they are, never expected in updates
        self.frozen: Callable[[str], bool] = lambda key: False
        # how clients' zero-padded LoRA factors average (lora.het_aggregation, set by the run
        # as ``frozen`` is): the weighted mean (zeropad; stack folds then restarts them), or
        # HetLoRA's sparsity weights per module
        self.het_aggregation = ZEROPAD
        # client-level DP (privacy.client, set by the run as ``frozen`` is:
        # ClientDP.from_config): uniform weights, updates clipped, the mean noised
        self.client_dp: ClientDP | None = None
        self._draw: tuple[int, Draw] | None = None  # the last round's participants

    @property
    def server_lr(self) -> float:
        """``strategy.server_lr``, or this rule's default when it is not set."""
        lr = self.cfg.server_lr
        return float(lr) if lr is not None else float(type(self).default_server_lr)

    # -- client side ---------------------------------------------------------------------------

    def sample_clients(self, rnd: int) -> list[int]:
        """Sorted ids of the clients that train in round ``rnd`` (none: the round is skipped).

        Uniform sampling with everyone online takes ``max(min_clients, clients_per_round or
        ceil(fraction * N))`` clients, at most N, without replacement from
        ``np.random.default_rng([seed, rnd])``; Poisson sampling and client availability are
        in :mod:`fedumm.fl.sampling`. Every draw depends only on (seed, round), so a resumed
        run picks the same clients as an uninterrupted one.
        """
        return self.draw(rnd).clients

    def draw(self, rnd: int) -> Draw:
        """Round ``rnd``'s participants with how many were online and sampled."""
        if self._draw is None or self._draw[0] != rnd:  # asked twice a round: draw once
            self._draw = (rnd, sampling.draw(self.cfg, self.num_clients, self.seed, rnd))
        return self._draw[1]

    def client_config(self, rnd: int) -> dict:
        """What clients receive besides the global adapters (nothing for FedAvg)."""
        return {}

    @classmethod
    def client_hooks(cls, client_config: dict) -> list[ClientHook]:
        """The strategy's client-side part for one round, from what the server sent
        (:meth:`client_config`): a loss term, a gradient correction, ... (none for FedAvg)."""
        return []

    # -- weights -------------------------------------------------------------------------------

    def client_weight(self, update: ClientUpdate, group: str) -> float:
        """A client's weight for one group: its samples that train the group (of its
        modalities; for an image encoder, the understanding samples holding their image)."""
        return float(update.samples_for(self.layout.sample_keys(group)))

    def group_weights(self, group: str, updates: list[ClientUpdate]) -> list[float]:
        """The weights of ``updates`` (all of which trained ``group``), one per update; under
        client-level DP 1 for each client with a positive weight (DP-FedAvg's sensitivity
        needs bounded weights, :mod:`fedumm.fl.client_dp`)."""
        weights = [self.client_weight(u, group) for u in updates]
        if self.client_dp is not None:
            return [1.0 if w > 0 else 0.0 for w in weights]
        return weights

    # -- aggregation ---------------------------------------------------------------------------

    def group_members(self, global_state: State, updates: list[ClientUpdate]
                      ) -> dict[str, tuple[list[str], list[ClientUpdate]]]:
        """Each adapter group's trainable keys of ``global_state`` (a group with none is
        left out) and the updates that trained it, in the state's order.

        Raises
        ------
        ValueError
            If an update has some but not all tensors of a group.
        """
        groups: dict[str, list[str]] = defaultdict(list)
        for key in global_state:
            groups[self.layout.group_of(key)].append(key)
        out = {}
        for group, all_keys in groups.items():
            keys = [k for k in all_keys if not self.frozen(k)]
            if not keys:
                continue
            trained = []
            for u in updates:
                have = sum(k in u.tensors for k in keys)
                if have and have != len(keys):
                    raise ValueError(f"client {u.client_id} sent {have} of the {len(keys)} "
                                     f"tensors of adapter group {group!r}")
                if have:
                    trained.append(u)
            out[group] = (keys, trained)
        return out

    def aggregate(self, rnd: int, global_state: State, updates: list[ClientUpdate]) -> State:
        """The new global adapter state after round ``rnd``.

        For each group, clients whose update lacks the group's tensors or whose weight is 0 are
        left out; a group no client contributed to keeps its previous tensors (the same objects).
        Otherwise the weighted mean goes through ``server_update``. Neither ``global_state`` nor
        the updates are modified.

        Raises
        ------
        ValueError
            If an update has some but not all tensors of a group, or tensors the global state
            does not have (both mean the client and server disagree on the adapter layout).
        """
        if not self.layout.groups:
            raise ValueError("this strategy was built without the backbone's adapter groups")
        for u in updates:
            unknown = sorted(u.tensors.keys() - global_state.keys())
            if unknown:
                raise ValueError(f"client {u.client_id} sent unknown adapter tensors {unknown}")
        if self.client_dp is not None:  # each update clipped as one vector over its groups
            updates = self.client_dp.clip_round(rnd, global_state, updates, self.frozen,
                                                self.draw(rnd).available)

        new = dict(global_state)
        for group, (keys, trained) in self.group_members(global_state, updates).items():
            weights = self.group_weights(group, trained)
            kept = [(u, w) for u, w in zip(trained, weights, strict=True) if w > 0]
            if not kept:
                continue
            prev = select(global_state, keys)
            avg = self.mean(keys, [u for u, _ in kept], [w for _, w in kept], prev)
            new.update(self.server_update(group, prev, avg, [u for u, _ in kept]))
        return new

    def mean(self, keys: list[str], updates: list[ClientUpdate], weights: list[float],
             prev: State | None = None) -> State:
        """The weighted mean of the updates' ``keys``. The LoRA tensors of lower-rank clients
        arrive zero-padded to the full rank (:class:`fedumm.fl.stages.Rank`), so this is the
        zero-padding rule as it is; with ``het_aggregation = "hetlora"`` each LoRA module's
        factors are averaged with HetLoRA's sparsity weights instead
        (:func:`fedumm.fl.lora_aggregation.hetlora_mean`). With ``strategy.robust`` set, its
        rule replaces the mean: ``prev`` (the group's previous value) plus the rule of the
        clients' updates (:func:`fedumm.fl.robust.robust_mean`); ``server_update`` then takes
        it as it takes the mean. With client-level DP (``client_dp``), the updates arrive
        clipped and the mean gets its Gaussian noise here, before ``server_update``."""
        if self.client_dp is not None and (self.cfg.robust != "none"
                                           or self.het_aggregation == HETLORA):
            raise ValueError("client-level DP noises the weighted mean; it cannot run with "
                             "strategy.robust or lora.het_aggregation=hetlora")
        if self.cfg.robust != "none":
            if prev is None:
                raise ValueError(f"strategy.robust={self.cfg.robust} needs the group's "
                                 "previous value (prev)")
            return robust_mean(self.cfg.robust, [select(u.tensors, keys) for u in updates],
                               weights, prev, RuleSettings.from_config(self.cfg))
        avg = weighted_mean([select(u.tensors, keys) for u in updates], weights)
        if self.het_aggregation == HETLORA:
            avg.update(hetlora_mean([u.tensors for u in updates], weights, keys))
        if self.client_dp is not None:
            avg = self.client_dp.add_noise(self.layout.group_of(keys[0]), avg, len(updates))
        return avg

    def server_update(self, group: str, prev: State, avg: State,
                      updates: list[ClientUpdate]) -> State:
        """A group's new value from its previous value and the clients' weighted mean.

        The base (FedAvg) takes the mean as it is. ``updates`` are the contributing clients.
        """
        return avg

    def round_record(self) -> dict:
        """Entries for the round's record in ``metrics.jsonl`` about the last ``aggregate``
        (none for FedAvg; e.g. FedExP's server step size per group); with client-level DP,
        ``client_dp``: the clip used, the fraction clipped, the noise std per group, epsilon."""
        return {"client_dp": self.client_dp.record()} if self.client_dp is not None else {}

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Server-side state as plain tensors / numbers (none for FedAvg; client-level DP's
        clip norm and accountant)."""
        d: dict = {"strategy": self.name}
        if self.client_dp is not None:
            d["client_dp"] = self.client_dp.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore what ``state_dict`` returned (from a strategy of the same kind)."""
        if d.get("strategy") != self.name:
            raise ValueError(f"state_dict is for strategy {d.get('strategy')!r}, "
                             f"not {self.name!r}")
        if self.client_dp is not None and "client_dp" in d:
            self.client_dp.load_state_dict(d["client_dp"])

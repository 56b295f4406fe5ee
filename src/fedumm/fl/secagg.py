"""Secure aggregation for the round loop: each client quantises its weighted update, SecAgg+
(:mod:`fedumm.fl.secure_sum`) sums them, and the server gets the weighted mean per adapter
group without ever holding one client's update.

What is summed. For adapter group g, client k with weight w_kg (``Strategy.group_weights``;
0 when k did not train g) masks the scaled update

    z_kg = s_kg (x_kg - r_g),        s_kg = w_kg / wbar_g,

x its trained values, r the global adapters the round started from, wbar_g the mean positive
weight of the round (public: weights come from the sample counts in the replies' meta). Over
the clients whose input counted (C) the server then has

    mean_g = r_g + sum_{k in C} z_kg / sum_{k in C} s_kg,

the strategies' weighted mean of the values, restricted to C. Dividing by the round's mean
weight keeps z at an update's own scale, so the clip range and the quantisation step act there.

Quantisation (deterministic, so the sum is exact). Each entry is clipped to [-c, c]
(``clip_range``, 8 as Flower) and rounded (half to even) to q = round((z + c) / D) in 0..R,
D = 2c / R, R = ``quantization_range`` (2^22 as Flower; even, so 0 maps to R / 2 exactly and
a client that did not train a group adds exactly 0 to it). |C| clients sum to at most |C| R,
which must stay below the modulus 2^32 (|C| <= 1023 at the default; refused otherwise), so
the integer sum S is exact and dequantises as

    sum_{k in C} z_k = S D - |C| c + e,      |e| <= |C| D / 2 per entry,

hence the mean is within |C| D / (2 sum_{k in C} s_kg) of the plain weighted mean (D / 2 =
c / R ~ 1.9e-6 when nobody dropped), up to float error, for entries that were not clipped.
Clipped entries are counted in the round record.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedumm.config import SecAggConfig
from fedumm.fl.he_sum import HESumRound
from fedumm.fl.secure_sum import (
    MODULUS_BITS,
    InProcessParties,
    SecAggAbort,
    SecAggParties,
    SecAggSite,
    SecureSum,
    SecureSumRound,
    neighbour_graph,
)
from fedumm.fl.strategies.base import Strategy
from fedumm.fl.updates import ClientUpdate

__all__ = ["Quantizer", "SecAggAbort", "SecureRound", "SecureSum", "client_input",
           "round_groups", "run_secure_sum", "secure_weighted_mean", "upload_per_client"]

State = dict[str, torch.Tensor]
AGGREGATE_ID = -1  # the client_id of the round's summed update


@dataclass(frozen=True)
class Quantizer:
    """Clip to +-``clip_range``, map to the integers 0..``steps`` (see the module docstring)."""

    clip_range: float = 8.0
    steps: int = 2**22

    def __post_init__(self) -> None:
        if self.steps < 2 or self.steps % 2:
            raise ValueError(f"quantization range must be even and >= 2 (0 maps to half of "
                             f"it), got {self.steps}")

    @property
    def step(self) -> float:
        return 2.0 * self.clip_range / self.steps

    def check(self, n: int) -> None:
        """Refuse a sum of ``n`` clients that could wrap around the modulus."""
        if n * self.steps >= 2**MODULUS_BITS:
            raise ValueError(f"secure aggregation: the sum of {n} clients' values of up to "
                             f"{self.steps} must fit in {MODULUS_BITS} bits; lower "
                             f"secagg.quantization_range to at most "
                             f"{(2**MODULUS_BITS - 1) // n} or take fewer clients per round")

    def quantize(self, z: np.ndarray) -> tuple[np.ndarray, int]:
        """(uint32 codes, how many entries were clipped) of the float vector ``z``."""
        if not np.isfinite(z).all():
            raise ValueError("secure aggregation: an update holds NaN or infinite values")
        c = self.clip_range
        clipped = np.clip(z, -c, c)
        codes = np.rint((clipped + c) * (self.steps / (2.0 * c)))
        return (np.minimum(codes, self.steps).astype(np.uint32),
                int(np.count_nonzero(clipped != z)))

    def dequantize_sum(self, total: np.ndarray, n: int) -> np.ndarray:
        """The float64 sum of ``n`` clients' values from the integer sum of their codes."""
        return total.astype(np.float64) * self.step - n * self.clip_range


def run_secure_sum(rnd: int, clients: Sequence[int], vector_of: Callable[[int], np.ndarray],
                   length: int, graph: Mapping[int, Sequence[int]], threshold: int, *,
                   dropped_before_shares: Collection[int] = (),
                   dropped_before_input: Collection[int] = (),
                   dropped_after_input: Collection[int] = ()) -> SecureSum:
    """One SecAgg+ round over the wire, in process: a :class:`SecAggSite` per client, a
    :class:`SecureSumRound`, and only messages between them. ``vector_of(k)`` is client k's
    uint32 input, asked for only from clients that send one. Clients drop after advertising
    keys (``dropped_before_shares``), after sharing them (``dropped_before_input``) or after
    sending their input (``dropped_after_input``). Raises :class:`SecAggAbort` when a stage
    is left with fewer than ``threshold`` clients."""
    ids = [int(k) for k in clients]
    drops = [frozenset(map(int, d)) for d in (dropped_before_shares, dropped_before_input,
                                              dropped_after_input)]
    if len(set(ids)) != len(ids) or any(d - set(ids) for d in drops) or \
            sum(map(len, drops)) != len(frozenset().union(*drops)):
        raise ValueError(f"secure aggregation: client ids {ids} must be distinct, and the "
                         f"dropped sets {[sorted(d) for d in drops]} disjoint subsets of them")
    sites = {k: SecAggSite(k) for k in ids}
    for k, site in sites.items():
        site.hold(rnd, lambda _plan, k=k: (vector_of(k), 0))
    parties = InProcessParties(sites, *drops)
    return SecureSumRound(rnd, ids, graph, threshold, length, parties).finish(ids)


def round_groups(strategy: Strategy, reference: State, updates: Sequence[ClientUpdate]
                 ) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
    """The adapter groups as :meth:`Strategy.aggregate` sees them: each group's trained keys
    of ``reference`` (frozen keys left out; groups without any left out) and each update's
    weight for it (``strategy.group_weights``; 0 where the update lacks the group)."""
    keys: dict[str, list[str]] = {}
    weights: dict[str, list[float]] = {}
    for group, (ks, trained) in strategy.group_members(reference, list(updates)).items():
        given = dict(zip(map(id, trained), strategy.group_weights(group, trained), strict=True))
        keys[group] = ks
        weights[group] = [float(given.get(id(u), 0.0)) for u in updates]
    return keys, weights


def client_input(tensors: State, start: State, plan: Mapping[str, Any]
                 ) -> tuple[np.ndarray, int]:
    """Client side of the mask stage: the scaled change z = s (x - start) of the trained
    ``tensors`` from the adapters the client started from, in the plan's order (zeros for a
    group it did not train), and how many entries were clipped. Quantised to uint32 codes
    when the plan has a quantiser (SecAgg+), float64 otherwise (HE). ``plan``: the round's
    public settings for this client (:meth:`SecureRound.plan_for`)."""
    scales = plan["scales"]
    parts = [(tensors[k].detach().to("cpu", torch.float64)
              - start[k].detach().to("cpu", torch.float64)).reshape(-1).numpy() * scales[g]
             if scales.get(g, 0.0) > 0 else np.zeros(start[k].numel())
             for g, k in plan["order"]]
    z = np.concatenate(parts) if parts else np.zeros(0)
    if "steps" not in plan:
        return z, 0
    return Quantizer(plan["clip_range"], plan["steps"]).quantize(z)


class SecureRound:
    """One round of secure aggregation, the server's side (see the module docstring).

    Opening it runs SecAgg+'s key stages with the round's ``clients`` over ``parties`` (a
    transport's; None: the clients live in this process, the local runtime, and their
    updates are handed to :meth:`finish`); with ``cfg.uses_he`` nothing happens before
    the clients train and ``parties`` must bring the server's HE context
    (:mod:`fedumm.fl.he_sum`). ``groups``: each adapter group's tensor keys
    (:func:`round_groups`); every update is taken relative to ``reference``, the global
    adapters of the round. ``seed`` draws the neighbour graph (with ``rnd``); keys and
    self-mask seeds are the OS's randomness. Raises :class:`SecAggAbort` when too few clients
    are left, ValueError when the round cannot be summed at all."""

    def __init__(self, rnd: int, clients: Sequence[int], reference: State,
                 groups: Mapping[str, Sequence[str]], cfg: SecAggConfig, *, seed: int,
                 parties: SecAggParties | None = None) -> None:
        ids = [int(k) for k in clients]
        n = len(ids)
        self.rnd, self.reference, self.clients, self.he = rnd, reference, ids, cfg.uses_he
        self.groups = {g: list(ks) for g, ks in groups.items()}
        self.order = [(g, k) for g in self.groups for k in self.groups[g]]
        self.length = sum(reference[k].numel() for _, k in self.order)
        self.parties = parties if parties is not None else \
            InProcessParties({k: SecAggSite(k) for k in ids})
        self.quant = Quantizer(cfg.clip_range, cfg.quantization_range)
        self.sum: SecureSumRound | HESumRound
        if self.he:
            context = getattr(parties, "he_context", None)
            if context is None:
                raise ValueError("secagg.method=he needs a transport whose sites hold FLARE's "
                                 "HE keys (runtime=flare-sim or flare-poc)")
            self.sum = HESumRound(rnd, ids, self.length, self.parties, context)
            return
        self.quant.check(n)
        self.holders, self.threshold = cfg.share_holders(n), cfg.threshold_count(n)
        if self.threshold > self.holders:
            raise ValueError(f"secure aggregation: threshold {self.threshold} exceeds the "
                             f"{self.holders} clients each client shares its secrets with "
                             f"(round of {n})")
        self.sum = SecureSumRound(rnd, ids, neighbour_graph(ids, cfg.neighbours, seed, rnd),
                                  self.threshold, self.length, self.parties)

    def plan_for(self, scales: Mapping[str, float]) -> dict[str, Any]:
        """What one client needs to form its input: the order of the tensors, its scale per
        group and, for SecAgg+, the quantiser (public: the scales follow from the sample
        counts)."""
        plan = {"order": [list(gk) for gk in self.order], "scales": dict(scales)}
        if not self.he:
            plan.update(clip_range=self.quant.clip_range, steps=self.quant.steps)
        return plan

    def finish(self, updates: Sequence[ClientUpdate], weights: Mapping[str, Sequence[float]],
               dropped: Collection[int] = ()) -> tuple[ClientUpdate, dict]:
        """The weighted mean per adapter group of the updates whose input counted, as ONE
        update, and the round's record.

        ``updates``: one per client of the round, in any order (the local runtime's carry
        their tensors; a real transport's only their sample counts and keys, the values stay
        on the clients); ``weights[g]``: one weight per update (0: it does not take part in
        g; :func:`round_groups`); ``dropped``: the clients that sent nothing usable (they are
        not asked for an input). The result holds the groups some counted client trained, its
        ``num_samples`` are those of the counted clients summed, ``upload_bytes`` every byte
        the clients sent the server."""
        n = len(updates)
        if not updates or any(len(weights[g]) != n for g in self.groups) or \
                sorted(u.client_id for u in updates) != sorted(self.clients):
            raise ValueError(f"secure aggregation: expected an update for each of the round's "
                             f"clients {sorted(self.clients)} and one weight per update for "
                             f"each group, got clients {[u.client_id for u in updates]} and "
                             f"weights of lengths { {g: len(weights[g]) for g in self.groups} }")
        positive = {g: [w for w in ws if w > 0] for g, ws in weights.items()}
        # s_kg = w_kg / mean positive weight of g (0 for clients that did not train g)
        scales = {g: [w / (sum(positive[g]) / len(positive[g])) if w > 0 else 0.0
                      for w in weights[g]] if positive[g] else [0.0] * n for g in self.groups}
        ids = [u.client_id for u in updates]
        mine = {k: {g: scales[g][i] for g in self.groups} for i, k in enumerate(ids)}
        if isinstance(self.parties, InProcessParties):  # the clients are in this process
            for u in updates:
                self.parties.sites[u.client_id].hold(
                    self.rnd, lambda plan, t=u.tensors: client_input(t, self.reference, plan))
        res = self.sum.finish([k for k in ids if k not in set(dropped)],
                              lambda k: {"plan": self.plan_for(mine[k])})
        counted = [i for i, k in enumerate(ids) if k in res.inputs]
        t0 = time.perf_counter()
        total = res.total if self.he else self.quant.dequantize_sum(res.total, len(counted))
        tensors, offset = {}, 0
        for g, k in self.order:
            ref, size = self.reference[k], self.reference[k].numel()
            mass = sum(scales[g][i] for i in counted)
            if mass > 0:
                mean = torch.from_numpy(total[offset:offset + size] / mass).reshape(ref.shape)
                tensors[k] = (ref.detach().to("cpu", torch.float64) + mean).to(ref.dtype)
            offset += size
        last = list(res.seconds)[-1]  # the server's own finishing work counts with it
        res.seconds[last] += time.perf_counter() - t0
        samples: dict[str, int] = defaultdict(int)
        for i in counted:
            for m, c in updates[i].num_samples.items():
                samples[m] += c
        record = {"clients": n,
                  **({"method": "he"} if self.he else
                     {"threshold": self.threshold, "share_holders": self.holders}),
                  "inputs": len(counted),
                  **{f"dropped_{when}": ks for when, ks in res.dropped.items()},
                  "length": self.length,
                  **({} if self.he else {"clipped": sum(int(a.get("clipped", 0))
                                                        for a in res.answers.values())}),
                  "bytes": {s: {"up": up, "down": down} for s, (up, down) in res.traffic.items()},
                  "seconds": {s: round(v, 6) for s, v in res.seconds.items()}}
        upd = ClientUpdate(AGGREGATE_ID, tensors, dict(samples),
                           num_steps=sum(updates[i].num_steps for i in counted),
                           upload_bytes=sum(up for up, _ in res.traffic.values()))
        return upd, record


def secure_weighted_mean(rnd: int, updates: Sequence[ClientUpdate], reference: State,
                         groups: Mapping[str, Sequence[str]],
                         weights: Mapping[str, Sequence[float]], cfg: SecAggConfig, *,
                         seed: int, dropped_before_shares: Collection[int] = (),
                         dropped_before_input: Collection[int] = (),
                         dropped_after_input: Collection[int] = ()
                         ) -> tuple[ClientUpdate, dict]:
    """:class:`SecureRound` in one call, every client in this process: the weighted mean per
    adapter group of ``updates`` whose input counted, and the round's record. Clients drop as
    in :func:`run_secure_sum`; an input that does not count is one that dropped before
    sending it.

    The round loop does the same in two steps, the key stages before the clients train::

        secure = SecureRound(rnd, selected, global_state, groups, cfg.secagg, seed=cfg.seed)
        ... the clients train ...
        groups, weights = round_groups(strategy, global_state, updates)
        mean, record = secure.finish(updates, weights, dropped=...)
        new_state = strategy.aggregate(rnd, global_state, [mean])  # its server step

    ``strategy.aggregate`` of the one mean update is that mean per group (its weight is its
    summed samples), then the strategy's ``server_update``."""
    ids = [u.client_id for u in updates]
    drops = [frozenset(map(int, d)) for d in (dropped_before_shares, dropped_before_input,
                                              dropped_after_input)]
    parties = InProcessParties({k: SecAggSite(k) for k in ids}, *drops)
    secure = SecureRound(rnd, ids, reference, groups, cfg, seed=seed, parties=parties)
    return secure.finish(updates, weights)


def upload_per_client(record: Mapping) -> list[int]:
    """What each of a round's clients sent the server under SecAgg+, from the round's
    :func:`secure_weighted_mean` record: every stage's bytes up (public keys, encrypted
    shares, masked vectors, unmasking shares), split evenly over the round's clients (a
    deployment sends these instead of the update payloads)."""
    total = sum(int(stage["up"]) for stage in record["bytes"].values())
    n = int(record["clients"])
    return [total // n + (1 if i < total % n else 0) for i in range(n)]

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

import numpy as np
import torch

from fedumm.config import SecAggConfig
from fedumm.fl.secure_sum import (
    MODULUS_BITS,
    SecAggAbort,
    SecAggClient,
    SecAggServer,
    neighbour_graph,
)
from fedumm.fl.strategies.base import Strategy
from fedumm.fl.updates import ClientUpdate

__all__ = ["Quantizer", "SecAggAbort", "SecureSum", "round_groups", "run_secure_sum",
           "secure_weighted_mean", "upload_per_client"]

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


@dataclass
class SecureSum:
    """What one SecAgg+ round gives the server: the sum of U3's vectors, and its cost."""

    total: np.ndarray  # uint32, mod 2^32
    inputs: frozenset[int]  # U3: the clients whose vector is in the total
    traffic: dict[str, list[int]]  # stage -> [bytes up, bytes down]
    seconds: dict[str, float]


def run_secure_sum(rnd: int, clients: Sequence[int], vector_of: Callable[[int], np.ndarray],
                   length: int, graph: Mapping[int, Sequence[int]], threshold: int, *,
                   dropped_before_shares: Collection[int] = (),
                   dropped_before_input: Collection[int] = (),
                   dropped_after_input: Collection[int] = ()) -> SecureSum:
    """One SecAgg+ round, in process: a :class:`SecAggClient` per client, a
    :class:`SecAggServer`, and only messages between them. ``vector_of(k)`` is client k's
    uint32 input, asked for only from clients that send one. Clients drop after advertising
    keys (``dropped_before_shares``), after sharing them (``dropped_before_input``) or after
    sending their input (``dropped_after_input``). Raises :class:`SecAggAbort` when a stage
    is left with fewer than ``threshold`` clients."""
    ids = [int(k) for k in clients]
    drops = [set(map(int, d)) for d in (dropped_before_shares, dropped_before_input,
                                        dropped_after_input)]
    if len(set(ids)) != len(ids) or any(d - set(ids) for d in drops) or \
            sum(map(len, drops)) != len(set().union(*drops)):
        raise ValueError(f"secure aggregation: client ids {ids} must be distinct, and the "
                         f"dropped sets {[sorted(d) for d in drops]} disjoint subsets of them")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    server = SecAggServer(rnd, graph, threshold, length)
    parties = {k: SecAggClient(k, rnd, graph[k], threshold) for k in ids}
    routed = server.receive_keys([parties[k].advertise_keys() for k in ids])
    alive = [k for k in ids if k not in drops[0]]
    inbox = server.receive_shares([parties[k].share_keys(routed[k]) for k in alive])
    seconds["key_agreement"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    alive = [k for k in alive if k not in drops[1]]
    request = server.receive_masked([parties[k].masked_input(vector_of(k), inbox[k])
                                     for k in alive])
    seconds["masking"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    alive = [k for k in alive if k not in drops[2]]
    total = server.unmask([parties[k].unmask(request) for k in alive])
    seconds["unmasking"] = time.perf_counter() - t0
    return SecureSum(total, request.inputs, server.traffic, seconds)


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


def secure_weighted_mean(rnd: int, updates: Sequence[ClientUpdate], reference: State,
                         groups: Mapping[str, Sequence[str]],
                         weights: Mapping[str, Sequence[float]], cfg: SecAggConfig, *,
                         seed: int, dropped_before_shares: Collection[int] = (),
                         dropped_before_input: Collection[int] = (),
                         dropped_after_input: Collection[int] = ()
                         ) -> tuple[ClientUpdate, dict]:
    """The weighted mean per adapter group of the updates whose input counted, computed with
    SecAgg+ (see the module docstring), as ONE update, and the round's record.

    ``groups``: each group's tensor keys; ``weights[g]``: one weight per update (0: the update
    does not take part in g); both from :func:`round_groups`. Every update's values are
    taken relative to ``reference``, the global adapters of the round. ``seed`` draws the
    neighbour graph (with ``rnd``); the keys and self-mask seeds are the OS's randomness. The
    result holds the groups some counted client trained, its ``num_samples`` are those of the
    counted clients summed, ``upload_bytes`` every byte the clients sent the server. Dropped
    clients as in :func:`run_secure_sum`; an input that does not count is one that dropped
    before sending it. Raises :class:`SecAggAbort` with too few clients left.

    The round loop, once the pipeline has received the updates::

        groups, weights = round_groups(strategy, global_state, updates)
        mean, record = secure_weighted_mean(rnd, updates, global_state, groups, weights,
                                            cfg.secagg, seed=cfg.seed)
        new_state = strategy.aggregate(rnd, global_state, [mean])  # its server step

    ``strategy.aggregate`` of the one mean update is that mean per group (its weight is its
    summed samples), then the strategy's ``server_update``."""
    n = len(updates)
    if not updates or any(len(weights[g]) != n for g in groups):
        raise ValueError(f"secure aggregation: expected updates and one weight per update for "
                         f"each group, got {n} updates and weights of lengths "
                         f"{ {g: len(weights[g]) for g in groups} }")
    quant = Quantizer(cfg.clip_range, cfg.quantization_range)
    quant.check(n)
    ids = [u.client_id for u in updates]
    holders, t = cfg.share_holders(n), cfg.threshold_count(n)
    if t > holders:
        raise ValueError(f"secure aggregation: threshold {t} exceeds the {holders} clients "
                         f"each client shares its secrets with (round of {n})")
    positive = {g: [w for w in ws if w > 0] for g, ws in weights.items()}
    # s_kg = w_kg / mean positive weight of g (0 for clients that did not train g)
    scales = {g: [w / (sum(positive[g]) / len(positive[g])) if w > 0 else 0.0
                  for w in weights[g]] if positive[g] else [0.0] * n for g in groups}
    order = [(g, k) for g in groups for k in groups[g]]
    length = sum(reference[k].numel() for _, k in order)
    clipped = [0]

    def vector_of(cid: int) -> np.ndarray:  # runs "on" client cid: its own update only
        i = ids.index(cid)
        upd = updates[i]
        parts = [(upd.tensors[k].detach().to("cpu", torch.float64)
                  - reference[k].detach().to("cpu", torch.float64)).reshape(-1).numpy()
                 * scales[g][i] if scales[g][i] > 0 else np.zeros(reference[k].numel())
                 for g, k in order]
        codes, c = quant.quantize(np.concatenate(parts) if parts else np.zeros(0))
        clipped[0] += c
        return codes

    res = run_secure_sum(rnd, ids, vector_of, length,
                         neighbour_graph(ids, cfg.neighbours, seed, rnd), t,
                         dropped_before_shares=dropped_before_shares,
                         dropped_before_input=dropped_before_input,
                         dropped_after_input=dropped_after_input)
    counted = [i for i, k in enumerate(ids) if k in res.inputs]
    t0 = time.perf_counter()
    total = quant.dequantize_sum(res.total, len(counted))
    tensors, offset = {}, 0
    for g, k in order:
        ref, size = reference[k], reference[k].numel()
        mass = sum(scales[g][i] for i in counted)
        if mass > 0:
            mean = torch.from_numpy(total[offset:offset + size] / mass).reshape(ref.shape)
            tensors[k] = (ref.detach().to("cpu", torch.float64) + mean).to(ref.dtype)
        offset += size
    res.seconds["unmasking"] += time.perf_counter() - t0
    samples: dict[str, int] = defaultdict(int)
    for i in counted:
        for m, c in updates[i].num_samples.items():
            samples[m] += c
    record = {"clients": n, "threshold": t, "share_holders": holders,
              "inputs": len(counted),
              "dropped_before_shares": sorted(dropped_before_shares),
              "dropped_before_input": sorted(dropped_before_input),
              "dropped_after_input": sorted(dropped_after_input),
              "length": length, "clipped": clipped[0],
              "bytes": {s: {"up": up, "down": down} for s, (up, down) in res.traffic.items()},
              "seconds": {s: round(v, 6) for s, v in res.seconds.items()}}
    upd = ClientUpdate(AGGREGATE_ID, tensors, dict(samples),
                       num_steps=sum(updates[i].num_steps for i in counted),
                       upload_bytes=sum(up for up, _ in res.traffic.values()))
    return upd, record


def upload_per_client(record: Mapping) -> list[int]:
    """What each of a round's clients sent the server under SecAgg+, from the round's
    :func:`secure_weighted_mean` record: every stage's bytes up (public keys, encrypted
    shares, masked vectors, unmasking shares), split evenly over the round's clients (a
    deployment sends these instead of the update payloads)."""
    total = sum(int(stage["up"]) for stage in record["bytes"].values())
    n = int(record["clients"])
    return [total // n + (1 if i < total % n else 0) for i in range(n)]

"""LoRA-aware aggregation: what averaging A and B separately gets wrong, and three fixes.

A LoRA module adds ``scaling * B @ A`` to a frozen weight. Averaging the clients' A and B
separately gives ``mean(B) @ mean(A)``, which is not ``mean(B_k @ A_k)``; the difference grows
with heterogeneity. This module holds the pure maths (states are ``dict[str, Tensor]`` with
PEFT's key names: ``<module>.lora_A.weight`` (r x in) and ``<module>.lora_B.weight`` (out x r)
for Linear layers; ``<module>.lora_embedding_A`` (r x num) and ``lora_embedding_B`` (dim x r)
for Embedding layers, whose update is the transpose, ``(B A)^T``; every mode covers both):

* :func:`aggregation_error`: ``||mean_k(B_k A_k) - B A|| / ||mean_k(B_k A_k)||`` over a set of
  modules (Frobenius norms summed over modules), for any aggregated state;
* ``exact`` (FedEx-LoRA, Singhal et al. 2024, arXiv:2410.09432): A and B are averaged as
  usual and the residual ``mean_k(B_k A_k) - mean(B) mean(A)`` (scaled) is folded into the
  frozen weight, so the model equals the average of the clients' models; its cost is one
  dense residual per adapted layer on the way down (:func:`exact_residuals`);
* ``ffa`` (FFA-LoRA, Sun et al. 2024, arXiv:2403.12313): the factor PEFT seeds at random
  (Linear's A, Embedding's B: :func:`is_seeded`) stays at its shared initialisation and only
  the other trains and travels, so averaging it is exact (``B A`` is linear in each factor)
  and the upload halves;
* heterogeneous ranks (HetLoRA, Cho et al. 2024, arXiv:2401.06432): client k trains the first
  ``r_k`` rank components; its tensors travel truncated (:func:`truncate_ranks`) and are
  zero-padded back (:func:`pad_ranks`); each rank component is averaged over the clients that
  have it (:func:`rank_weighted_mean`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedumm.models.protocol import AdapterLayout

State = dict[str, torch.Tensor]
# PEFT's factor pairs, (A suffix, B suffix): the update is B @ A with A (r x in) and B (out x r)
# for Linear layers (A initialised at random, B at zero), and (B @ A)^T for Embedding layers,
# whose lora_embedding_A (r x num_embeddings) starts at zero and lora_embedding_B (dim x r) at
# random: the roles of the initialisations are swapped, the shapes' rank axes are not.
LINEAR = (".lora_A.weight", ".lora_B.weight")
EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")
PAIRS = (LINEAR, EMBEDDING)


def is_lora_a(key: str) -> bool:
    """A factor whose rank components are its rows (``A`` of ``B @ A``)."""
    return any(key.endswith(a) for a, _ in PAIRS)


def is_lora_b(key: str) -> bool:
    """A factor whose rank components are its columns (``B`` of ``B @ A``)."""
    return any(key.endswith(b) for _, b in PAIRS)


def is_seeded(key: str) -> bool:
    """The factor PEFT initialises at random (Linear's A, Embedding's B): the one FFA-LoRA
    keeps at its shared initialisation, so that the other one's average is exact."""
    return key.endswith(LINEAR[0]) or key.endswith(EMBEDDING[1])


def lora_modules(keys) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A key, B key), for every module with both in ``keys``."""
    keys = set(keys)
    out = {}
    for k in sorted(keys):
        for a, b in PAIRS:
            if k.endswith(a) and k[:-len(a)] + b in keys:
                out[k[:-len(a)]] = (k, k[:-len(a)] + b)
    return out


def _product(state: State, a: str, b: str) -> torch.Tensor:
    """The module's weight update ``B @ A`` in the shape of its weight (an embedding's is
    transposed: num_embeddings x dim)."""
    p = state[b].double() @ state[a].double()
    return p.T if a.endswith(EMBEDDING[0]) else p


def mean_products(states: Sequence[State], weights: Sequence[float],
                  modules: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``sum_k w_k B_k A_k / sum_k w_k`` per module (float64)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("mean_products: the weights sum to zero")
    out = {}
    for m, (a, b) in modules.items():
        acc = None
        for s, w in zip(states, weights, strict=True):
            p = _product(s, a, b) * (float(w) / total)
            acc = p if acc is None else acc + p
        out[m] = acc
    return out


def aggregation_error(states: Sequence[State], weights: Sequence[float], aggregated: State,
                      modules: dict[str, tuple[str, str]], residual: State | None = None,
                      target: dict[str, torch.Tensor] | None = None) -> float:
    """Relative Frobenius error of ``aggregated``'s ``B A`` (plus ``residual[m]``, an unscaled
    product folded beside it) against the clients' weighted mean of ``B_k A_k``, over
    ``modules`` (0.0 when the mean product is zero). ``target``: that mean, if known."""
    target = mean_products(states, weights, modules) if target is None else target
    num = den = 0.0
    for m, (a, b) in modules.items():
        model = _product(aggregated, a, b)
        if residual is not None:
            model = model + residual[m].double()
        num += float(((target[m] - model) ** 2).sum())
        den += float((target[m] ** 2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def exact_residuals(states: Sequence[State], weights: Sequence[float], aggregated: State,
                    modules: dict[str, tuple[str, str]], scaling: float,
                    target: dict[str, torch.Tensor] | None = None) -> State:
    """Per module, what to add to the frozen weight (out x in) so that frozen + scaling * B A
    of ``aggregated`` equals the clients' weighted mean model: ``scaling * (mean_k(B_k A_k) -
    B A)`` (float32). ``target``: the mean product, if known."""
    target = mean_products(states, weights, modules) if target is None else target
    return {m: (scaling * (target[m] - _product(aggregated, a, b))).float()
            for m, (a, b) in modules.items()}


# --------------------------------------------------------------------------- ranks

def truncate_ranks(state: State, rank: int) -> State:
    """The first ``rank`` components of every LoRA tensor (A's rows, B's columns); other
    tensors unchanged."""
    out = {}
    for k, v in state.items():
        if is_lora_a(k):
            out[k] = v[:rank].contiguous()
        elif is_lora_b(k):
            out[k] = v[:, :rank].contiguous()
        else:
            out[k] = v
    return out


def pad_ranks(state: State, full: State) -> State:
    """LoRA tensors zero-padded back to the shapes of ``full`` (the inverse of truncation)."""
    out = {}
    for k, v in state.items():
        want = full[k].shape
        if (is_lora_a(k) or is_lora_b(k)) and tuple(v.shape) != tuple(want):
            padded = torch.zeros(want, dtype=v.dtype)
            if is_lora_a(k):
                padded[:v.shape[0]] = v
            else:
                padded[:, :v.shape[1]] = v
            out[k] = padded
        else:
            out[k] = v
    return out


def rank_of(state: State) -> int | None:
    """The LoRA rank a (possibly truncated) state carries (None without LoRA tensors)."""
    for k, v in state.items():
        if is_lora_a(k):
            return int(v.shape[0])
    return None


def rank_weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                       ranks: Sequence[int], key: str) -> torch.Tensor:
    """Weighted mean of zero-padded LoRA tensors where each rank component is averaged over
    the clients that train it (a client of rank r_k has components 0 .. r_k - 1)."""
    first = tensors[0]
    axis = 0 if is_lora_a(key) else 1
    r_full = first.shape[axis]
    acc = torch.zeros(first.shape, dtype=torch.float64)
    norm = torch.zeros(r_full, dtype=torch.float64)
    for t, w, r in zip(tensors, weights, ranks, strict=True):
        acc += t.double() * float(w)
        norm[:r] += float(w)
    shape = (-1, 1) if axis == 0 else (1, -1)
    scale = torch.where(norm > 0, 1.0 / norm.clamp(min=1e-300), torch.zeros_like(norm))
    return (acc * scale.view(shape)).to(first.dtype)


# --------------------------------------------------------------------------- per round

def round_lora_errors(layout: AdapterLayout, modules: dict[str, tuple[str, str]],
                      new: State, clients: Sequence[tuple[State, State]],
                      weights_of: Callable[[str, list[int]], list[float]],
                      scaling: float, residual: State | None = None) -> dict[str, float]:
    """Per adapter group with LoRA layers, the aggregation error of ``new`` (the global
    adapters after the round) against the weighted mean of the contributing clients' ``B_k
    A_k``. ``clients``: per update, (the adapters it started from, the tensors it sent);
    ``weights_of(group, positions)``: the strategy's weights of the updates at those positions
    (all of which trained the group). With ``residual`` (exact aggregation: the residuals
    folded so far, by module), this round's residual is added to it in place and the error is
    that of the folded model (~0)."""
    out = {}
    for group in layout.names:
        mods = {m: ab for m, ab in modules.items() if layout.group_of(ab[0]) == group}
        trained = [i for i, (_, sent) in enumerate(clients)
                   if any(k in sent for ab in mods.values() for k in ab)]
        if not mods or not trained:
            continue
        weights = weights_of(group, trained)
        if sum(weights) <= 0:
            continue
        states = [{**clients[i][0], **clients[i][1]} for i in trained]
        target = mean_products(states, weights, mods)
        effective = None
        if residual is not None:
            this_round = exact_residuals(states, weights, new, mods, scaling, target)
            for m, r in this_round.items():
                residual[m] = residual.get(m, 0) + r
            effective = {m: r / scaling for m, r in this_round.items()}
        out[group] = aggregation_error(states, weights, new, mods, effective, target)
    return out

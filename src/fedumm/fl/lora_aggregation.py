"""LoRA-aware aggregation: what averaging A and B separately gets wrong, and the fixes.

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
* heterogeneous ranks (``lora.client_ranks``): client k trains the first ``r_k`` rank
  components; its tensors travel truncated (:func:`truncate_ranks`) and are zero-padded back
  (:func:`pad_ranks`). Three rules then aggregate them (``lora.het_aggregation``):

  - ``zeropad`` (the baseline FLoRA compares against, Wang et al. 2024, arXiv:2409.05976):
    the plain weighted mean of the zero-padded A and B, with the strategy's weights;
  - ``hetlora`` (HetLoRA, Cho et al. 2024, arXiv:2401.06432): the same mean with HetLoRA's
    sparsity weights ``||B_k A_k||_F / sum_j ||B_j A_j||_F`` (:func:`hetlora_weights`,
    :func:`hetlora_mean`); its clients may prune their rank (:func:`tail_norm`,
    :func:`pruned_rank`);
  - ``stack`` (FLoRA): the exact sum ``sum_k p_k B_k A_k`` as one LoRA of rank ``sum_k r_k``
    (:func:`stack_factors`), folded into the frozen weights; the LoRA modules restart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from fedumm.fl.aggregate import weighted_mean
from fedumm.models.protocol import AdapterLayout

State = dict[str, torch.Tensor]
# lora.het_aggregation: how the zero-padded tensors of clients of different ranks aggregate
ZEROPAD, HETLORA, STACK = "zeropad", "hetlora", "stack"
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


# --------------------------------------------------------------------------- rank rules

def lora_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||B A||_F`` without forming ``B A``: ``sqrt(<B^T B, A A^T>)`` from two r x r Gram
    matrices (the same for an embedding's transposed product). Differentiable, with a zero
    gradient where the product is zero (a LoRA starting at ``B = 0``)."""
    sq = ((b.T @ b) * (a @ a.T)).sum()
    return torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), sq.new_zeros(()))


def hetlora_weights(states: Sequence[State], weights: Sequence[float], a: str, b: str
                    ) -> list[float]:
    """HetLoRA's sparsity-weighted aggregation weights for one LoRA module (Cho et al. 2024,
    arXiv:2401.06432, Fig. 2): ``p_k = ||S_k|| / Z`` with ``||S_k|| = ||Delta W_k||_F =
    ||B_k A_k||_F``, the Frobenius norm of client k's reconstructed LoRA update (its trained,
    zero-padded factors), and ``Z = sum_j ||S_j||``. Sample counts do not enter: ``weights``
    (the strategy's) only say which clients take part (``w_k > 0``). The paper writes one
    weight matrix; each adapted module is one such matrix here, with its own weights. Where
    every norm is zero the strategy's weights are returned, normalised."""
    norms = [float(lora_norm(s[a].double(), s[b].double())) if w > 0 else 0.0
             for s, w in zip(states, weights, strict=True)]
    z = sum(norms)
    if z <= 0:
        total = float(sum(weights))
        return [float(w) / total for w in weights]
    return [n / z for n in norms]


def hetlora_mean(states: Sequence[State], weights: Sequence[float], keys) -> State:
    """HetLoRA's aggregate of zero-padded factors: per module with both factors in ``keys``,
    ``A = sum_k p_k A_k`` and ``B = sum_k p_k B_k`` with ``p_k`` from
    :func:`hetlora_weights`; other keys are left out (the caller averages them)."""
    out: State = {}
    for a, b in lora_modules(keys).values():
        p = hetlora_weights(states, weights, a, b)
        out.update(weighted_mean([{a: s[a], b: s[b]} for s in states], p))
    return out


def stack_factors(states: Sequence[State], weights: Sequence[float], a: str, b: str,
                  ranks: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking (Wang et al. 2024, arXiv:2409.05976) for one module:
    ``A = [p_1 A_1; ...; p_K A_K]`` (rows stacked, ``sum_k r_k x in``) and ``B = [B_1, ...,
    B_K]`` (columns stacked, ``out x sum_k r_k``), ``p_k = w_k / sum_j w_j``, so that ``B A =
    sum_k p_k B_k A_k`` exactly: a LoRA of rank ``sum_k r_k`` (float64). ``ranks``: each
    client's ``r_k`` (its first components; by default all the tensor has)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("stack_factors: the weights sum to zero")
    rs = [s[a].shape[0] for s in states] if ranks is None else list(ranks)
    a_stack = torch.cat([s[a][:r].double() * (float(w) / total)
                         for s, w, r in zip(states, weights, rs, strict=True)], dim=0)
    b_stack = torch.cat([s[b][:, :r].double() for s, r in zip(states, rs, strict=True)], dim=1)
    return a_stack, b_stack


def pruned_rank(rank: int, gamma: float) -> int:
    """HetLoRA's self-pruned rank ``max(1, floor(gamma r_k))`` (``gamma < 1`` its decay
    factor); also where the tail that :func:`tail_norm` penalises starts."""
    return max(1, math.floor(gamma * rank + 1e-9))


def tail_norm(state: Mapping[str, torch.Tensor], modules: dict[str, tuple[str, str]],
              rank: int, gamma: float) -> torch.Tensor:
    """HetLoRA's rank self-pruning regulariser (Cho et al. 2024, arXiv:2401.06432):
    ``sum_m ||B_m[:, floor(gamma r):r] A_m[floor(gamma r):r, :]||_F``, the norm of the last
    rank components of a client of rank ``r``, summed over ``modules`` (differentiable)."""
    lo = pruned_rank(rank, gamma)
    total = None
    for a, b in modules.values():
        n = lora_norm(state[a][lo:rank], state[b][:, lo:rank])
        total = n if total is None else total + n
    return total if total is not None else torch.zeros(())


# --------------------------------------------------------------------------- per round

def rule_targets(states: Sequence[State], weights: Sequence[float],
                 modules: dict[str, tuple[str, str]], rule: str = ZEROPAD
                 ) -> dict[str, torch.Tensor]:
    """Per module, the mean product a rank rule's aggregate stands for (float64): ``sum_k p_k
    B_k A_k`` with the strategy's weights (``zeropad``; ``stack``, as the product of the
    stacked factors, :func:`stack_factors`) or HetLoRA's own (``hetlora``, per module)."""
    if rule == HETLORA:
        return {m: mean_products(states, hetlora_weights(states, weights, a, b), {m: (a, b)})[m]
                for m, (a, b) in modules.items()}
    if rule == STACK:
        out = {}
        for m, (a, b) in modules.items():
            a_stack, b_stack = stack_factors(states, weights, a, b)
            out[m] = _product({a: a_stack, b: b_stack}, a, b)
        return out
    return mean_products(states, weights, modules)


def round_lora_errors(layout: AdapterLayout, modules: dict[str, tuple[str, str]],
                      new: State, clients: Sequence[tuple[State, State]],
                      weights_of: Callable[[str, list[int]], list[float]],
                      scaling: float, residual: State | None = None, rule: str = ZEROPAD
                      ) -> dict[str, float]:
    """Per adapter group with LoRA layers, the aggregation error of ``new`` (the global
    adapters after the round) against the mean of the contributing clients' ``B_k A_k`` that
    the rank ``rule`` averages (:func:`rule_targets`: the strategy's weights, HetLoRA's under
    ``hetlora``). ``clients``: per update, (the adapters it started from, the tensors it sent);
    ``weights_of(group, positions)``: the strategy's weights of the updates at those positions
    (all of which trained the group). With ``residual`` (the residuals folded so far, by
    module: exact aggregation, and ``stack``, whose ``new`` holds restarted LoRA modules), this
    round's residual is added to it in place and the error is that of the folded model
    (~0)."""
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
        target = rule_targets(states, weights, mods, rule)
        effective = None
        if residual is not None:
            this_round = exact_residuals(states, weights, new, mods, scaling, target)
            for m, r in this_round.items():
                residual[m] = residual.get(m, 0) + r
            effective = {m: r / scaling for m, r in this_round.items()}
        out[group] = aggregation_error(states, weights, new, mods, effective, target)
    return out

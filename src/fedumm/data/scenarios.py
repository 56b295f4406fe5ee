"""Multimodal-heterogeneity scenarios of FedMLLM (arXiv 2411.14717), applied to a partition.

A partition (see :mod:`fedumm.data.partition`) decides which samples each client holds; the
scenarios here then restrict what a client holds, in two senses:

* input modalities, as in FedMLLM: an understanding sample has an image and, where the data has
  one, a text modality (``Sample.context``). ``missing_modality`` (per sample),
  ``cross_modal_clients`` (image-only and text-only clients) and ``hybrid_modality_clients``
  (each client lacks each modality with probability q) give a per-sample mask of what is
  missing; samples stay where the partition put them.
* tasks, unique to unified models: a sample's task is ``"understanding"`` (VQA-style) or
  ``"generation"`` (GenEval-style text-to-image). ``single_modality_clients`` (the task split:
  understanding-only and generation-only clients) and ``hybrid_clients`` (each client lacks each
  task with probability q) move samples of a task a client lacks to clients that have it, so
  that every sample still lands on exactly one client.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

__all__ = [
    "BOTH_MISSING",
    "COMPLETE",
    "GENERATION",
    "IMAGE_MISSING",
    "MODALITIES",
    "TEXT_MISSING",
    "UNDERSTANDING",
    "hybrid_clients",
    "missing_modality",
    "modality_counts",
    "single_modality_clients",
]

UNDERSTANDING = "understanding"
GENERATION = "generation"
MODALITIES = (UNDERSTANDING, GENERATION)

# Values of a per-sample modality mask (bit flags: both missing is IMAGE | TEXT).
COMPLETE = 0
IMAGE_MISSING = 1
TEXT_MISSING = 2
BOTH_MISSING = 3


def _understanding_mask(modality: Sequence[str], parts: Sequence[np.ndarray]) -> np.ndarray:
    """Boolean array, True where a sample is an understanding sample; validates the inputs."""
    mod = np.asarray(list(modality), dtype=object)
    bad = sorted({str(m) for m in mod.tolist()} - set(MODALITIES))
    if bad:
        raise ValueError(f"unknown modality value(s) {bad}; expected one of {list(MODALITIES)}")
    n = len(mod)
    for k, p in enumerate(parts):
        p = np.asarray(p)
        if p.size and (p.min() < 0 or p.max() >= n):
            raise ValueError(f"client {k} holds indices outside [0, {n}) of the modality list")
    return mod == UNDERSTANDING


def _reassign(
    parts: Sequence[np.ndarray], is_und: np.ndarray, holds: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Keep on each client only the modalities it holds and move the rest to holders.

    ``holds`` is a ``(K, 2)`` bool array (column 0 understanding, column 1 generation). Moved
    samples, shuffled by ``rng`` so that no holder gets a contiguous run of the source order,
    go one at a time to the holder with the fewest samples (lowest index on ties): this keeps
    client sizes as even as the kept data allows and is deterministic for a given seed.
    """
    kept: list[list[int]] = []
    pools: list[list[int]] = [[], []]
    for k, p in enumerate(parts):
        p = np.asarray(p, dtype=np.int64)
        col = np.where(is_und[p], 0, 1)
        keep = holds[k, col]
        kept.append(p[keep].tolist())
        for j in (0, 1):
            pools[j].extend(p[~keep & (col == j)].tolist())
    for j in (0, 1):
        if not pools[j]:
            continue
        holders = np.flatnonzero(holds[:, j])
        if holders.size == 0:  # callers ensure this cannot happen; guard against misuse
            raise ValueError(f"no client holds {MODALITIES[j]} data but such samples exist")
        heap = [(len(kept[k]), int(k)) for k in holders]
        heapq.heapify(heap)
        for i in rng.permutation(np.asarray(sorted(pools[j]), dtype=np.int64)).tolist():
            size, k = heapq.heappop(heap)
            kept[k].append(i)
            heapq.heappush(heap, (size + 1, k))
    return [np.sort(np.asarray(b, dtype=np.int64)) for b in kept]


def missing_modality(num_samples: int, rate: float, seed: int) -> np.ndarray:
    """FedMLLM's per-sample missing-modality mask: each sample drops its image with probability
    ``rate`` and, independently, its text with probability ``rate`` (so both can be missing).

    Returns
    -------
    np.ndarray
        ``int8`` array of length ``num_samples`` with values :data:`COMPLETE`,
        :data:`IMAGE_MISSING`, :data:`TEXT_MISSING` or :data:`BOTH_MISSING`.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    image = rng.random(num_samples) < rate
    text = rng.random(num_samples) < rate
    return (image * IMAGE_MISSING + text * TEXT_MISSING).astype(np.int8)


def _client_mask(parts: Sequence[np.ndarray], num_samples: int,
                 per_client: Sequence[int]) -> np.ndarray:
    mask = np.full(num_samples, COMPLETE, dtype=np.int8)
    for p, value in zip(parts, per_client, strict=True):
        mask[np.asarray(p, dtype=np.int64)] = value
    return mask


def cross_modal_clients(parts: Sequence[np.ndarray], num_samples: int, image_only: int,
                        seed: int) -> np.ndarray:
    """FedMLLM's cross-modal scenario as a per-sample mask: ``image_only`` of the K clients
    (chosen by the seeded rng) hold their samples' images only, the others their texts only."""
    k_total = len(parts)
    if not 0 <= image_only <= k_total:
        raise ValueError(f"image_only must be in [0, {k_total}], got {image_only}")
    chosen = set(np.random.default_rng(seed).choice(k_total, size=image_only,
                                                    replace=False).tolist())
    return _client_mask(parts, num_samples,
                        [TEXT_MISSING if k in chosen else IMAGE_MISSING for k in range(k_total)])


def hybrid_modality_clients(parts: Sequence[np.ndarray], num_samples: int, q: float,
                            seed: int) -> np.ndarray:
    """FedMLLM's hybrid scenario as a per-sample mask: each client holds the image modality and,
    independently, the text modality with probability ``1 - q``; a client drawn to hold
    neither holds both (as a complete client), so every client can train."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    lacks = np.random.default_rng(seed).random((len(parts), 2)) < q
    values = [COMPLETE if lack_i and lack_t else IMAGE_MISSING * lack_i + TEXT_MISSING * lack_t
              for lack_i, lack_t in lacks.tolist()]
    return _client_mask(parts, num_samples, values)


def single_modality_clients(
    parts: Sequence[np.ndarray],
    modality: Sequence[str],
    num_understanding_clients: int,
    seed: int,
) -> list[np.ndarray]:
    """FedMLLM's single-modality scenario: each client holds one modality only.

    ``num_understanding_clients`` (m) clients, chosen by the seeded rng, keep only
    understanding samples, the other ``K - m`` only generation samples. Samples of the other
    modality are moved to clients of the right kind, smallest client first.

    Raises
    ------
    ValueError
        If m is outside ``[0, K]``, if m == 0 while understanding samples exist, or if m == K
        while generation samples exist (those samples would have nowhere to go).
    """
    k_total = len(parts)
    m = num_understanding_clients
    if not 0 <= m <= k_total:
        raise ValueError(f"num_understanding_clients must be in [0, {k_total}], got {m}")
    is_und = _understanding_mask(modality, parts)
    n_und = sum(int(is_und[np.asarray(p, dtype=np.int64)].sum()) for p in parts)
    n_gen = sum(len(p) for p in parts) - n_und
    if m == 0 and n_und:
        raise ValueError(
            f"num_understanding_clients=0 but the partition has {n_und} understanding samples"
        )
    if m == k_total and n_gen:
        raise ValueError(
            f"all {k_total} clients are understanding-only but the partition has {n_gen} "
            "generation samples"
        )
    rng = np.random.default_rng(seed)
    und_clients = rng.choice(k_total, size=m, replace=False)
    holds = np.zeros((k_total, 2), dtype=bool)
    holds[:, 1] = True
    holds[und_clients, 0] = True
    holds[und_clients, 1] = False
    return _reassign(parts, is_und, holds, rng)


def hybrid_clients(
    parts: Sequence[np.ndarray], modality: Sequence[str], q: float, seed: int
) -> list[np.ndarray]:
    """FedMLLM's hybrid scenario: each client lacks each modality with probability ``q``.

    For every client and modality an independent draw decides whether the client holds it
    (probability ``1 - q``). Two deterministic fixes follow: a client left with no modality
    keeps the one it has more samples of (understanding on ties), and a modality left with no
    holder goes to the client with the most samples of it (lowest index on ties), which keeps
    its other modality too. Samples of modalities a client lacks move to holders, smallest
    client first. ``q == 0`` returns the input partition (sorted); ``q == 1`` leaves each
    client with its majority modality.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    k_total = len(parts)
    is_und = _understanding_mask(modality, parts)
    rng = np.random.default_rng(seed)
    holds = rng.random((k_total, 2)) >= q
    n_und = np.array([c[UNDERSTANDING] for c in modality_counts(parts, modality)], dtype=np.int64)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    counts = np.stack([n_und, sizes - n_und], axis=1)  # (K, 2), columns as in ``holds``
    for k in np.flatnonzero(~holds.any(axis=1)):
        holds[k, 0 if counts[k, 0] >= counts[k, 1] else 1] = True
    for j in (0, 1):
        if k_total and not holds[:, j].any():
            holds[int(np.argmax(counts[:, j])), j] = True
    return _reassign(parts, is_und, holds, rng)


def modality_counts(parts: Sequence[np.ndarray], modality: Sequence[str]) -> list[dict[str, int]]:
    """Per client, ``{"understanding": n_u, "generation": n_g}``."""
    is_und = _understanding_mask(modality, parts)
    out = []
    for p in parts:
        n_und = int(is_und[np.asarray(p, dtype=np.int64)].sum())
        out.append({UNDERSTANDING: n_und, GENERATION: len(p) - n_und})
    return out

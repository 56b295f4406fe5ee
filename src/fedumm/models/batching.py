"""Padding token sequences into batches (shared by training, evaluation and pretraining)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedumm.data.records import ImageRef, Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING


def split_tasks(samples: Sequence[Sample], drop_text: Sequence[bool] | None
                ) -> tuple[list[Sample], list[tuple[Sample, bool]]]:
    """A batch's understanding samples, and its generation samples each with whether its
    prompt is dropped (the unconditional branch of classifier-free guidance)."""
    drop = list(drop_text) if drop_text is not None else [False] * len(samples)
    und = [s for s in samples if s.task == UNDERSTANDING]
    gen = [(s, d) for s, d in zip(samples, drop, strict=True) if s.task == GENERATION]
    return und, gen


def pad_sequences(seqs: Sequence[Sequence[int]], left: bool, pad_id: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (B, longest); ``left`` pads at the start (prompts end aligned),
    with ``pad_id``."""
    n = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(n - len(s), n) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(list(s))
        mask[i, sl] = 1
    return ids, mask


def label_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probability of each row's supervised tokens (``labels`` != -100, in the
    causal-LM convention: position t predicts label t + 1), what a mean cross-entropy loss
    over those tokens averages."""
    logp = logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * keep).sum(1)


def candidate_log_likelihoods(backbone, logits_of: Callable[[dict], torch.Tensor],
                              images: Sequence[np.ndarray | None], questions: Sequence[str],
                              candidates: Sequence[str], batch_size: int) -> np.ndarray:
    """(N, C) log-likelihood of each candidate answer per question for a chat backbone: its
    ``collate`` gives the understanding part of a batch (``labels`` marking the answer) and
    ``logits_of`` that part's teacher-forced logits, in eval mode: the answers scored as in
    training."""
    with backbone.evaluating():
        out = np.zeros((len(questions), len(candidates)), dtype=np.float64)
        for s in range(0, len(questions), batch_size):
            refs = [None if im is None else ImageRef(array=im) for im in images[s:s + batch_size]]
            for j, cand in enumerate(candidates):
                u = backbone.collate([Sample(id=f"q{s + i}", task=UNDERSTANDING, text=q, image=r,
                                             answer=cand)
                                      for i, (q, r) in enumerate(zip(questions[s:s + batch_size],
                                                                     refs, strict=True))]
                                     ).parts[UNDERSTANDING]
                ll = label_log_likelihood(logits_of(u), u["labels"])
                out[s:s + len(refs), j] = ll.double().cpu().numpy()
    return out

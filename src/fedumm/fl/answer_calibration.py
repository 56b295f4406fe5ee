"""The answer head calibrated against a client's own answers while it trains: the client-side
part that keeps federated LoRA from collapsing under label skew, where each client holds
one to three answers (the pathological split of McMahan et al. 2017).

A client that sees only "top left" learns, with a plain softmax, to push every other answer's
logit down: the federated mean of such updates forgets what each client does not hold. Both
rules below change the softmax of the local loss only; the model is evaluated, and answers,
with its plain head.

* ``fedrs``: FedRS, restricted softmax (Li & Zhan, "FedRS: Federated Learning with
  Restricted Softmax for Label Distribution Non-IID Data", KDD 2021): the logits of the
  classes a client has no sample of are scaled by ``alpha`` in [0, 1] (0: left out of the
  softmax; 1: plain training), so the client does not learn to suppress them.
* ``fedlc``: FedLC, logit calibration (Zhang et al., "Federated Learning with Label
  Distribution Skew via Logits Calibration", ICML 2022): every class's logit is lowered by
  ``tau * n_c^(-1/4)``, n_c the client's count of class c (absent classes: by ``tau * 1e2``,
  as if seen 1e-8 times), so rare local classes get a larger margin and absent ones none.

Classes here are the answer *tokens* the backbone's understanding loss supervises (an
answer's words and its end token, :meth:`Backbone.answer_token_ids`), counted over the
client's training answers. The class set is the task's answer tokens, which the server
sends (:func:`answer_space`: those of its held-out answers, plus the client's own): the rest
of the vocabulary is not an answer the client could have held, and keeps the plain softmax
(calibrating every vocabulary token lets the words no answer uses drift up, and the model
answers "yes" to "where" questions). Both rules work for any backbone that names its answer head
(``Backbone.answer_head``: the module whose output is the text-vocabulary logits), and for
answers of several tokens. The adjustment is a forward hook on that head, present only while
the client trains (removed when training ends, or fails).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

import torch

from fedumm.data.records import Sample
from fedumm.data.scenarios import UNDERSTANDING
from fedumm.fl.client_hooks import ClientHook, LocalRound
from fedumm.models.protocol import Backbone

METHODS = ("fedrs", "fedlc")
ANSWER_SPACE = "answer_space"  # client_config key: the task's answer token ids, from the server
_ABSENT_COUNT = 1e-8  # FedLC's count for a class the client never saw: a margin of tau * 100


def answer_token_counts(backbone: Backbone, samples: Sequence[Sample]) -> Counter[int]:
    """How often each token id is supervised over the understanding answers of ``samples``."""
    answers = [s.answer for s in samples if s.task == UNDERSTANDING and s.answer is not None]
    counts: Counter[int] = Counter()
    for ids in backbone.answer_token_ids(answers) if answers else []:
        counts.update(ids)
    return counts


def answer_space(backbone: Backbone, samples: Sequence[Sample]) -> list[int]:
    """The sorted token ids of the understanding answers of ``samples`` (the server's held-out
    data): the classes the clients calibrate."""
    return sorted(answer_token_counts(backbone, samples))


def check_backbone(backbone: Backbone, method: str) -> None:
    """Refuse a backbone that cannot be calibrated, before any training."""
    if method not in METHODS:
        raise ValueError(f"train.answer_calibration={method!r}: expected one of {METHODS}")
    missing = [a for a in ("answer_head", "answer_token_ids") if not hasattr(backbone, a)]
    if missing:
        raise ValueError(f"train.answer_calibration={method} needs a backbone with "
                         f"{' and '.join(missing)} (backbone.kind={backbone.kind} has not)")


class AnswerCalibration(ClientHook):
    """The local loss's softmax over the answer head, calibrated by the client's own answer
    token counts (see the module docstring)."""

    def __init__(self, backbone: Backbone, counts: Counter[int], method: str,
                 alpha: float = 0.5, tau: float = 1.0,
                 space: Collection[int] | None = None) -> None:
        check_backbone(backbone, method)
        self.backbone = backbone
        self.counts = counts
        # the classes: the task's answer tokens and the client's own (None: the vocabulary)
        self.space = None if space is None else set(space) | set(counts)
        self.method = method
        self.alpha = alpha
        self.tau = tau
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._adjust: torch.Tensor | None = None  # built at the first forward (vocab, device)

    def adjustment(self, vocab: int) -> torch.Tensor:
        """(vocab,) the factor (fedrs) or the offset (fedlc) applied to each token's logit;
        tokens outside the class set keep theirs (factor 1, offset 0)."""
        n = torch.full((vocab,), _ABSENT_COUNT, dtype=torch.float64)
        for tok, c in self.counts.items():
            if tok < vocab:
                n[tok] = c
        present = n >= 1
        classes = torch.ones(vocab, dtype=torch.bool)
        if self.space is not None:
            classes = torch.zeros(vocab, dtype=torch.bool)
            classes[[t for t in self.space if t < vocab]] = True
        if self.method == "fedrs":
            return torch.where(present | ~classes, torch.ones_like(n),
                               torch.full_like(n, self.alpha))
        return torch.where(classes, -self.tau * n.pow(-0.25), torch.zeros_like(n))

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor
              ) -> torch.Tensor:
        if self._adjust is None or self._adjust.shape[0] != output.shape[-1]:
            self._adjust = self.adjustment(output.shape[-1]).to(output.device, output.dtype)
        return output * self._adjust if self.method == "fedrs" else output + self._adjust

    def begin(self, rnd: LocalRound) -> None:
        self.close()
        if self.counts:  # a client without understanding answers trains as it would
            self._handle = self.backbone.answer_head.register_forward_hook(self._hook)

    def end(self, rnd: LocalRound, trained: dict[str, torch.Tensor]) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

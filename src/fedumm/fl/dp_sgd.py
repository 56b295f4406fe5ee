"""Sample-level DP-SGD inside each client (Abadi et al. 2016, arXiv:1607.00133), with Opacus.

The privacy unit is one training sample: a question with its image, or a caption with its
image. Only the adapter tensors train (the backbone is frozen), so only their gradients are
privatised. A step:

1. **Poisson sampling.** Each of the client's ``n`` training samples joins a batch with
   probability ``q = batch_size / n`` (1 when the batch size is at least ``n``), independently
   at every step, ``ceil(n / batch_size)`` steps an epoch, as the trainer's fixed-size batches
   have (Opacus' ``DPDataLoader`` samples so, with ``q = 1 / steps``). This is the sampling
   the accountant's analysis (the sampled Gaussian mechanism) assumes; the trainer's shuffled
   fixed-size batches would need the usual approximation, so under DP the trainer draws
   Poisson batches instead (:func:`poisson_batches`, from the same seeded generator). A batch
   may be empty: the step is then noise alone, and it is still counted.
2. **Per-sample gradients by micro-batching.** Each sample's loss alone
   (``backbone.collate([s])`` and ``backbone.loss``, exactly the trainer's loss on a batch of
   one) and its gradient, stacked as ``p.grad_sample`` (shape ``[B, *p.shape]``) on every
   trained tensor. Opacus' hook-based ``GradSampleModule`` needs every trainable layer's batch
   dimension to be the sample dimension, and its ``functorch`` mode a loss that ``vmap`` can
   trace; neither is promised by the backbones (a Python processor inside ``collate``,
   sequences padded per batch, a flow-matching loss that draws its own noise), so
   micro-batching is the one path that serves every backbone and both losses. It costs one
   forward and backward per sample, and memory for ``B`` gradients of the adapters.
   Each sample's loss is its own mean over its tokens; the batch's gradient is the mean over
   samples, so every sample weighs the same (plain training weighs the understanding loss by
   tokens across the batch).
3. **Clip, sum, noise, step**: Opacus' :class:`~opacus.optimizers.DPOptimizer` around the
   trainer's own optimizer (AdamW or SGD): each sample's gradient clipped to
   ``max_grad_norm``, summed, Gaussian noise of std ``noise_multiplier * max_grad_norm`` added
   (its generator seeded from (seed, round, client), on the adapters' device), divided by the
   expected batch size ``q * n``. ``train.grad_clip`` does not clip again: the per-sample clip
   replaces it. The client hooks' loss terms (a proximal term, HetLoRA's tail norm) hold
   parameters only, no data: their gradient is added after the noise, and the hooks'
   gradient corrections (SCAFFOLD, rank masks) run on the privatised gradient, as
   post-processing.
4. **Accounting.** Opacus' ``RDPAccountant``, one per client, steps once per optimizer step
   with ``(noise_multiplier, q)``; its history lives in the client's ``client_state``
   (``dp_sgd_accountant``), so the client's epsilon accumulates over the rounds it took part
   in. The update's metrics carry :data:`DP_EPSILON`, :data:`DP_DELTA` (``privacy.delta``, or
   ``1 / n``) and :data:`DP_NOISE`. The training losses are *not* reported under DP (they are
   computed from the samples and would leave the client outside the guarantee); the held-out
   quality is measured on the client's validation samples, which are not training samples.
   ``privacy.sample.target_epsilon`` set: the noise multiplier that reaches it after the
   client's largest possible number of steps (``rounds`` times its steps per round), and
   ``noise_multiplier`` is ignored (:func:`noise_for_target`).

Opacus issue 820: a model moved after it was wrapped trains tensors the optimizer does not
hold. Here the optimizer is wrapped each round after the adapters are loaded on the backbone's
device, and every step checks that the tensors it privatises are still the model's own and on
the device of the noise (:meth:`PrivateRound.per_sample_grads`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer

from fedumm.config import PrivacyConfig

DP_EPSILON = "dp_epsilon"  # the client's epsilon so far, over every round it took part in
DP_DELTA = "dp_delta"
DP_NOISE = "dp_noise_multiplier"
ACCOUNTANT = "dp_sgd_accountant"  # the client-state key of the accountant's history

# (samples, drop_text) -> (the loss of those samples, per-modality losses)
LossFn = Callable[[Sequence, Sequence[bool] | None], tuple[torch.Tensor, dict[str, float]]]


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling rate ``q``: each sample joins a batch with probability ``q``."""
    return min(1.0, batch_size / n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps of an epoch, as the trainer's fixed-size batches have (Opacus' DPDataLoader)."""
    return math.ceil(n / batch_size)


def poisson_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of Poisson batches over ``n`` samples (positions, possibly empty)."""
    q = sample_rate(n, batch_size)
    return [np.flatnonzero(rng.random(n) < q) for _ in range(steps_per_epoch(n, batch_size))]


@lru_cache(maxsize=256)
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float,
                     steps: int) -> float:
    """The noise multiplier whose RDP epsilon after ``steps`` steps at ``sample_rate`` is at
    most ``target_epsilon`` (Opacus' ``get_noise_multiplier``, within its tolerance 0.01).
    Raises ValueError when no noise below 1e6 reaches it."""
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant="rdp"))
    except ValueError as exc:
        raise ValueError(f"privacy.sample.target_epsilon={target_epsilon} cannot be reached "
                         f"with delta={delta:.3g} over {steps} steps at sampling rate "
                         f"{sample_rate:.3g} ({exc})") from exc


@dataclass(frozen=True)
class ClientPlan:
    """One client's DP-SGD settings, fixed by its number of training samples."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    delta: float


@dataclass(frozen=True)
class SampleDP:
    """The run's DP-SGD settings (``privacy.sample``, ``privacy.delta``); ``rounds``: the most
    rounds a client can take part in, over which ``target_epsilon`` is spent."""

    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float | None = None
    delta: float | None = None
    rounds: int = 1

    @classmethod
    def from_config(cls, privacy: PrivacyConfig, rounds: int) -> SampleDP | None:
        """The settings, or None while ``privacy.sample.max_grad_norm`` is unset (DP off)."""
        s = privacy.sample
        if s.max_grad_norm is None:
            return None
        return cls(s.noise_multiplier, s.max_grad_norm, s.target_epsilon, privacy.delta,
                   rounds)

    def plan(self, n: int, batch_size: int, local_epochs: int, max_steps: int = 0
             ) -> ClientPlan:
        """The settings of a client with ``n`` training samples; ``max_steps`` as
        ``train.max_steps`` (0: ``local_epochs`` epochs a round)."""
        if n < 1:
            raise ValueError("DP-SGD needs a client with at least one training sample")
        q = sample_rate(n, batch_size)
        delta = self.delta if self.delta is not None else 1.0 / n
        sigma = self.noise_multiplier
        if self.target_epsilon is not None:
            per_round = local_epochs * steps_per_epoch(n, batch_size)
            if max_steps:
                per_round = min(per_round, max_steps)
            sigma = noise_for_target(self.target_epsilon, delta, q, self.rounds * per_round)
        return ClientPlan(sigma, self.max_grad_norm, q, min(batch_size, n), delta)


class _DPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer, whose noise is zero for ``noise_multiplier=0`` also with an
    unbounded clip (Opacus computes its std as ``0 * inf``, NaN): the comparison with plain
    training (no noise, no clip) needs it; the config refuses an infinite clip."""

    def add_noise(self) -> None:
        if self.noise_multiplier == 0:
            for p in self.params:
                p.grad = p.summed_grad.view_as(p).clone()
            return
        super().add_noise()


class PrivateRound:
    """One client's round of DP-SGD around the trainer's ``optimizer`` of ``params``: the
    client's accountant restored from ``client_state``, the noise seeded from ``seed_key``
    (seed, round, client). Build it after the model is on its device (Opacus issue 820);
    ``model``: the module whose parameters ``params`` must stay."""

    def __init__(self, plan: ClientPlan, optimizer: torch.optim.Optimizer,
                 params: Sequence[torch.nn.Parameter], client_state: dict,
                 seed_key: Sequence[int], model: torch.nn.Module) -> None:
        self.plan = plan
        self.params = list(params)
        self.model = model
        device = self.params[0].device if self.params else torch.device("cpu")
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(np.random.SeedSequence([*seed_key, 2])
                                       .generate_state(1)[0]))
        self.accountant = RDPAccountant()
        if ACCOUNTANT in client_state:
            self.accountant.load_state_dict(dict(client_state[ACCOUNTANT]))
        self.optimizer = _DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                                      max_grad_norm=plan.max_grad_norm,
                                      expected_batch_size=plan.expected_batch_size,
                                      generator=self.generator)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(plan.sample_rate))
        self._check_placement()

    def _check_placement(self) -> None:
        own = {id(p) for p in self.model.parameters()}
        for p in self.params:
            if id(p) not in own or p.device != self.generator.device:
                raise RuntimeError(
                    "DP-SGD privatises tensors the model no longer trains (or on another "
                    f"device: {p.device}, the noise's {self.generator.device}): the model "
                    "moved after its optimizer was wrapped; wrap it after placement "
                    "(Opacus issue 820)")

    def per_sample_grads(self, samples: Sequence, drop: Sequence[bool] | None,
                         loss_fn: LossFn) -> None:
        """Each sample's gradient of its own loss, as ``p.grad_sample`` ([B, *p.shape]) on
        every trained tensor; clears what the previous step left."""
        self._check_placement()
        self.optimizer.zero_grad(set_to_none=True)
        rows: list[list[torch.Tensor]] = [[] for _ in self.params]
        for i, s in enumerate(samples):
            loss, _ = loss_fn([s], None if drop is None else [drop[i]])
            grads = torch.autograd.grad(loss, self.params, allow_unused=True) \
                if torch.is_tensor(loss) and loss.requires_grad else [None] * len(self.params)
            for row, g, p in zip(rows, grads, self.params, strict=True):
                row.append(torch.zeros_like(p) if g is None else g.detach())
        for row, p in zip(rows, self.params, strict=True):
            p.grad_sample = torch.stack(row) if row else p.new_zeros((0, *p.shape))

    def privatize(self) -> None:
        """``p.grad`` <- (the sum of the clipped per-sample gradients + noise) / the expected
        batch size, plus what ``p.grad`` held (the gradient of the hooks' terms, which hold no
        data); the accountant counts the step. The trainer's optimizer steps next."""
        extra = [p.grad for p in self.params]
        self.optimizer.pre_step()
        for p, g in zip(self.params, extra, strict=True):
            if g is not None:
                p.grad.add_(g)

    def epsilon(self) -> float:
        """The client's epsilon so far at the plan's delta (inf without noise)."""
        if not self.accountant.history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self.accountant.history):
            return math.inf
        return float(self.accountant.get_epsilon(delta=self.plan.delta))

    def finish(self, client_state: dict) -> dict[str, float]:
        """Keep the accountant in ``client_state``; the metrics the update reports."""
        client_state[ACCOUNTANT] = {
            "history": [(float(s), float(q), int(k)) for s, q, k in self.accountant.history],
            "mechanism": self.accountant.mechanism()}
        for p in self.params:  # nothing per-sample stays on the shared model
            p.grad_sample = None
            p.summed_grad = None
        return {DP_EPSILON: self.epsilon(), DP_DELTA: self.plan.delta,
                DP_NOISE: self.plan.noise_multiplier}
